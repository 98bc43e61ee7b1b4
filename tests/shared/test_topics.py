"""The topic layout: every agent topic names its agent, parses back, and
refuses ids that would break topics, ACLs or file names."""

from __future__ import annotations

import pytest

from shared import topics


def test_agent_topics_live_under_the_versioned_prefix() -> None:
    assert topics.assign_topic("dev-1") == "outpost/v1/agents/dev-1/assign"
    assert topics.ack_topic("dev-1") == "outpost/v1/agents/dev-1/ack"
    assert topics.events_topic("dev-1") == "outpost/v1/agents/dev-1/events"
    assert topics.status_topic("dev-1") == "outpost/v1/agents/dev-1/status"


@pytest.mark.parametrize("kind", topics.AGENT_TOPICS)
def test_every_agent_topic_parses_back(kind: str) -> None:
    topic = topics.agent_topic("gw_7.site-a", kind)
    assert topics.parse(topic) == topics.AgentTopic("gw_7.site-a", kind)


def test_every_agent_topic_is_inside_the_agents_acl_pattern() -> None:
    # A broker ACL "outpost/v1/agents/%c/#" must cover every topic the agent uses.
    for kind in topics.AGENT_TOPICS:
        assert topics.agent_topic("dev-9", kind).startswith("outpost/v1/agents/dev-9/")


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev+1", "dev#", ".hidden", "-x", "a b", "é", "x" * 129, "$SYS"])
def test_unsafe_agent_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid agent id"):
        topics.assign_topic(bad)


def test_longest_allowed_agent_id() -> None:
    assert topics.check_agent_id("a" * 128) == "a" * 128


def test_unknown_topic_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown agent topic kind"):
        topics.agent_topic("dev-1", "secrets")


@pytest.mark.parametrize(
    "topic",
    [
        "outpost/v1/agents/dev-1",
        "outpost/v1/agents/dev-1/assign/extra",
        "outpost/v2/agents/dev-1/assign",
        "outpost/v1/hubs/dev-1/assign",
        "outpost/v1/agents/dev-1/other",
        "outpost/v1/agents/+/events",
        "other/v1/agents/dev-1/events",
        "",
    ],
)
def test_other_topics_do_not_parse(topic: str) -> None:
    with pytest.raises(ValueError):
        topics.parse(topic)


def test_hub_subscribes_to_events_in_a_shared_group_and_to_all_status() -> None:
    assert topics.hub_subscriptions() == ["$share/outpost-hub/outpost/v1/agents/+/events", "outpost/v1/agents/+/status"]
    assert topics.hub_subscriptions(shared=False) == ["outpost/v1/agents/+/events", "outpost/v1/agents/+/status"]
