from __future__ import annotations

import pytest

from hub.targeting import AgentView, choose

FLEET = [
    AgentView("a1", True, {"site": "x"}, frozenset({"noop", "diagnostics.collect"}), load=3),
    AgentView("a2", True, {"site": "y"}, frozenset({"noop"}), load=1),
    AgentView("a3", False, {"site": "x"}, frozenset({"noop"}), load=0),
    AgentView("a4", True, {"site": "x"}, frozenset({"noop"}), load=1),
]


def test_any_picks_least_loaded_online_agent_with_the_job_type() -> None:
    assert choose("any", "noop", FLEET) == ["a2"]


def test_any_respects_labels_and_ignores_offline_agents() -> None:
    assert choose("any", "noop", FLEET, labels={"site": "x"}) == ["a4"]


def test_any_with_no_match_is_empty() -> None:
    assert choose("any", "firmware.update", FLEET) == []


def test_all_fans_out_to_every_online_match_in_id_order() -> None:
    assert choose("all", "noop", FLEET) == ["a1", "a2", "a4"]
    assert choose("all", "diagnostics.collect", FLEET) == ["a1"]


def test_named_agent_is_chosen_even_when_offline() -> None:
    assert choose("agent", "noop", FLEET, agent_id="a3") == ["a3"]
    assert choose("agent", "noop", FLEET, agent_id="nope") == []


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError):
        choose("some", "noop", FLEET)
