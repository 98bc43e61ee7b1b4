"""The conflict rule: the same set of reports gives the same outcome in any
order and with any duplicates; the operator wins the tries it covers; a
device's success is never lost to an automatic decision."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.conflicts import (
    RULE_DUPLICATE, RULE_OPERATOR, RULE_SUCCESS, DeviceResult, HubDecision, OperatorAction, Report, Resolution, resolve,
)
from shared.hlc import HLC
from shared.states import TaskState


def hub(ms: int, logical: int = 0) -> HLC:
    return HLC(ms, logical, "hub")


def result(ref: str, try_number: int, agent: str, status: str, finished: int, received: int, trusted: bool = True) -> DeviceResult:
    return DeviceResult(ref, try_number, agent, status, HLC(finished, 0, agent), hub(received), trusted)  # type: ignore[arg-type]


# --- worked examples (the ones docs/conflicts.md tells) -----------------------


def test_a_late_success_after_a_timeout_and_a_retry_elsewhere_wins() -> None:
    gave_up = HubDecision("d1", "offline_grace", 1, hub(100), "a1")
    late = result("r1", 1, "a1", "success", finished=90, received=300)
    res = resolve([gave_up, late])
    assert res.state == TaskState.SUCCESS and res.output_from == late and res.reopen
    [override] = res.overrides
    assert (override.rule, override.kept, override.overridden) == (RULE_SUCCESS, late, gave_up)
    assert "had finished before the hub gave up" in override.explanation


def test_the_first_success_received_is_kept_and_a_second_one_is_a_duplicate() -> None:
    gave_up = HubDecision("d1", "execution_timeout", 1, hub(100), "a1")
    retry = result("r2", 2, "a2", "success", finished=200, received=210)
    late = result("r1", 1, "a1", "success", finished=90, received=300)  # earlier on the device, later at the hub
    res = resolve([late, retry, gave_up])
    assert res.output_from == retry
    assert [(o.rule, o.overridden) for o in res.overrides] == [(RULE_DUPLICATE, late)]


def test_a_result_after_a_clear_is_recorded_and_the_new_tries_decide() -> None:
    clear = OperatorAction("o1", "clear", 1, hub(100), "alice")
    late = result("r1", 1, "a1", "success", finished=50, received=150)
    res = resolve([clear, late])
    assert res.state is None and res.output_from is None
    [override] = res.overrides
    assert (override.rule, override.kept, override.overridden) == (RULE_OPERATOR, clear, late)


def test_a_result_the_operator_already_saw_is_not_a_conflict() -> None:
    seen = result("r1", 1, "a1", "success", finished=50, received=60)
    mark = OperatorAction("o1", "mark", 1, hub(100), "alice", TaskState.FAILED)
    res = resolve([seen, mark])
    assert res.state == TaskState.FAILED and res.overrides == ()


def test_a_mark_beats_a_late_success_even_after_an_automatic_give_up() -> None:
    gave_up = HubDecision("d1", "offline_grace", 1, hub(100), "a1")
    mark = OperatorAction("o1", "mark", 1, hub(200), "alice", TaskState.FAILED)
    late = result("r1", 1, "a1", "success", finished=90, received=300)
    res = resolve([gave_up, mark, late])
    assert res.state == TaskState.FAILED and res.decided_by == mark
    assert [o.rule for o in res.overrides] == [RULE_OPERATOR]


def test_a_success_after_a_run_deadline_flips_the_instance_but_does_not_reopen_the_run() -> None:
    deadline = HubDecision("d1", "deadline", 1, hub(100), "a1")
    late = result("r1", 1, "a1", "success", finished=150, received=300)
    res = resolve([deadline, late])
    assert res.state == TaskState.SUCCESS and not res.reopen
    assert "finished after the hub gave up" in res.overrides[0].explanation


def test_an_untrusted_clock_never_claims_to_have_finished_in_time() -> None:
    gave_up = HubDecision("d1", "offline_grace", 1, hub(100), "a1")
    late = result("r1", 1, "a1", "success", finished=1, received=300, trusted=False)
    res = resolve([gave_up, late])
    assert res.state == TaskState.SUCCESS
    assert "untrusted clock" in res.overrides[0].explanation
    assert late.order == late.received


def test_a_late_failure_for_a_try_given_up_agrees_and_records_nothing() -> None:
    res = resolve([HubDecision("d1", "offline_grace", 1, hub(100), "a1"), result("r1", 1, "a1", "failed", 90, 300)])
    assert res == Resolution(None, None, None, ())


def test_two_different_reports_with_one_ref_are_refused() -> None:
    with pytest.raises(ValueError, match="share ref"):
        resolve([result("r1", 1, "a1", "success", 1, 2), result("r1", 1, "a1", "failed", 1, 2)])
    with pytest.raises(ValueError, match="kind"):
        resolve([HubDecision("d1", "mark", 1, hub(1))])


# --- properties ------------------------------------------------------------------

AGENTS = ("a1", "a2", "a3")


@st.composite
def report_sets(draw: st.DrawFn) -> list[Report]:
    """Any mix of results, give-ups and operator actions about one instance,
    with distinct hub stamps (one hub clock issues them)."""
    n = draw(st.integers(0, 9))
    stamps = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    reports: list[Report] = []
    for i, stamp in enumerate(stamps):
        kind = draw(st.sampled_from(["result", "result", "auto", "op"]))
        try_number = draw(st.integers(1, 4))
        if kind == "result":
            agent = draw(st.sampled_from(AGENTS))
            status = draw(st.sampled_from(["success", "failed"]))
            finished = draw(st.integers(0, 10_000))
            reports.append(DeviceResult(f"r{i}", try_number, agent, status, HLC(finished, 0, agent), hub(stamp), draw(st.booleans())))
        elif kind == "auto":
            reports.append(HubDecision(f"d{i}", draw(st.sampled_from(["execution_timeout", "offline_grace", "deadline"])), try_number, hub(stamp), draw(st.sampled_from([None, *AGENTS]))))
        else:
            op = draw(st.sampled_from(["mark", "cancel", "clear"]))
            state = None if op == "clear" else draw(st.sampled_from([TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED]))
            reports.append(OperatorAction(f"o{i}", op, try_number, hub(stamp), "alice", state))
    return reports


@settings(max_examples=300, deadline=None)
@given(report_sets(), st.randoms(use_true_random=False))
def test_the_same_set_gives_the_same_outcome_in_any_order(reports: list[Report], rnd: random.Random) -> None:
    shuffled = list(reports)
    rnd.shuffle(shuffled)
    assert resolve(shuffled) == resolve(reports)


@settings(max_examples=300, deadline=None)
@given(report_sets(), st.data())
def test_a_report_given_twice_changes_nothing(reports: list[Report], data: st.DataObject) -> None:
    extra = data.draw(st.lists(st.sampled_from(reports), max_size=5)) if reports else []
    assert resolve(reports + extra) == resolve(reports)


@settings(max_examples=300, deadline=None)
@given(report_sets())
def test_every_override_names_its_rule_once_and_explains_itself(reports: list[Report]) -> None:
    res = resolve(reports)
    keys = [o.key for o in res.overrides]
    assert len(keys) == len(set(keys))
    for o in res.overrides:
        assert o.rule in (RULE_OPERATOR, RULE_SUCCESS, RULE_DUPLICATE) and o.explanation


@settings(max_examples=300, deadline=None)
@given(report_sets())
def test_r1_the_operator_wins_the_tries_it_covers(reports: list[Report]) -> None:
    res = resolve(reports)
    actions = sorted((r for r in reports if isinstance(r, OperatorAction)), key=lambda a: (a.hlc, a.ref))
    results = [r for r in reports if isinstance(r, DeviceResult)]
    for r in results:
        covering = [a for a in actions if a.try_number >= r.try_number]
        # Never applied: a covered result never supplies the output.
        if covering:
            assert res.output_from != r
        # Recorded exactly when the hub received it after a covering action.
        recorded = [o for o in res.overrides if o.overridden == r and o.rule == RULE_OPERATOR]
        assert len(recorded) == (1 if any(a.hlc < r.received for a in covering) else 0)
    if actions and actions[-1].kind != "clear" and not any(r.try_number > actions[-1].try_number for r in results):
        assert res.state == actions[-1].state and res.decided_by == actions[-1]


@settings(max_examples=300, deadline=None)
@given(report_sets())
def test_r2_a_success_is_never_lost_to_an_automatic_decision(reports: list[Report]) -> None:
    res = resolve(reports)
    without_automatic = resolve([r for r in reports if not isinstance(r, HubDecision)])
    # Taking the hub's automatic give-ups away changes neither the state nor the output.
    assert (res.state, res.output_from) == (without_automatic.state, without_automatic.output_from)
    if res.output_from is not None:
        winner = res.output_from
        assert res.state == TaskState.SUCCESS
        # Each give-up of the winning try is overridden, once.
        gave_up = [r for r in reports if isinstance(r, HubDecision) and r.try_number == winner.try_number and r.agent_id in (None, winner.agent_id)]
        assert sorted(o.overridden.ref for o in res.overrides if o.rule == RULE_SUCCESS) == sorted(d.ref for d in gave_up)
        # Every other uncovered success is a duplicate of it, received later.
        dups = [o.overridden for o in res.overrides if o.rule == RULE_DUPLICATE]
        assert all(isinstance(d, DeviceResult) and d.received > winner.received for d in dups)


@settings(max_examples=200, deadline=None)
@given(report_sets(), st.integers(0, 10_000))
def test_a_success_arriving_last_keeps_what_the_hub_already_applied(reports: list[Report], offset: int) -> None:
    """Monotone where operators need it: a new success received after
    everything else never replaces an output the hub already holds."""
    before = resolve(reports)
    last = max((r.received if isinstance(r, DeviceResult) else r.hlc for r in reports), default=hub(0))
    newcomer = DeviceResult("late", 1, "a1", "success", HLC(offset, 0, "a1"), hub(last.wall_ms + 1))
    after = resolve([*reports, newcomer])
    if before.output_from is not None:
        assert after.output_from == before.output_from
