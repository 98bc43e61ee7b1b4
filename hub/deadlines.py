"""SLA misses and run timeouts, checked on every full scheduler pass.

- A task with ``sla`` that has not succeeded (or been skipped) by its
  run's ``data_interval_end`` (the logical date when the run has no data
  interval) plus ``sla`` misses its SLA. The miss is recorded once in
  ``deadline_misses`` (kind ``task_sla``), announced as a
  ``deadline_missed`` event, and the DAG's ``sla_miss_callback`` is
  requested (one request per run and pass, naming every task that missed).
  The task keeps running: an SLA is an alert, not a limit.
- A run still running ``dagrun_timeout`` after it started is failed, as in
  Airflow: its unfinished task instances become ``skipped``, work sent to
  agents is cancelled, the miss is recorded (kind ``dagrun_timeout``) and
  the DAG's ``on_failure_callback`` is requested with reason ``timed_out``.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub import events as ev
from hub.db import skip_locked
from hub.lifecycle import cancel_assignments, dag_callback, dag_spec, tasks_spec
from hub.models import DagRun, DeadlineMiss, TaskInstance
from shared.hlc import HybridClock
from shared.states import FINISHED, RunState, TaskState

_SLA_MET = (TaskState.SUCCESS, TaskState.SKIPPED)


def check_deadlines(session: Session, now: datetime, emitted: list[tuple[str, dict[str, Any]]], hlc: HybridClock) -> bool:
    """Record new misses and time out overdue runs, in the caller's
    transaction; the events to send after its commit go into ``emitted``.
    Returns True if anything changed."""
    runs = list(session.scalars(skip_locked(select(DagRun).where(DagRun.state.in_([RunState.RUNNING, RunState.QUEUED])), session)))
    changed = False
    for run in runs:
        changed |= _time_out(session, run, now, emitted, hlc) or _task_slas(session, run, now, emitted)
    return changed


def _time_out(session: Session, run: DagRun, now: datetime, emitted: list[tuple[str, dict[str, Any]]], hlc: HybridClock) -> bool:
    timeout = dag_spec(session, run).get("dagrun_timeout")
    if timeout is None or run.state != RunState.RUNNING or run.started_at is None:
        return False
    deadline = run.started_at + timedelta(seconds=float(timeout))
    if deadline >= now:
        return False
    unfinished = list(session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run.id, TaskInstance.state.not_in([str(s) for s in FINISHED]))))
    cancel_assignments(session, [ti.id for ti in unfinished if ti.kind == "agent"], now, hlc, "the run timed out (dagrun_timeout)", decision="deadline")
    for ti in unfinished:
        ti.state, ti.ended_at, ti.next_try_at = TaskState.SKIPPED, now, None
    run.state, run.ended_at = RunState.FAILED, now
    description = f"run {run.run_id} of {run.dag_id} was still running {_span(float(timeout))} after it started (dagrun_timeout); failed, {len(unfinished)} unfinished task instance(s) skipped"
    _record(session, run, "", "dagrun_timeout", deadline, now, description, emitted)
    if dag_callback(session, run, "dag_failure", now, {"reason": "timed_out", "deadline": deadline.isoformat()}):
        emitted.append((ev.CALLBACKS_REQUESTED, {"dag_id": run.dag_id, "run_pk": run.id}))
    emitted.append((ev.RUN_FINISHED, {"dag_id": run.dag_id, "run_pk": run.id, "state": str(run.state)}))
    return True


def _task_slas(session: Session, run: DagRun, now: datetime, emitted: list[tuple[str, dict[str, Any]]]) -> bool:
    slas = {task_id: float(t["sla"]) for task_id, t in tasks_spec(session, run).items() if t.get("sla") is not None}
    if not slas:
        return False
    anchor = run.data_interval_end or run.logical_date
    due = {task_id: anchor + timedelta(seconds=sla) for task_id, sla in slas.items() if anchor + timedelta(seconds=sla) < now}
    if not due:
        return False
    recorded = set(session.scalars(select(DeadlineMiss.task_id).where(DeadlineMiss.run_pk == run.id, DeadlineMiss.kind == "task_sla")))
    states: dict[str, list[str]] = defaultdict(list)
    for task_id, state in session.execute(select(TaskInstance.task_id, TaskInstance.state).where(TaskInstance.run_pk == run.id, TaskInstance.task_id.in_(list(due)))):
        states[task_id].append(state)
    missed = sorted(t for t in due if t not in recorded and states.get(t) and not all(s in _SLA_MET for s in states[t]))
    for task_id in missed:
        description = f"task {task_id} of run {run.run_id} had not succeeded {_span(slas[task_id])} after {'the end of its data interval' if run.data_interval_end else 'its logical date'} (sla)"
        _record(session, run, task_id, "task_sla", due[task_id], now, description, emitted)
    if missed:
        payload = {"reason": "sla_miss", "task_ids": missed, "deadlines": {t: due[t].isoformat() for t in missed}}
        if dag_callback(session, run, "sla_miss", now, payload):
            emitted.append((ev.CALLBACKS_REQUESTED, {"dag_id": run.dag_id, "run_pk": run.id}))
    return bool(missed)


def _record(session: Session, run: DagRun, task_id: str, kind: str, deadline: datetime, now: datetime, description: str, emitted: list[tuple[str, dict[str, Any]]]) -> None:
    # One row per run, task and kind: a run cleared after it timed out that
    # times out again updates its row (and alerts again).
    miss = session.scalar(select(DeadlineMiss).where(DeadlineMiss.run_pk == run.id, DeadlineMiss.task_id == task_id, DeadlineMiss.kind == kind))
    if miss is None:
        miss = DeadlineMiss(run_pk=run.id, dag_id=run.dag_id, run_id=run.run_id, task_id=task_id, kind=kind)
        session.add(miss)
    miss.deadline, miss.detected_at, miss.description, miss.notified_at = deadline, now, description, now
    emitted.append((ev.DEADLINE_MISSED, {"dag_id": run.dag_id, "run_pk": run.id, "run_id": run.run_id, "task_id": task_id, "kind": kind, "deadline": deadline.isoformat()}))


def _span(seconds: float) -> str:
    return f"{seconds:g} s" if seconds < 120 else str(timedelta(seconds=round(seconds)))
