"""The scheduler's incremental passes: woken by an event, a pass decides only
what that event may have made ready (the downstream of a finished instance,
a triggered run, instances waiting for a freed slot), reading only their
rows. Every DAG here is run twice, once with full passes only and once with
incremental passes only (after the run is triggered, never a full one), and
must end in exactly the same states: the incremental path loses no rule.
The same with the executor deciding a finished hub task's downstream in the
transaction that records it (Scheduler.decide_after, Airflow's "mini
scheduler")."""

from __future__ import annotations

from typing import Any

import pytest

from hub import events as ev
from hub.db import transaction
from hub.models import DagRun
from hub.scheduler import trigger_run
from shared.clock import utcnow

DAGS = '''
from hub.dag import DAG, BranchPythonOperator, EmptyOperator, PythonOperator, ShortCircuitOperator, chain

def ok():
    return 1

def boom():
    raise ValueError("boom")

def pick():
    return "b1"

def no():
    return False

def items():
    return [{"x": 1}, {"x": 2}, {"x": 3}]

def add(x):
    return x + 1

with DAG("chain") as d1:
    chain(*[PythonOperator(task_id=f"link_{i}", python_callable=ok) for i in range(6)])

with DAG("rules") as d2:
    a = PythonOperator(task_id="a", python_callable=ok)
    b = PythonOperator(task_id="b", python_callable=boom, retries=0)
    c = EmptyOperator(task_id="c")
    d = EmptyOperator(task_id="d", trigger_rule="all_done")
    e = EmptyOperator(task_id="e", trigger_rule="one_failed")
    f = EmptyOperator(task_id="f", trigger_rule="none_failed")
    g = EmptyOperator(task_id="g")
    h = EmptyOperator(task_id="h", trigger_rule="all_done")
    [a, b] >> c >> f >> g >> h
    [a, b] >> d
    [a, b] >> e

with DAG("branch") as d3:
    choose = BranchPythonOperator(task_id="choose", python_callable=pick)
    b1 = EmptyOperator(task_id="b1")
    b2 = EmptyOperator(task_id="b2")
    after_b2 = EmptyOperator(task_id="after_b2")
    join = EmptyOperator(task_id="join", trigger_rule="none_failed_min_one_success")
    choose >> [b1, b2]
    b2 >> after_b2 >> join
    b1 >> join

with DAG("short") as d4:
    chain(ShortCircuitOperator(task_id="gate", python_callable=no), EmptyOperator(task_id="x"), EmptyOperator(task_id="y"),
          EmptyOperator(task_id="z", trigger_rule="all_done"))

with DAG("mapped") as d5:
    source = PythonOperator(task_id="source", python_callable=items)
    added = PythonOperator.partial(task_id="add", python_callable=add).expand(op_kwargs=source.output)
    added >> EmptyOperator(task_id="after")
    PythonOperator.partial(task_id="none", python_callable=add).expand(op_kwargs=[]) >> EmptyOperator(task_id="after_none")

with DAG("narrow", max_active_tasks=1) as d6:
    [PythonOperator(task_id=f"w{i}", python_callable=ok) for i in range(4)] >> EmptyOperator(task_id="end")

with DAG("past") as d7:
    chain(PythonOperator(task_id="p1", python_callable=ok, depends_on_past=True), EmptyOperator(task_id="p2"))
'''


def _trigger(hub: Any, dag_id: str) -> int:
    with transaction(hub.sessions) as session:
        run_pk = trigger_run(session, dag_id, {}, utcnow(hub.clock)).id
    hub.scheduler.events.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
    return run_pk


def _settle_incrementally(hub: Any, max_passes: int = 200) -> int:
    """Incremental passes (as run_forever makes them after an event) until
    nothing is left to do; returns how many passes ran."""
    for passes in range(max_passes):
        dirty = hub.scheduler._take_dirty()
        if dirty.empty() and not hub.hub_queue:
            return passes
        assert not dirty.everything, "an event fell back to evaluating every run"
        hub.scheduler.tick(full=False, dirty=dirty)
        while hub.hub_queue:
            hub.executor.run_inline(hub.hub_queue.pop(0))
    raise AssertionError(f"still busy after {max_passes} incremental passes")


def _outcome(hub: Any, run_pks: list[int]) -> list[Any]:
    with hub.sessions() as session:
        runs = [str(session.get(DagRun, pk).state) for pk in run_pks]
    return [runs, [sorted((ti.task_id, ti.map_index, str(ti.state), ti.try_number) for ti in hub.tis(pk)) for pk in run_pks]]


