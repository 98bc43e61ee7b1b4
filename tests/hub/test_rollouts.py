"""Staged rollouts through the real scheduler and ingestion (hub.rollouts):
canary and batches, thresholds, pause/resume/abort, maintenance windows,
the per-group cap, offline devices, the deadline, retries and selectors.
Devices are simulated by signed results sent to the hub's ingestion."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update

from hub import rollouts
from hub.auth.roles import Actor
from hub.models import Agent, Assignment, AuditRecord, DagRun, RolloutDevice, RolloutRecord, TaskInstance
from shared.messages import JobError, Result, Status
from shared.topics import status_topic

NO_SILENCE = {"agent_offline_after": 1e9}


def dag(policy: str, target: str = "every_agent()", retries: int = 0, dag_id: str = "fw") -> dict[str, str]:
    return {f"{dag_id}.py": f"""
from datetime import timedelta
from hub.dag import DAG, AgentOperator, Rollout, every_agent

with DAG("{dag_id}") as dag:
    AgentOperator(task_id="update", job_type="noop", target={target}, retries={retries}, rollout=Rollout({policy}))
"""}


def fleet(hub: Any, n: int, **labels: str) -> list[str]:
    ids = [f"dev{i:03d}" for i in range(n)]
    for agent_id in ids:
        hub.agent_online(agent_id, **labels)
    return ids


def offline(hub: Any, agent_id: str) -> None:
    hub.send(agent_id, Status("offline", "0.1.0", agent_id), topic=status_topic(agent_id))


def open_work(hub: Any) -> dict[str, tuple[str, int]]:
    """Agent id -> (assignment id, try) of each try sent and not finished."""
    with hub.sessions() as session:
        rows = session.execute(
            select(Assignment.agent_id, Assignment.id, Assignment.try_number).join(TaskInstance, TaskInstance.id == Assignment.ti_id)
            .where(TaskInstance.state.in_(["queued", "delivered", "running"]), Assignment.try_number == TaskInstance.try_number,
                   Assignment.state.not_in(["finished", "cancelled"]))
        ).all()
    return {agent_id: (aid, tn) for agent_id, aid, tn in rows}


def report(hub: Any, agent_id: str, ok: bool = True) -> None:
    aid, try_number = open_work(hub)[agent_id]
    if ok:
        hub.send(agent_id, Result(aid, try_number, "success", {"flashed": True}))
    else:
        hub.send(agent_id, Result(aid, try_number, "failed", None, JobError("flash_failed", "the image did not boot", retryable=True)))


def rollout(hub: Any) -> RolloutRecord:
    with hub.sessions() as session:
        record = session.scalars(select(RolloutRecord)).one()
        session.expunge(record)
        return record


def devices(hub: Any) -> dict[str, tuple[str, int | None]]:
    with hub.sessions() as session:
        return {a: (s, b) for a, s, b in session.execute(select(RolloutDevice.agent_id, RolloutDevice.state, RolloutDevice.batch))}


def in_state(hub: Any, state: str) -> list[str]:
    return sorted(a for a, (s, _) in devices(hub).items() if s == state)


def run_state(hub: Any, run_pk: int) -> str:
    with hub.sessions() as session:
        return session.get(DagRun, run_pk).state


def succeed_all(hub: Any) -> list[str]:
    work = sorted(open_work(hub))
    for agent_id in work:
        report(hub, agent_id)
    hub.tick()
    return work


def test_canary_first_then_fixed_batches_and_the_run_succeeds(make_hub: Any) -> None:
    hub = make_hub(dag("canary=2, batch_size=5, failure_threshold=0.5"))
    ids = fleet(hub, 12)
    run_pk = hub.trigger("fw")
    hub.tick()
    record = rollout(hub)
    assert (record.state, record.batch, record.total) == ("running", 0, 12)
    # The canary: the first two devices by id; the others wait, never dispatched by the scheduler.
    assert sorted(open_work(hub)) == ids[:2]
    states = {ti.agent_id: ti.state for ti in hub.tis(run_pk)}
    assert [states[a] for a in ids[2:]] == ["deferred"] * 10
    hub.tick()
    assert sorted(open_work(hub)) == ids[:2]  # nothing more before the canary succeeded
    batches = [succeed_all(hub)]
    while open_work(hub):
        batches.append(succeed_all(hub))
    assert batches == [ids[:2], ids[2:7], ids[7:12]]
    record = rollout(hub)
    assert (record.state, record.finished_at is not None) == ("completed", True)
    assert {b for _, b in devices(hub).values()} == {0, 1, 2}
    assert run_state(hub, run_pk) == "success"


def test_exponential_batches_double_up_to_max_batch(make_hub: Any) -> None:
    hub = make_hub(dag("canary=1, batch_size=2, growth='exponential', max_batch=5, failure_threshold=0.5"))
    fleet(hub, 17)
    run_pk = hub.trigger("fw")
    hub.tick()
    sizes = []
    while open_work(hub):
        sizes.append(len(succeed_all(hub)))
    assert sizes == [1, 2, 4, 5, 5]
    assert rollout(hub).state == "completed" and run_state(hub, run_pk) == "success"


def test_200_devices_with_5_percent_failures_abort_within_one_batch_at_a_3_percent_threshold(make_hub: Any) -> None:
    hub = make_hub(dag("canary=10, batch_size=20, failure_threshold=0.03"))
    ids = fleet(hub, 200)
    failing = {ids[i] for i in range(19, 200, 20)}  # 10 devices: 5%
    run_pk = hub.trigger("fw")
    hub.tick()
    for _ in range(20):
        work = sorted(open_work(hub))
        if not work:
            break
        # Failures report first: the abort happens while the rest of the batch is in flight.
        for agent_id in sorted(work, key=lambda a: a not in failing):
            report(hub, agent_id, ok=agent_id not in failing)
        hub.tick()
    record = rollout(hub)
    assert record.state == "aborted" and "exceeds the threshold 3.0%" in (record.reason or "")
    found = devices(hub)
    updated = sorted(a for a, (s, _) in found.items() if s == "succeeded")
    # The canary (10) and batch 1 (20, one failing) went; nothing after the batch in flight.
    assert updated == sorted(set(ids[:30]) - failing)
    assert in_state(hub, "failed") == [ids[19]]
    assert in_state(hub, "skipped") == ids[30:]
    assert max(b for s, b in found.values() if b is not None) == 1
    with hub.sessions() as session:
        skipped = session.scalars(select(TaskInstance).where(TaskInstance.agent_id == ids[150])).one()
        assert (skipped.state, skipped.error["code"], skipped.try_number) == ("skipped", "rollout_aborted", 0)
    assert record.finished_at is not None and run_state(hub, run_pk) == "failed"


def test_the_next_batch_waits_for_the_success_threshold_and_an_unreachable_one_fails_the_rollout(make_hub: Any) -> None:
    hub = make_hub(dag("canary=0, batch_size=4, failure_threshold=0.5, success_threshold=0.75"))
    ids = fleet(hub, 8)
    run_pk = hub.trigger("fw")
    hub.tick()
    assert sorted(open_work(hub)) == ids[:4]
    report(hub, ids[0])
    report(hub, ids[1])
    hub.tick()
    assert sorted(open_work(hub)) == ids[2:4]  # 2 of 4 < 75%
    report(hub, ids[2])
    hub.tick()
    assert sorted(open_work(hub)) == [ids[3], *ids[4:]]  # 3 of 4: the next batch starts, ids[3] still in flight
    report(hub, ids[3], ok=False)
    for agent_id, ok in zip(ids[4:], (True, True, False, False)):
        report(hub, agent_id, ok=ok)
    hub.tick()
    record = rollout(hub)
    assert record.state == "failed" and "2 of 4 devices succeeded" in (record.reason or "")
    assert run_state(hub, run_pk) == "failed"


def test_pause_stops_new_notifications_resume_goes_on_and_abort_skips_the_rest(make_hub: Any) -> None:
    hub = make_hub(dag("canary=1, batch_size=2, failure_threshold=0.5, pause_after_canary=True"))
    ids = fleet(hub, 7)
    run_pk = hub.trigger("fw")
    hub.tick()
    succeed_all(hub)
    record = rollout(hub)
    assert (record.state, record.batch, open_work(hub)) == ("paused", 1, {})
    by = Actor("user:olga", "127.0.0.1")
    rollouts.act(hub.sessions, hub.scheduler.events, hub.clock, record.id, "resume", by=by)
    hub.tick()
    assert sorted(open_work(hub)) == ids[1:3]
    rollouts.act(hub.sessions, hub.scheduler.events, hub.clock, record.id, "pause", by=by, reason="night shift")
    succeed_all(hub)
    assert open_work(hub) == {} and rollout(hub).reason == "night shift"
    rollouts.act(hub.sessions, hub.scheduler.events, hub.clock, record.id, "resume", by=by)
    hub.tick()
    assert sorted(open_work(hub)) == ids[3:5]
    rollouts.act(hub.sessions, hub.scheduler.events, hub.clock, record.id, "abort", by=by, reason="bad build")
    hub.tick()
    assert rollout(hub).state == "aborted" and in_state(hub, "skipped") == ids[5:]
    assert run_state(hub, run_pk) == "running"  # in-flight devices finish first
    succeed_all(hub)
    assert in_state(hub, "succeeded") == ids[:5] and run_state(hub, run_pk) == "failed"
    with hub.sessions() as session:
        audit = [(a.actor, a.action, a.detail.get("reason")) for a in session.scalars(select(AuditRecord).order_by(AuditRecord.id))]
    assert audit == [("user:olga", "rollout.resume", ""), ("user:olga", "rollout.pause", "night shift"),
                     ("user:olga", "rollout.resume", ""), ("user:olga", "rollout.abort", "bad build")]


def test_devices_start_only_inside_a_maintenance_window(make_hub: Any) -> None:
    hub = make_hub(dag("canary=1, batch_size=2, failure_threshold=0.5, windows=[('0 2 * * *', timedelta(hours=1))]"), **NO_SILENCE)
    ids = fleet(hub, 3)
    hub.trigger("fw")
    hub.tick()  # 00:00 UTC: closed
    assert open_work(hub) == {}
    hub.clock.advance(2 * 3600)  # 02:00: open
    hub.tick()
    assert sorted(open_work(hub)) == ids[:1]
    hub.clock.advance(3600 + 60)  # 03:01: closed again; the canary may still finish
    succeed_all(hub)
    assert open_work(hub) == {} and rollout(hub).batch == 1
    hub.clock.advance(23 * 3600)  # the next day at 02:01
    hub.tick()
    assert sorted(open_work(hub)) == ids[1:]


def test_at_most_max_concurrent_per_group_devices_of_a_group_update_at_once(make_hub: Any) -> None:
    hub = make_hub(dag("canary=0, batch_size=6, failure_threshold=0.5, max_concurrent_per_group=2"))
    ids = fleet(hub, 6)
    with hub.sessions.begin() as session:
        for agent_id in ids[:4]:
            session.execute(update(Agent).where(Agent.agent_id == agent_id).values(groups=["plant-a"]))
    hub.trigger("fw")
    hub.tick()
    # Two of plant-a, and the two without a group (group "").
    assert sorted(open_work(hub)) == [ids[0], ids[1], ids[4], ids[5]]
    report(hub, ids[0])
    hub.tick()
    assert sorted(open_work(hub)) == [ids[1], ids[2], ids[4], ids[5]]


def test_an_offline_device_is_passed_over_and_picked_up_when_it_returns(make_hub: Any) -> None:
    hub = make_hub(dag("canary=0, batch_size=2, failure_threshold=0.5"), **NO_SILENCE)
    ids = fleet(hub, 4)
    offline(hub, ids[1])
    run_pk = hub.trigger("fw")
    hub.tick()
    assert sorted(open_work(hub)) == [ids[0], ids[2]]
    succeed_all(hub)
    assert sorted(open_work(hub)) == [ids[3]]  # batch 1 takes what is online
    succeed_all(hub)
    assert open_work(hub) == {} and rollout(hub).state == "running" and in_state(hub, "pending") == [ids[1]]
    hub.agent_online(ids[1])
    hub.tick()
    assert sorted(open_work(hub)) == [ids[1]]
    succeed_all(hub)
    assert rollout(hub).state == "completed" and run_state(hub, run_pk) == "success"


def test_the_deadline_gives_up_offline_devices_as_timed_out_not_failed(make_hub: Any) -> None:
    hub = make_hub(dag("canary=0, batch_size=4, failure_threshold=0.1, deadline=timedelta(minutes=30)"), **NO_SILENCE)
    ids = fleet(hub, 4)
    offline(hub, ids[3])
    run_pk = hub.trigger("fw")
    hub.tick()
    assert sorted(open_work(hub)) == ids[:3]
    report(hub, ids[0])
    report(hub, ids[1])
    offline(hub, ids[2])  # went away with the update sent
    hub.tick()
    hub.clock.advance(29 * 60)
    hub.tick()
    assert in_state(hub, "timed_out") == []
    hub.clock.advance(61)  # past the deadline, well within the task's offline_grace
    hub.tick()
    record = rollout(hub)
    assert in_state(hub, "timed_out") == ids[2:] and in_state(hub, "succeeded") == ids[:2]
    assert record.state == "completed" and run_state(hub, run_pk) == "success"
    with hub.sessions() as session:
        cancelled = session.scalars(select(Assignment.state).where(Assignment.agent_id == ids[2])).one()
        codes = {ti.agent_id: (ti.state, ti.error["code"]) for ti in session.scalars(select(TaskInstance).where(TaskInstance.agent_id.in_(ids[2:])))}
    assert cancelled == "cancelled"
    assert codes == {ids[2]: ("skipped", "rollout_timed_out"), ids[3]: ("skipped", "rollout_timed_out")}


def test_a_failed_try_is_retried_on_the_same_device_and_only_its_last_try_counts(make_hub: Any) -> None:
    hub = make_hub(dag("canary=1, batch_size=1, failure_threshold=0.0", retries=1))
    ids = fleet(hub, 2)
    run_pk = hub.trigger("fw")
    hub.tick()
    report(hub, ids[0], ok=False)
    hub.tick()
    assert open_work(hub) == {} and devices(hub)[ids[0]] == ("notified", 0)  # up for retry: not failed
    hub.clock.advance(11)  # the default retry_delay
    hub.tick()
    assert open_work(hub)[ids[0]][1] == 2 and rollout(hub).state == "running"
    report(hub, ids[0])
    hub.tick()
    assert sorted(open_work(hub)) == [ids[1]]
    succeed_all(hub)
    assert rollout(hub).state == "completed" and run_state(hub, run_pk) == "success"


def test_the_selector_takes_groups_hardware_and_a_firmware_range_over_online_and_offline_devices(make_hub: Any) -> None:
    target = "every_agent(groups=['plant'], hardware=['rpi4'], firmware='>=1.0,<2.0', site='berlin')"
    hub = make_hub(dag("canary=0, batch_size=10, failure_threshold=0.5", target=target), **NO_SILENCE)
    ids = fleet(hub, 6, site="berlin")
    rows = {ids[0]: (["plant"], "rpi4", "1.2.0"), ids[1]: (["plant", "x"], "rpi4", "1.9"), ids[2]: (["plant"], "rpi4", "2.0.0"),
            ids[3]: (["other"], "rpi4", "1.5"), ids[4]: (["plant"], "cm4", "1.5"), ids[5]: (["plant"], "rpi4", "1.0")}
    with hub.sessions.begin() as session:
        for agent_id, (groups, hardware, firmware) in rows.items():
            session.execute(update(Agent).where(Agent.agent_id == agent_id).values(groups=groups, hardware_model=hardware, firmware_version=firmware))
    offline(hub, ids[5])
    hub.trigger("fw")
    hub.tick()
    assert sorted(devices(hub)) == [ids[0], ids[1], ids[5]]
    assert sorted(open_work(hub)) == [ids[0], ids[1]]


def test_a_fan_out_without_a_rollout_applies_the_selector_to_online_devices(make_hub: Any) -> None:
    hub = make_hub({"fan.py": """
