"""Late device results against what the hub decided meanwhile, through the
real hub (SQLite and PostgreSQL, manual clock, scheduler ticks): every rule
of docs/conflicts.md, each override recorded exactly once."""

from __future__ import annotations

from shared.frames import unsigned_part

from typing import Any

import pytest
from sqlalchemy import func, select

from hub import actions, lifecycle
from hub.db import transaction
from hub.events import CONFLICT_RECORDED
from hub.models import ConflictRecord, DagRun, Decision, OutboxMessage, TaskInstance, TaskResult
from shared.clock import utcnow
from shared.envelope import decode
from shared.hlc import HybridClock
from shared.messages import Cancel, Heartbeat, Result, Status
from shared.states import TaskState
from shared.topics import status_topic
from tests.hub.conftest import HubHarness

pytestmark = pytest.mark.timeout(60)

ANY = """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("d", default_args={"retries": 2, "retry_delay": 0}) as dag:
    t = AgentOperator(task_id="t", job_type="noop", target=any_agent())
    t >> PythonOperator(task_id="after", python_callable=lambda ti: ti.xcom_pull("t"))
"""

PINNED = """
from hub.dag import DAG, AgentOperator, PythonOperator, on_agent
from datetime import timedelta
with DAG("p", default_args={"retries": 0}, dagrun_timeout=timedelta(seconds=60)) as dag:
    t = AgentOperator(task_id="t", job_type="noop", target=on_agent("a1"))
    t >> PythonOperator(task_id="after", python_callable=lambda ti: "ran")
"""


def assigns(hub: HubHarness) -> list[Any]:
    return [e.body for e in hub.assignments_sent() if e.type == "assign"]


def assign_topics(hub: HubHarness) -> list[str]:
    with hub.sessions() as session:
        return [r.topic for r in session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)) if decode(unsigned_part(r.payload)).type == "assign"]


def cancels(hub: HubHarness) -> list[Cancel]:
    return [e.body for e in hub.assignments_sent() if isinstance(e.body, Cancel)]


def ti_of(hub: HubHarness, run_pk: int, task_id: str = "t") -> TaskInstance:
    return next(t for t in hub.tis(run_pk) if t.task_id == task_id)


def conflicts(hub: HubHarness) -> list[ConflictRecord]:
    with hub.sessions() as session:
        return list(session.scalars(select(ConflictRecord).order_by(ConflictRecord.id)))


def give_up(hub: HubHarness, run_pk: int, kind: str = "execution_timeout") -> None:
    """What a hub-side timeout or the offline helper does: the current try
    is abandoned, its assignment cancelled, the decision recorded."""
    with transaction(hub.sessions) as session:
        ti = session.scalar(select(TaskInstance).where(TaskInstance.run_pk == run_pk, TaskInstance.task_id == "t"))
        lifecycle.abandon_try(session, ti, utcnow(hub.clock), hub.ingester.hlc, kind, f"gave up ({kind})")
    hub.clock.advance(1)


def started(make_hub: Any, dag: str, dag_id: str, agents: tuple[str, ...]) -> tuple[HubHarness, int]:
    hub = make_hub({f"{dag_id}.py": dag})
    for agent in agents:
        hub.agent_online(agent)
    run_pk = hub.trigger(dag_id)
    hub.tick()
    hub.clock.advance(1)
    return hub, run_pk


def test_a_late_success_after_a_timeout_and_a_retry_elsewhere_wins_and_cancels_the_retry(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    recorded: list[dict[str, Any]] = []
    hub.ingester.events.subscribe(CONFLICT_RECORDED, lambda _n, data: recorded.append(data))
    [first] = assigns(hub)
    hub.send("a1", Status("offline"), topic=status_topic("a1"))
    give_up(hub, run_pk)
    hub.agent_online("a2")
    hub.tick()
    second = assigns(hub)[-1]
    assert second.try_number == 2 and assign_topics(hub)[-1] == "outpost/v1/agents/a2/assign"
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Decision)) == 1
    # a1 was offline, not idle: it finished try 1 and reports it now.
    hub.clock.advance(5)
    hub.send("a1", Result(first.assignment_id, 1, "success", {"from": "a1"}))
    ti = ti_of(hub, run_pk)
    assert (ti.state, ti.output) == ("success", {"from": "a1"})
    assert [c.assignment_id for c in cancels(hub)] == [first.assignment_id, second.assignment_id]
    [record] = conflicts(hub)
    assert record.rule == "device_success_wins" and record.agent_id == "a1"
    assert record.kept["type"] == "result" and record.kept["output"] == {"from": "a1"}
    assert record.overridden == {**record.overridden, "type": "hub_decision", "kind": "execution_timeout", "try_number": 1, "agent_id": "a1"}
    assert "never lost to an automatic decision" in record.resolution
    assert recorded == [{"ti_id": ti.id, "dag_id": "d", "run_pk": run_pk, "rule": "device_success_wins", "agent_id": "a1"}]
    assert hub.ingester.counters["conflict.device_success_wins"] == 1
    # The retry on a2 still finishes: a duplicate, recorded, its output discarded.
    hub.send("a2", Result(second.assignment_id, 2, "success", {"from": "a2"}))
    assert ti_of(hub, run_pk).output == {"from": "a1"}
    assert [c.rule for c in conflicts(hub)] == ["device_success_wins", "duplicate_success"]
    hub.tick()
    assert ti_of(hub, run_pk, "after").state == "success"


