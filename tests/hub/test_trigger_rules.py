"""Every trigger rule against Airflow's documented semantics."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hub.trigger_rules import Decision, decide

S, F, K, UF, R, N = "success", "failed", "skipped", "upstream_failed", "running", "none"
RUN, WAIT, SKIP, UPF = Decision.RUN, Decision.WAIT, Decision.SKIP, Decision.UPSTREAM_FAILED

CASES = [
    # rule, upstream states, decision
    ("all_success", [S, S], RUN),
    ("all_success", [S, R], WAIT),
    ("all_success", [S, F], UPF),
    ("all_success", [R, F], UPF),  # decided early, like Airflow
    ("all_success", [S, UF], UPF),
    ("all_success", [S, K], SKIP),  # skips propagate
    ("all_failed", [F, UF], RUN),
    ("all_failed", [F, R], WAIT),
    ("all_failed", [F, S], SKIP),
    ("all_failed", [F, K], SKIP),
    ("all_done", [S, F, K], RUN),
    ("all_done", [S, R], WAIT),
    ("all_skipped", [K, K], RUN),
    ("all_skipped", [K, S], SKIP),
    ("all_skipped", [K, F], SKIP),
    ("all_skipped", [K, R], WAIT),
    ("one_success", [S, R], RUN),
    ("one_success", [F, R], WAIT),
    ("one_success", [F, F], UPF),
    ("one_success", [K, K], SKIP),
    ("one_success", [F, K], UPF),
    ("one_failed", [F, R], RUN),
    ("one_failed", [UF, R], RUN),
    ("one_failed", [S, R], WAIT),
    ("one_failed", [S, K], SKIP),
    ("one_done", [S, R], RUN),
    ("one_done", [F, R], RUN),
    ("one_done", [K, R], WAIT),
    ("one_done", [K, K], SKIP),
    ("none_failed", [S, K], RUN),
    ("none_failed", [S, R], WAIT),
    ("none_failed", [S, F], UPF),
    ("none_failed_min_one_success", [S, K], RUN),
    ("none_failed_min_one_success", [K, K], SKIP),
    ("none_failed_min_one_success", [S, UF], UPF),
    ("none_failed_min_one_success", [S, R], WAIT),
    ("none_skipped", [S, F], RUN),
    ("none_skipped", [S, K], SKIP),
    ("none_skipped", [S, R], WAIT),
    ("always", [R, N], RUN),
]


@pytest.mark.parametrize(("rule", "upstream", "expected"), CASES)
def test_trigger_rule_matches_airflow(rule: str, upstream: list[str], expected: Decision) -> None:
    assert decide(rule, upstream) == expected


@pytest.mark.parametrize("rule", sorted({c[0] for c in CASES}))
def test_task_without_upstream_runs(rule: str) -> None:
    assert decide(rule, []) == RUN


def test_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown trigger rule"):
        decide("most_success", [S])


FINISHED_STATES = st.sampled_from([S, F, K, UF])


@given(rule=st.sampled_from(sorted({c[0] for c in CASES})), states=st.lists(FINISHED_STATES, min_size=1, max_size=8))
def test_finished_upstreams_always_give_a_final_decision(rule: str, states: list[str]) -> None:
    """Once every upstream is finished, no rule may wait forever."""
    assert decide(rule, states) != WAIT


@given(rule=st.sampled_from(sorted({c[0] for c in CASES})), states=st.lists(st.sampled_from([S, F, K, UF, R, N]), max_size=8))
def test_decision_does_not_depend_on_upstream_order(rule: str, states: list[str]) -> None:
    assert decide(rule, states) == decide(rule, list(reversed(states)))