@pytest.mark.parametrize("mini", [False, True], ids=["passes", "mini_scheduler"])
@pytest.mark.parametrize("dag_id,runs", [("chain", 1), ("rules", 1), ("branch", 1), ("short", 1), ("mapped", 1), ("narrow", 2), ("past", 2)])
def test_incremental_passes_end_like_full_passes(make_hub: Any, dag_id: str, runs: int, mini: bool) -> None:
    full = make_hub({"dags.py": DAGS})
    full_runs = [full.trigger(dag_id) for _ in range(runs)]
    full.tick(rounds=40)
    expected = _outcome(full, full_runs)
    assert all(state in ("success", "failed") for state in expected[0]), expected

    incremental = make_hub({"dags.py": DAGS})
    if mini:
        # The executor decides a finished task's downstream as it records it.
        incremental.executor.mini_scheduler = incremental.scheduler
    # The first pass makes the runs' first decisions, as after a trigger in the hub.
    runs_made = [_trigger(incremental, dag_id) for _ in range(runs)]
    passes = _settle_incrementally(incremental)
    assert _outcome(incremental, runs_made) == expected
    assert passes > 0


def test_a_finished_instance_admits_one_waiting_for_a_slot_at_once(make_hub: Any) -> None:
    # max_active_tasks=1: each finished instance frees the slot the next one
    # waits for; no full pass (every interval) is needed to admit it.
    hub = make_hub({"dags.py": DAGS})
    run_pk = _trigger(hub, "narrow")
    _settle_incrementally(hub)
    assert {ti.task_id: str(ti.state) for ti in hub.tis(run_pk)} == {"w0": "success", "w1": "success", "w2": "success", "w3": "success", "end": "success"}


def test_a_pass_after_an_event_reads_only_the_changed_tasks(make_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # A chain's link finished: the next pass reads that link's and the next
    # link's rows, not the whole run's.
    hub = make_hub({"dags.py": DAGS})
    read: list[int] = []
    collect = type(hub.scheduler)._collect

    def counting(rows: Any, *args: Any) -> None:
        rows = list(rows)
        read.append(len(rows))
        collect(rows, *args)

    monkeypatch.setattr(type(hub.scheduler), "_collect", staticmethod(counting))
    run_pk = _trigger(hub, "chain")
    _settle_incrementally(hub)
    assert {str(ti.state) for ti in hub.tis(run_pk)} == {"success"}
    assert read[0] == 6  # the triggered run, whole
    assert max(read[1:]) <= 2, read


def test_the_executor_queues_the_next_link_as_it_records_a_finished_one(make_hub: Any) -> None:
    # With the mini scheduler, a chain needs no scheduler pass after its start:
    # each recorded link queues the next in the same transaction.
    hub = make_hub({"dags.py": DAGS})
    hub.executor.mini_scheduler = hub.scheduler
    run_pk = _trigger(hub, "chain")
    hub.scheduler.tick(full=False, dirty=hub.scheduler._take_dirty())
    finished: list[dict[str, Any]] = []
    hub.scheduler.events.subscribe(ev.RUN_FINISHED, lambda _n, data: finished.append(data))
    while hub.hub_queue:
        hub.executor.run_inline(hub.hub_queue.pop(0))
    assert {str(ti.state) for ti in hub.tis(run_pk)} == {"success"}
    assert finished and finished[0]["run_pk"] == run_pk and finished[0]["state"] == "success"
    assert hub.scheduler._take_dirty().empty()  # nothing was left for a pass


def test_a_failing_mini_scheduler_leaves_the_decision_to_the_next_pass(make_hub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = make_hub({"dags.py": DAGS})
    hub.executor.mini_scheduler = hub.scheduler
    run_pk = _trigger(hub, "chain")
    hub.scheduler.tick(full=False, dirty=hub.scheduler._take_dirty())
    calls = []

    def broken(*args: Any) -> Any:
        calls.append(args)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(type(hub.scheduler), "_advance_runs", lambda self, *a: broken(*a), raising=True)
    hub.executor.run_inline(hub.hub_queue.pop(0))
    monkeypatch.undo()
    assert calls
    states = {ti.task_id: str(ti.state) for ti in hub.tis(run_pk)}
    assert states["link_0"] == "success" and states["link_1"] == "none"  # recorded; nothing half-decided
    _settle_incrementally(hub)  # the event (not marked decided) lets a pass do it
    assert {str(ti.state) for ti in hub.tis(run_pk)} == {"success"}