from hub.dag import DAG, AgentOperator, every_agent
with DAG("fan") as dag:
    AgentOperator(task_id="probe", job_type="noop", target=every_agent(groups=["plant"]))
"""})
    ids = fleet(hub, 3)
    with hub.sessions.begin() as session:
        session.execute(update(Agent).where(Agent.agent_id == ids[1]).values(groups=["plant"]))
    hub.trigger("fan")
    hub.tick()
    assert sorted(open_work(hub)) == [ids[1]]


def test_a_pass_over_a_large_rollout_runs_a_bounded_number_of_queries(make_hub: Any) -> None:
    """2,000 devices: starting notifies one batch with a few statements, and
    a later pass reads aggregates, not a row (or a query) per device."""
    hub = make_hub(dag("canary=5, batch_size=50, failure_threshold=0.5"))
    ids = [f"dev{i:04d}" for i in range(2000)]
    now = datetime.fromtimestamp(hub.clock.now(), UTC)
    with hub.sessions.begin() as session:
        session.add_all(Agent(agent_id=a, state="online", first_seen=now, last_seen=now, job_types=[{"name": "noop", "version": "1"}]) for a in ids)
    hub.trigger("fw")
    hub.tick()
    assert len(open_work(hub)) == 5 and rollout(hub).total == 2000
    statements: list[str] = []
    engine = hub.sessions.kw["bind"]
    listener = lambda *args: statements.append(args[2])  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with hub.sessions.begin() as session:
            rollouts.advance_all(session, now, hub.scheduler.dispatcher, [])
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert len(statements) < 15, statements


def test_clearing_an_ended_rollouts_devices_runs_the_rollout_again_batch_by_batch(make_hub: Any) -> None:
    from hub import actions

    hub = make_hub(dag("canary=1, batch_size=3, failure_threshold=0.0"))
    ids = fleet(hub, 4)
    run_pk = hub.trigger("fw")
    hub.tick()
    report(hub, ids[0], ok=False)
    hub.tick()
    assert rollout(hub).state == "aborted" and run_state(hub, run_pk) == "failed"
    actions.clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, task_ids=["update"])
    hub.tick()
    record = rollout(hub)
    assert (record.state, record.finished_at) == ("running", None)
    assert open_work(hub) == {ids[0]: (open_work(hub)[ids[0]][0], 2)}  # the canary again, its second try
    assert in_state(hub, "pending") == ids[1:]
    succeed_all(hub)
    assert sorted(open_work(hub)) == ids[1:]
    succeed_all(hub)
    assert rollout(hub).state == "completed" and run_state(hub, run_pk) == "success"


def test_a_run_marked_from_outside_ends_its_rollout_and_unnotified_devices_count_as_skipped(make_hub: Any) -> None:
    from hub import actions

    hub = make_hub(dag("canary=1, batch_size=3, failure_threshold=0.5"))
    ids = fleet(hub, 4)
    run_pk = hub.trigger("fw")
    hub.tick()
    actions.set_run_state(hub.sessions, hub.scheduler.events, hub.clock, run_pk, "success")
    hub.tick()
    record = rollout(hub)
    assert record.state == "aborted" and "the run ended (success)" in (record.reason or "") and record.finished_at is not None
    assert in_state(hub, "skipped") == ids[1:] and in_state(hub, "succeeded") == ids[:1]


def test_a_seeded_shuffle_orders_the_devices_and_an_idle_rollout_lets_the_scheduler_idle(make_hub: Any) -> None:
    import random

    hub = make_hub(dag("canary=2, batch_size=3, failure_threshold=0.5, shuffle=True, seed=7"))
    ids = fleet(hub, 8)
    hub.trigger("fw")
    hub.scheduler.run_until_idle(max_ticks=20)  # waiting for devices is not work: the loop goes idle
    expected = sorted(ids)
    random.Random(7).shuffle(expected)
    with hub.sessions() as session:
        order = list(session.scalars(select(RolloutDevice.agent_id).order_by(RolloutDevice.seq)))
    assert order == expected and rollout(hub).seed == 7
    assert sorted(open_work(hub)) == sorted(expected[:2])


def test_a_paused_dag_notifies_no_new_device(make_hub: Any) -> None:
    from hub import actions

    hub = make_hub(dag("canary=1, batch_size=2, failure_threshold=0.5"))
    ids = fleet(hub, 3)
    hub.trigger("fw")
    hub.tick()
    actions.set_paused(hub.sessions, "fw", True)
    succeed_all(hub)
    assert open_work(hub) == {} and rollout(hub).state == "running"
    actions.set_paused(hub.sessions, "fw", False)
    hub.tick()
    assert sorted(open_work(hub)) == ids[1:]


def test_a_device_revoked_while_it_waits_is_skipped(make_hub: Any) -> None:
    hub = make_hub(dag("canary=1, batch_size=2, failure_threshold=0.5"))
    ids = fleet(hub, 3)
    hub.trigger("fw")
    hub.tick()
    with hub.sessions.begin() as session:
        session.execute(update(Agent).where(Agent.agent_id == ids[2]).values(revoked_at=datetime.fromtimestamp(hub.clock.now(), UTC)))
    succeed_all(hub)
    assert sorted(open_work(hub)) == [ids[1]]
    with hub.sessions() as session:
        device = session.scalars(select(RolloutDevice).where(RolloutDevice.agent_id == ids[2])).one()
        assert (device.state, device.error_code) == ("skipped", "agent_revoked")
    succeed_all(hub)
    assert rollout(hub).state == "completed"



@pytest.mark.parametrize(("threshold", "rollout_state", "outcome"), [(0.4, "completed", "success"), (0.3, "aborted", "failed")])
def test_the_run_waits_for_its_rollouts_verdict_on_the_last_device(make_hub: Any, threshold: float, rollout_state: str, outcome: str) -> None:
    """The last device's result can reach the run before the rollout's pass:
    a pass that only advances runs (not full) must not finish the run on it,
    or a rollout within its threshold reads as ended from outside (aborted),
    and a last failure that crosses the threshold would not fail the run."""
    hub = make_hub(dag(f"canary=1, batch_size='50%', failure_threshold={threshold}, success_threshold=0.5"))
    ids = fleet(hub, 3)
    run_pk = hub.trigger("fw")
    hub.tick()
    report(hub, ids[0])
    hub.tick()
    report(hub, ids[1])
    report(hub, ids[2], ok=False)
    hub.scheduler.tick(full=False)  # what the ingest wake-up runs first
    assert run_state(hub, run_pk) == "running"
    hub.tick()
    record = rollout(hub)
    assert (record.state, run_state(hub, run_pk)) == (rollout_state, outcome), record.reason
