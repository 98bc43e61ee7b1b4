"""Back-pressure instead of loss, over a real broker: with its outbox over
``outbox_max_bytes`` the agent refuses new assignments (reported, not
stored, not run), says so in every heartbeat, still stores every result,
and accepts again once the hub's acks drain the outbox."""

from __future__ import annotations

import pytest

from agent.config import AgentSettings
from agent.daemon import Agent

from .conftest import AGENT_ID, wait_until

QUOTA = 65536
BIG = "x" * 20000


def fill_outbox(agent, hub) -> list[str]:
    """Results nobody acknowledges, one at a time, until the outbox is over
    its quota (data pages are deterministic, the WAL is not: hence the loop)."""
    ids = []
    for i in range(10):
        aid = f"r{i}"
        hub.assign(aid, params={"echo": BIG})
        hub.wait_for("result", aid)
        ids.append(aid)
        if agent.backpressure.check():
            return ids
    raise AssertionError(f"the outbox never went over its quota: {agent.backpressure.usage} bytes")


def test_over_quota_the_agent_refuses_new_work_but_keeps_every_result(make_agent, hub):
    agent = make_agent(outbox_max_bytes=QUOTA)
    assert agent.heartbeat().accepting is True
    hub.assign("late", params={"echo": "l", "sleep": 3.0})  # accepted before the outbox fills, finishes after
    hub.wait_for("started", "late")
    filled = fill_outbox(agent, hub)
    beat = wait_until(lambda: [b for b in hub.of("heartbeat") if not b.accepting], 5, "a heartbeat saying not accepting")[-1]
    assert "quota" in beat.not_accepting and str(QUOTA) in beat.not_accepting

    hub.assign("refused", params={"echo": "r"})
    rejected = hub.wait_for("rejected")[0]
    assert (rejected.code, rejected.assignment_id) == ("agent_backpressure", "refused")
    assert agent.inbox.get("refused") is None and not hub.of("accepted", "refused")  # not stored, so never run
    assert not hub.of("result", "late")  # still running while the outbox is over its quota

    late = hub.wait_for("result", "late")[0]  # finished over the quota: stored and sent all the same
    assert late.status == "success" and agent.outbox.has("late")
    assert agent.backpressure.usage > QUOTA

    hub.ack(*filled, "late")
    wait_until(lambda: hub.of("heartbeat")[-1].accepting, 5, "a heartbeat saying accepting again")
    assert hub.of("heartbeat")[-1].not_accepting == ""
    hub.assign("refused", params={"echo": "r"})  # the hub's redelivery
    assert hub.wait_for("result", "refused")[0].output == {"echo": "r"}
    counters = agent.counters.snapshot()
    assert counters["assign.refused_backpressure"] == 1 and counters["rejected.agent_backpressure"] == 1
    for aid in (*filled, "late", "refused"):
        assert len(hub.of("started", aid)) == 1


def test_a_redelivery_of_a_stored_assignment_is_not_refused_over_quota(make_agent, hub):
    agent = make_agent(outbox_max_bytes=QUOTA)
    hub.assign("kept", params={"echo": "k", "sleep": 1.0})
    hub.wait_for("started", "kept")
    fill_outbox(agent, hub)
    hub.assign("kept", params={"echo": "k", "sleep": 1.0})
    assert len(hub.wait_for("accepted", "kept", count=2)) == 2  # answered as a duplicate, not refused
    assert hub.of("accepted", "kept")[-1].duplicate is True
    assert not hub.of("rejected")


@pytest.mark.parametrize("mode", ["FULL", "NORMAL"])
def test_sqlite_synchronous_applies_to_both_queue_files(state_dir, mode):
    agent = Agent(AgentSettings(agent_id=AGENT_ID, state_dir=state_dir, sqlite_synchronous=mode))
    try:
        assert (agent.inbox.synchronous(), agent.outbox.synchronous()) == (mode, mode)
    finally:
        agent.inbox.close()
        agent.outbox.close()