def test_a_redelivered_late_result_records_its_conflict_once(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    give_up(hub, run_pk, "offline_grace")
    late = Result(first.assignment_id, 1, "success", 1)
    for _ in range(3):
        hub.send("a1", late)
    assert len(conflicts(hub)) == 1
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TaskResult)) == 1
    assert hub.ingester.counters["result.duplicate"] == 2
    assert [a.body.assignment_ids for a in hub.acks()] == [(first.assignment_id,)] * 3


def test_a_late_result_after_a_clear_is_recorded_and_the_new_try_decides(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    actions.clear(hub.sessions, hub.ingester.events, hub.clock, run_pk, task_ids=["t"], actor="alice")
    hub.clock.advance(1)
    hub.tick()
    second = assigns(hub)[-1]
    assert second.try_number == 2
    hub.send("a1", Result(first.assignment_id, 1, "success", "old"))
    ti = ti_of(hub, run_pk)
    assert ti.state in ("queued", "delivered", "running") and ti.output is None
    [record] = conflicts(hub)
    assert (record.rule, record.kept["kind"], record.kept["actor"], record.overridden["status"]) == ("operator_wins", "clear", "alice", "success")
    hub.send("a1", Result(second.assignment_id, 2, "success", "new"))
    assert (ti_of(hub, run_pk).state, ti_of(hub, run_pk).output) == ("success", "new")
    assert len(conflicts(hub)) == 1


def test_a_late_success_after_a_mark_failed_is_recorded_not_applied(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    actions.mark(hub.sessions, hub.ingester.events, hub.clock, run_pk, "failed", task_ids=["t"])
    hub.clock.advance(1)
    hub.send("a1", Result(first.assignment_id, 1, "success", "late"))
    assert ti_of(hub, run_pk).state == "failed"
    [record] = conflicts(hub)
    assert (record.rule, record.kept["kind"], record.kept["state"]) == ("operator_wins", "mark", "failed")


def test_a_late_success_after_the_run_was_cancelled_is_recorded_not_applied(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    actions.set_run_state(hub.sessions, hub.ingester.events, hub.clock, run_pk, "failed")
    hub.clock.advance(1)
    hub.send("a1", Result(first.assignment_id, 1, "success", "late"))
    assert ti_of(hub, run_pk).state in ("failed", "skipped")
    [record] = conflicts(hub)
    assert (record.rule, record.kept["kind"]) == ("operator_wins", "cancel")
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "failed"


def test_a_mark_beats_a_late_success_even_after_an_automatic_give_up(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    give_up(hub, run_pk)
    actions.mark(hub.sessions, hub.ingester.events, hub.clock, run_pk, "skipped", task_ids=["t"])
    hub.clock.advance(1)
    hub.send("a1", Result(first.assignment_id, 1, "success", "late"))
    assert ti_of(hub, run_pk).state == "skipped"
    assert [c.rule for c in conflicts(hub)] == ["operator_wins"]


def test_a_late_success_reopens_what_a_terminal_failure_decided(make_hub: Any) -> None:
    """No retries left: the give-up failed the instance, its downstream went
    upstream_failed and the run failed. The device's success re-opens them."""
    hub, run_pk = started(make_hub, PINNED, "p", ("a1",))
    [first] = assigns(hub)
    give_up(hub, run_pk, "offline_grace")
    hub.tick()
    assert [(t.task_id, t.state) for t in hub.tis(run_pk)] == [("after", "upstream_failed"), ("t", "failed")]
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "failed"
    hub.send("a1", Result(first.assignment_id, 1, "success", "done"))
    with hub.sessions() as session:
        run = session.get(DagRun, run_pk)
        assert (run.state, run.clear_number) == ("queued", 1)
    assert [(t.task_id, t.state) for t in hub.tis(run_pk)] == [("after", "none"), ("t", "success")]
    hub.tick()
    assert [(t.task_id, t.state) for t in hub.tis(run_pk)] == [("after", "success"), ("t", "success")]
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "success"
    [record] = conflicts(hub)
    assert record.rule == "device_success_wins" and record.overridden["kind"] == "offline_grace"


def test_a_late_success_after_the_run_deadline_flips_the_instance_only(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, PINNED, "p", ("a1",))
    [first] = assigns(hub)
    hub.clock.advance(120)
    hub.tick()
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "failed"
        [decision] = session.scalars(select(Decision)).all()
        assert (decision.source, decision.kind) == ("hub", "deadline")
    hub.send("a1", Result(first.assignment_id, 1, "success", "done"))
    assert [(t.task_id, t.state) for t in hub.tis(run_pk)] == [("after", "skipped"), ("t", "success")]
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "failed"
    assert [c.rule for c in conflicts(hub)] == ["device_success_wins"]


def test_a_late_failure_for_a_try_given_up_changes_nothing_and_records_nothing(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    give_up(hub, run_pk)
    before = ti_of(hub, run_pk)
    hub.send("a1", Result(first.assignment_id, 1, "failed", error=None))
    after = ti_of(hub, run_pk)
    assert (after.state, after.try_number) == (before.state, before.try_number) == (TaskState.UP_FOR_RETRY, 1)
    assert conflicts(hub) == []


def test_an_untrusted_clock_is_said_so_in_the_record(make_hub: Any) -> None:
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    hub.agent_clocks["a1"] = HybridClock("a1", lambda: int((hub.clock.now() + 900) * 1000))  # 15 min ahead: flagged (hub.fleet)
    hub.send("a1", Heartbeat("0.1.0", clock=hub.clock.now() + 900))
    [first] = assigns(hub)
    give_up(hub, run_pk)
    hub.send("a1", Result(first.assignment_id, 1, "success", 1))
    [record] = conflicts(hub)
    assert record.kept["clock_trusted"] is False and "untrusted clock" in record.resolution


def test_cancel_assignments_records_an_automatic_decision_only_for_automatic_reasons(make_hub: Any) -> None:
    """The contract other parts of the hub rely on: cancelling with reason
    "offline_grace" (or decision=...) is an automatic give-up; any other
    reason is just a cancel."""
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    with transaction(hub.sessions) as session:
        ti = session.scalar(select(TaskInstance).where(TaskInstance.run_pk == run_pk, TaskInstance.task_id == "t"))
        with pytest.raises(ValueError, match="not one of"):
            lifecycle.cancel_assignments(session, [ti.id], utcnow(hub.clock), hub.ingester.hlc, "why", decision="mark")
        assert lifecycle.cancel_assignments(session, [ti.id], utcnow(hub.clock), hub.ingester.hlc, "offline_grace") == 1
        assert lifecycle.cancel_assignments(session, [ti.id], utcnow(hub.clock), hub.ingester.hlc, "offline_grace") == 0  # nothing open any more
    with hub.sessions() as session:
        [decision] = session.scalars(select(Decision)).all()
    assert (decision.source, decision.kind, decision.try_number, decision.agent_id, decision.assignment_id) == ("hub", "offline_grace", 1, "a1", first.assignment_id)


@pytest.mark.parametrize("order", [("a1", "a2"), ("a2", "a1")])
def test_late_reports_settle_the_same_way_in_either_arrival_order(make_hub: Any, order: tuple[str, str]) -> None:
    """Two tries given up on two offline devices; one reports success, the
    other failure, in either order: the same outcome and the same record."""
    hub, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(hub)
    hub.send("a1", Status("offline"), topic=status_topic("a1"))
    give_up(hub, run_pk, "offline_grace")
    hub.agent_online("a2")
    hub.tick()
    second = assigns(hub)[-1]
    hub.send("a2", Status("offline"), topic=status_topic("a2"))
    give_up(hub, run_pk, "offline_grace")
    late = {"a1": Result(first.assignment_id, 1, "success", {"from": "a1"}), "a2": Result(second.assignment_id, 2, "failed")}
    for agent in order:
        hub.send(agent, late[agent])
        hub.clock.advance(1)
    ti = ti_of(hub, run_pk)
    assert (ti.state, ti.output) == ("success", {"from": "a1"})
    [record] = conflicts(hub)
    assert (record.rule, record.overridden["kind"], record.overridden["try_number"]) == ("device_success_wins", "offline_grace", 1)
