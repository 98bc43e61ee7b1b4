"""Scheduling controls through the real scheduler (SQLite and PostgreSQL):
pools and priority, max_active_tasks and max_active_runs, depends_on_past,
retry backoff, callback requests, SLA misses and run timeouts."""

from __future__ import annotations

from shared.frames import unsigned_part

from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from hub import actions
from hub import events as ev
from hub.models import Assignment, CallbackRequest, ConflictRecord, Dag, DagRun, DeadlineMiss, OutboxMessage, TaskInstance, TaskResult
from shared.envelope import decode
from shared.messages import Accepted, Cancel, Result, Started


def states(hub: Any, run_pk: int) -> dict[str, str]:
    return {(ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"): ti.state for ti in hub.tis(run_pk)}


def run_of(hub: Any, run_pk: int) -> DagRun:
    with hub.sessions() as session:
        run = session.get(DagRun, run_pk)
        session.expunge(run)
        return run


def rows(hub: Any, model: Any) -> list[Any]:
    with hub.sessions() as session:
        found = list(session.scalars(select(model).order_by(model.id)))
        session.expunge_all()
        return found


def step(hub: Any) -> list[str]:
    """One scheduler pass, then the hub tasks it queued, in queue order."""
    hub.scheduler.tick()
    ran = []
    while hub.hub_queue:
        ti_id = hub.hub_queue.pop(0)
        with hub.sessions() as session:
            ran.append(session.get(TaskInstance, ti_id).task_id)
        hub.executor.run_inline(ti_id)
    return ran


POOL_DAG = """
from hub.dag import DAG, PythonOperator

def work():
    return 1

with DAG("pooled") as dag:
    for name, weight in [("low", 1), ("high", 5), ("mid", 3)]:
        PythonOperator(task_id=name, python_callable=work, pool="narrow", priority_weight=weight, weight_rule="absolute")
    PythonOperator(task_id="elsewhere", python_callable=work)
    PythonOperator(task_id="lost", python_callable=work, pool="no_such_pool")
"""


def test_a_pool_runs_one_at_a_time_in_priority_order_and_an_unknown_pool_fails(make_hub: Any) -> None:
    hub = make_hub({"pooled.py": POOL_DAG})
    actions.set_pool(hub.sessions, "narrow", 1)
    run_pk = hub.trigger("pooled")
    hub.scheduler.tick()
    assert states(hub, run_pk) == {"elsewhere": "queued", "high": "queued", "low": "scheduled", "mid": "scheduled", "lost": "failed"}
    lost = next(ti for ti in hub.tis(run_pk) if ti.task_id == "lost")
    assert lost.error["code"] == "unknown_pool" and "no_such_pool" in lost.error["message"]
    order = []
    for _ in range(6):
        order += step(hub)
    assert [t for t in order if t != "elsewhere"] == ["high", "mid", "low"]
    assert run_of(hub, run_pk).state == "failed"  # the leaf "lost" failed


AGENT_POOL_DAG = """
from hub.dag import DAG, AgentOperator, any_agent

with DAG("radio", max_active_tasks=10) as dag:
    AgentOperator(task_id="first", job_type="noop", pool="uplink", priority_weight=2)
    AgentOperator(task_id="second", job_type="noop", pool="uplink")
"""


def test_an_agent_task_holds_its_pool_slot_until_its_result_arrives(make_hub: Any) -> None:
    hub = make_hub({"radio.py": AGENT_POOL_DAG})
    actions.set_pool(hub.sessions, "uplink", 1)
    hub.agent_online("a1")
    run_pk = hub.trigger("radio")
    hub.tick()
    assert states(hub, run_pk) == {"first": "queued", "second": "scheduled"}
    first = hub.assignments_sent()[0].body
    hub.send("a1", Accepted(first.assignment_id))
    hub.send("a1", Started(first.assignment_id, hub.clock.now()))
    hub.tick()
    assert states(hub, run_pk) == {"first": "running", "second": "scheduled"}
    hub.send("a1", Result(first.assignment_id, 1, "success", {}))
    hub.tick()
    assert states(hub, run_pk) == {"first": "success", "second": "queued"}


WIDE_DAG = """
from hub.dag import DAG, AgentOperator

with DAG("wide", max_active_tasks=2) as dag:
    for i in range(4):
        AgentOperator(task_id=f"t{i}", job_type="noop")
"""


def test_max_active_tasks_counts_instances_across_runs(make_hub: Any) -> None:
    hub = make_hub({"wide.py": WIDE_DAG})
    hub.agent_online("a1")
    first = hub.trigger("wide")
    hub.clock.advance(1)
    second = hub.trigger("wide")
    hub.tick()
    assert sorted(states(hub, first).values()) == ["queued", "queued", "scheduled", "scheduled"]
    assert sorted(states(hub, second).values()) == ["scheduled"] * 4
    sent = hub.assignments_sent()
    hub.send("a1", Result(sent[0].body.assignment_id, 1, "success", {}))
    hub.tick()
    assert sum(s == "queued" for s in [*states(hub, first).values(), *states(hub, second).values()]) == 2


SERIAL_DAG = """
from hub.dag import DAG, PythonOperator

def work():
    return 1

with DAG("serial", max_active_runs=1) as dag:
    PythonOperator(task_id="only", python_callable=work)
"""


def test_max_active_runs_queues_extra_runs_and_starts_them_by_logical_date(make_hub: Any) -> None:
    hub = make_hub({"serial.py": SERIAL_DAG})
    with hub.sessions() as session:
        row = session.get(Dag, "serial")
        assert (row.max_active_runs, row.max_active_tasks) == (1, 16)
    first = hub.trigger("serial")
    hub.clock.advance(1)
    second = hub.trigger("serial")
    hub.clock.advance(1)
    third = hub.trigger("serial")
    assert [run_of(hub, r).state for r in (first, second, third)] == ["running", "queued", "queued"]
    step(hub)
    step(hub)
    assert [run_of(hub, r).state for r in (first, second, third)] == ["success", "running", "queued"]
    for _ in range(4):
        hub.clock.advance(1)
        step(hub)
    assert [run_of(hub, r).state for r in (first, second, third)] == ["success", "success", "success"]
    assert run_of(hub, third).started_at >= run_of(hub, second).ended_at


PAST_DAG = """
from hub.dag import DAG, AgentOperator

with DAG("past") as dag:
    AgentOperator(task_id="load", job_type="noop", depends_on_past=True)
"""


def test_depends_on_past_waits_for_the_previous_run(make_hub: Any) -> None:
    hub = make_hub({"past.py": PAST_DAG})
    hub.agent_online("a1")
    first = hub.trigger("past")
    hub.tick()
    assert states(hub, first) == {"load": "queued"}  # no earlier run: it may start
    hub.send("a1", Result(hub.assignments_sent()[0].body.assignment_id, 1, "failed", None))
    hub.tick()
    assert run_of(hub, first).state == "failed"
    hub.clock.advance(60)
    hub.agent_online("a1")
    second = hub.trigger("past")
    hub.tick()
    assert states(hub, second) == {"load": "none"}  # the previous run's "load" failed
    actions.mark(hub.sessions, hub.scheduler.events, hub.clock, first, "success", task_ids=["load"])
    hub.tick()
    assert states(hub, second) == {"load": "queued"}


FLAKY_DAG = """
from datetime import timedelta
from hub.dag import DAG, PythonOperator

def boom():
    raise RuntimeError("flaky")

def note(context):
    pass

with DAG("flaky", on_failure_callback=note, on_success_callback=note) as dag:
    PythonOperator(task_id="boom", python_callable=boom, retries=3, retry_delay=timedelta(seconds=10),
                   retry_exponential_backoff=True, max_retry_delay=timedelta(seconds=30),
                   on_retry_callback=note, on_failure_callback=[note, note])
"""


def test_exponential_backoff_and_callback_requests(make_hub: Any) -> None:
    hub = make_hub({"flaky.py": FLAKY_DAG})
    run_pk = hub.trigger("flaky")
    delays = []
    for attempt in range(1, 5):
        step(hub)
        ti = hub.tis(run_pk)[0]
        assert ti.try_number == attempt
        if attempt < 4:
            assert ti.state == "up_for_retry"
            delays.append((ti.next_try_at - ti.ended_at).total_seconds())
            hub.clock.advance(delays[-1] + 0.5)
    assert ti.state == "failed" and run_of(hub, run_pk).state == "running"
    assert 10 <= delays[0] < 20 and 20 <= delays[1] < 40 and delays[2] == 30  # capped by max_retry_delay
    step(hub)
    assert run_of(hub, run_pk).state == "failed"
    requests = rows(hub, CallbackRequest)
    assert [r.kind for r in requests] == ["task_retry", "task_retry", "task_retry", "task_failure", "dag_failure"]
    assert requests[0].payload["exception"]["message"] == "RuntimeError: flaky" and requests[0].payload["try_number"] == 1
    assert requests[3].ti_id == ti.id and requests[3].task_id == "boom" and requests[3].dag_version_id == run_of(hub, run_pk).dag_version_id
    assert requests[4].payload == {"reason": "task_failure"} and requests[4].ti_id is None


SLA_DAG = """
from datetime import timedelta
from hub.dag import DAG, AgentOperator

def missed(*args, **kwargs):
    pass

with DAG("slow", sla_miss_callback=missed) as dag:
    a = AgentOperator(task_id="a", job_type="noop", sla=timedelta(minutes=5))
    b = AgentOperator(task_id="b", job_type="noop", sla=timedelta(hours=1))
    a >> b
"""


def test_a_missed_sla_is_recorded_once_with_an_event_and_a_callback(make_hub: Any) -> None:
    hub = make_hub({"slow.py": SLA_DAG})
    seen: list[dict[str, Any]] = []
    hub.scheduler.events.subscribe(ev.DEADLINE_MISSED, lambda _n, data: seen.append(data))
    hub.agent_online("a1")
    run_pk = hub.trigger("slow")
    hub.tick()
    anchor = run_of(hub, run_pk).data_interval_end or run_of(hub, run_pk).logical_date
    hub.clock.advance((anchor + timedelta(minutes=5) - run_of(hub, run_pk).created_at).total_seconds() - 1)
    hub.tick()
    assert rows(hub, DeadlineMiss) == []
    hub.clock.advance(2)
    hub.tick()
    hub.tick()
    misses = rows(hub, DeadlineMiss)
    assert [(m.task_id, m.kind, m.deadline) for m in misses] == [("a", "task_sla", anchor + timedelta(minutes=5))]
    assert misses[0].notified_at is not None and "sla" in misses[0].description
    assert [(e["task_id"], e["kind"]) for e in seen] == [("a", "task_sla")]
    callbacks = [r for r in rows(hub, CallbackRequest) if r.kind == "sla_miss"]
    assert len(callbacks) == 1 and callbacks[0].payload["task_ids"] == ["a"]
    # "a" finishing late does not undo the miss; "b" has an hour.
    hub.send("a1", Result(hub.assignments_sent()[0].body.assignment_id, 1, "success", {}))
    hub.tick()
    assert [m.task_id for m in rows(hub, DeadlineMiss)] == ["a"]


TIMEOUT_DAG = """
from datetime import timedelta
from hub.dag import DAG, AgentOperator

def failed(context):
    pass

with DAG("bounded", dagrun_timeout=timedelta(minutes=2), on_failure_callback=failed) as dag:
    AgentOperator(task_id="work", job_type="noop") >> AgentOperator(task_id="after", job_type="noop")
"""


def test_dagrun_timeout_fails_the_run_skips_its_tasks_and_cancels_agent_work(make_hub: Any) -> None:
    hub = make_hub({"bounded.py": TIMEOUT_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("bounded")
    hub.tick()
    work = hub.assignments_sent()[0].body
    hub.send("a1", Accepted(work.assignment_id))
    hub.clock.advance(121)
    hub.tick()
    assert run_of(hub, run_pk).state == "failed"
    assert states(hub, run_pk) == {"work": "skipped", "after": "skipped"}
    [miss] = rows(hub, DeadlineMiss)
    assert (miss.kind, miss.task_id) == ("dagrun_timeout", "")
    cancels = [decode(unsigned_part(r.payload)).body for r in rows(hub, OutboxMessage) if isinstance(decode(unsigned_part(r.payload)).body, Cancel)]
    assert [c.assignment_id for c in cancels] == [work.assignment_id]
    assert [(r.kind, r.payload["reason"]) for r in rows(hub, CallbackRequest)] == [("dag_failure", "timed_out")]
    # The device finishes anyway: its success is the instance's (a success is
    # never lost to an automatic decision, docs/conflicts.md), but the run
    # stays timed out and its other instances stay skipped.
    hub.send("a1", Result(work.assignment_id, 1, "success", {}))
    assert [r.applied for r in rows(hub, TaskResult)] == [True]
    assert states(hub, run_pk) == {"work": "success", "after": "skipped"} and run_of(hub, run_pk).state == "failed"
    assert [c.rule for c in rows(hub, ConflictRecord)] == ["device_success_wins"]
    # Cleared, the run gets its full time again, and a second timeout updates the record.
    hub.agent_online("a1")
    actions.clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk)
    hub.tick()
    assert run_of(hub, run_pk).state == "running" and states(hub, run_pk)["work"] == "queued"
    hub.clock.advance(100)
    hub.tick()
    assert run_of(hub, run_pk).state == "running"
    hub.clock.advance(30)
    hub.tick()
    assert run_of(hub, run_pk).state == "failed"
    [again] = rows(hub, DeadlineMiss)
    assert again.id == miss.id and again.deadline > miss.deadline
    assert [e.body.reason for e in map(decode, (r.payload for r in rows(hub, OutboxMessage))) if isinstance(e.body, Cancel)] == ["the run timed out (dagrun_timeout)"] * 2


OPS_DAG = """
from hub.dag import DAG, AgentOperator, PythonOperator

def total(ti):
    return 1

with DAG("ops") as dag:
    AgentOperator(task_id="ping", job_type="noop") >> PythonOperator(task_id="total", python_callable=total)
"""


def test_clear_with_downstream_reruns_with_a_new_try_and_cancels_open_work(make_hub: Any) -> None:
    hub = make_hub({"ops.py": OPS_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("ops")
    hub.tick()
    one = hub.assignments_sent()[-1].body
    hub.send("a1", Result(one.assignment_id, 1, "failed", None))
    hub.tick()
    assert states(hub, run_pk) == {"ping": "failed", "total": "upstream_failed"} and run_of(hub, run_pk).state == "failed"

    affected = actions.clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, task_ids=["ping"], include_downstream=True, only_failed=True)
    assert sorted((a["task_id"], a["state"]) for a in affected) == [("ping", "failed"), ("total", "upstream_failed")]
    run = run_of(hub, run_pk)
    assert (run.state, run.clear_number, run.ended_at) == ("running", 1, None)
    ping = next(ti for ti in hub.tis(run_pk) if ti.task_id == "ping")
    assert (ping.state, ping.try_number, ping.max_tries, ping.error) == ("none", 1, 2, None)

    hub.tick()
    two = hub.assignments_sent()[-1].body
    assert two.try_number == 2 and two.assignment_id != one.assignment_id
    # Cleared again while the device holds try 2: that work is cancelled ...
    actions.clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, task_ids=["ping"])
    with hub.sessions() as session:
        assert session.get(Assignment, two.assignment_id).state == "cancelled"
    run = run_of(hub, run_pk)
    assert (run.state, run.clear_number) == ("running", 1)  # a running run carries on (Airflow)
    assert isinstance(decode(unsigned_part(rows(hub, OutboxMessage)[-1].payload)).body, Cancel)
    # ... and its late result decides nothing.
    hub.send("a1", Result(two.assignment_id, 2, "success", {}))
    assert rows(hub, TaskResult)[-1].applied is False
    hub.tick()
    three = hub.assignments_sent()[-1].body
    assert three.try_number == 3
    hub.send("a1", Result(three.assignment_id, 3, "success", {}))
    hub.tick()
    assert states(hub, run_pk) == {"ping": "success", "total": "success"} and run_of(hub, run_pk).state == "success"
    # Every try's report is kept.
    assert [(r.try_number, r.applied) for r in rows(hub, TaskResult)] == [(1, True), (2, False), (3, True)]


def test_rerun_and_mark(make_hub: Any, tmp_path: Path) -> None:
    hub = make_hub({"ops.py": OPS_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("ops")
    hub.tick()
    hub.send("a1", Result(hub.assignments_sent()[-1].body.assignment_id, 1, "success", {}))
    hub.tick()
    assert run_of(hub, run_pk).state == "success"
    dry = actions.clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, dry_run=True)
    assert len(dry) == 2 and run_of(hub, run_pk).state == "success"
    actions.clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk)
    assert states(hub, run_pk) == {"ping": "none", "total": "none"} and run_of(hub, run_pk).clear_number == 1
    hub.tick()
    # Marking the agent task succeeded lets the run go on without the device.
    actions.mark(hub.sessions, hub.scheduler.events, hub.clock, run_pk, "success", task_ids=["ping"])
    hub.tick()
    assert states(hub, run_pk) == {"ping": "success", "total": "success"} and run_of(hub, run_pk).state == "success"
    with hub.sessions() as session:
        assert [a.state for a in session.scalars(select(Assignment).order_by(Assignment.created_at))] == ["finished", "cancelled"]


def test_clear_mark_and_pool_errors_name_the_problem(make_hub: Any) -> None:
    import pytest

    from hub.errors import Conflict, InvalidRequest, PoolNotFound, RunNotFound

    hub = make_hub({"ops.py": OPS_DAG})
    run_pk = hub.trigger("ops")
    bus, clock = hub.scheduler.events, hub.clock
    with pytest.raises(RunNotFound):
        actions.clear(hub.sessions, bus, clock, 9999)
    with pytest.raises(InvalidRequest, match="no task 'nope'; its tasks: ping, total"):
        actions.clear(hub.sessions, bus, clock, run_pk, task_ids=["nope"])
    with pytest.raises(InvalidRequest, match="state must be one of"):
        actions.mark(hub.sessions, bus, clock, run_pk, "running", task_ids=["ping"])
    with pytest.raises(InvalidRequest, match="default_pool cannot be deleted"):
        actions.delete_pool(hub.sessions, "default_pool")
    with pytest.raises(PoolNotFound):
        actions.delete_pool(hub.sessions, "nope")
    actions.set_pool(hub.sessions, "p", 2)
    with pytest.raises(Conflict):
        actions.set_pool(hub.sessions, "p", 3, create_only=True)
    with pytest.raises(InvalidRequest, match="slots must be -1"):
        actions.set_pool(hub.sessions, "p", -2)
    with pytest.raises(InvalidRequest, match="invalid pool name"):
        actions.set_pool(hub.sessions, "bad name", 1)


def test_a_paused_dag_starts_no_runs_and_no_tasks(make_hub: Any) -> None:
    hub = make_hub({"ops.py": OPS_DAG})
    hub.agent_online("a1")
    running = hub.trigger("ops")
    actions.set_paused(hub.sessions, "ops", True)
    queued = hub.trigger("ops")
    hub.tick()
    assert run_of(hub, queued).state == "queued"
    assert states(hub, running) == {"ping": "none", "total": "none"}
    actions.set_paused(hub.sessions, "ops", False)
    hub.tick()
    assert run_of(hub, queued).state == "running" and states(hub, running)["ping"] == "queued"


EXECUTE_DAG = """
from hub.dag import DAG, AgentOperator

def started(context):
    pass

with DAG("watched") as dag:
    AgentOperator(task_id="flash", job_type="noop", on_execute_callback=started, on_success_callback=started)
"""


def test_an_agent_tasks_execute_and_success_callbacks_are_requested_as_the_device_reports(make_hub: Any) -> None:
    hub = make_hub({"watched.py": EXECUTE_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("watched")
    hub.tick()
    work = hub.assignments_sent()[0].body
    hub.send("a1", Accepted(work.assignment_id))
    assert rows(hub, CallbackRequest) == []
    hub.send("a1", Started(work.assignment_id, hub.clock.now()))
    hub.send("a1", Started(work.assignment_id, hub.clock.now()))  # a duplicate does not ask twice
    hub.send("a1", Result(work.assignment_id, 1, "success", {}))
    assert [(r.kind, r.task_id, r.payload["reason"]) for r in rows(hub, CallbackRequest)] == [("task_execute", "flash", "running"), ("task_success", "flash", "success")]
    assert states(hub, run_pk) == {"flash": "success"}


TEMPLATE_FAIL_DAG = """
from hub.dag import DAG, AgentOperator

def alert(context):
    pass

with DAG("badtemplate") as dag:
    AgentOperator(task_id="send", job_type="noop", params={"x": "{{ no_such_variable.attr }}"}, on_failure_callback=alert)
"""


def test_an_agent_task_that_fails_before_it_is_sent_requests_its_failure_callback(make_hub: Any) -> None:
    hub = make_hub({"badtemplate.py": TEMPLATE_FAIL_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("badtemplate")
    hub.scheduler.tick()
    assert states(hub, run_pk) == {"send": "failed"}
    assert [(r.kind, r.task_id) for r in rows(hub, CallbackRequest)] == [("task_failure", "send")]


LIMITED_DAG = """
from hub.dag import DAG, PythonOperator

def work(x):
    return x

with DAG("limited") as dag:
    PythonOperator.partial(task_id="each", python_callable=work, max_active_tis_per_dagrun=2).expand(op_kwargs=[{"x": i} for i in range(5)])
    PythonOperator(task_id="single", python_callable=work, op_kwargs={"x": 0}, max_active_tis_per_dag=1)
"""


def test_task_level_limits_per_run_and_over_runs(make_hub: Any) -> None:
    hub = make_hub({"limited.py": LIMITED_DAG})
    first = hub.trigger("limited")
    hub.clock.advance(1)
    second = hub.trigger("limited")
    for _ in range(3):
        hub.scheduler.tick()  # expand, then admit; nothing runs in between
    for run_pk in (first, second):
        each = [s for k, s in states(hub, run_pk).items() if k.startswith("each[")]
        assert sorted(each) == ["queued", "queued", "scheduled", "scheduled", "scheduled"]
    assert (states(hub, first)["single"], states(hub, second)["single"]) == ("queued", "scheduled")
    for _ in range(8):
        step(hub)
    assert run_of(hub, first).state == "success" and run_of(hub, second).state == "success"


def test_ingestion_announces_the_callbacks_it_requested(make_hub: Any) -> None:
    hub = make_hub({"watched.py": EXECUTE_DAG})
    announced: list[dict[str, Any]] = []
    hub.ingester.events.subscribe(ev.CALLBACKS_REQUESTED, lambda _n, data: announced.append(data))
    hub.agent_online("a1")
    hub.trigger("watched")
    hub.tick()
    work = hub.assignments_sent()[0].body
    hub.send("a1", Accepted(work.assignment_id))
    assert announced == []
    hub.send("a1", Started(work.assignment_id, hub.clock.now()))
    assert len(announced) == 1
    hub.send("a1", Result(work.assignment_id, 1, "success", {}))
    assert len(announced) == 2


WAIT_DAG = """
from hub.dag import DAG, AgentOperator

with DAG("chained") as dag:
    AgentOperator(task_id="extract", job_type="noop", wait_for_downstream=True) >> AgentOperator(task_id="load", job_type="noop")
"""


def test_wait_for_downstream_also_waits_for_the_previous_runs_next_tasks(make_hub: Any) -> None:
    hub = make_hub({"chained.py": WAIT_DAG})
    hub.agent_online("a1")
    first = hub.trigger("chained")
    hub.tick()
    hub.send("a1", Result(hub.assignments_sent()[-1].body.assignment_id, 1, "success", {}))
    hub.tick()
    assert states(hub, first) == {"extract": "success", "load": "queued"}
    hub.clock.advance(1)
    second = hub.trigger("chained")
    hub.tick()
    assert states(hub, second) == {"extract": "none", "load": "none"}  # the first run's "load" is not done
    hub.send("a1", Result(hub.assignments_sent()[-1].body.assignment_id, 1, "success", {}))
    hub.tick()
    assert states(hub, second)["extract"] == "queued"
