"""Operator actions: the writes both the REST API and the dashboard perform.

They live here, below ``hub.api`` and ``hub.web`` (siblings that must not
import each other), so the rule "commit first, then emit the event" is
written once. Each function runs its own transaction.
"""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub import events as ev
from hub.admission import OCCUPYING
from hub.auth.roles import Actor
from hub.db import for_update, transaction
from hub.errors import Conflict, DagNotFound, InvalidRequest, PoolNotFound, RunNotFound
from hub.lifecycle import cancel_assignments, record_operator_action, reopen_run, reset_for_rerun, tasks_spec
from hub.models import Dag, DagRun, Pool, TaskInstance
from hub.scheduler import start_queued_runs, trigger_run
from hub.scheduling_options import DEFAULT_POOL
from shared.clock import Clock, utcnow
from shared.hlc import HybridClock
from shared.states import FINISHED, RunState, TaskState

_POOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,256}$")


def _audit(session: Session, by: Actor | None, action: str, target: str, now: Any, **detail: Any) -> None:
    """Record the action in the audit log, in its own transaction, when a
    person did it (``by``); the hub's own changes are not audited here."""
    if by is not None:
        audit.record(session, by.actor, action, target, at=now, remote=by.remote, **({"via": by.via} if by.via else {}), **detail)


def trigger(sessions: sessionmaker[Session], bus: ev.EventBus, clock: Clock, dag_id: str, conf: dict[str, Any], *, by: Actor | None = None) -> int:
    """Create a manual run of ``dag_id`` and return its ``run_pk``.

    The run and its task instances are committed before ``RUN_TRIGGERED``
    is emitted, so the scheduler it wakes always finds them. Raises
    ``DagNotFound`` or ``InvalidRequest`` (from the scheduler)."""
    with transaction(sessions) as session:
        now = utcnow(clock)
        run_pk = trigger_run(session, dag_id, conf, now, run_type="manual").id
        _audit(session, by, "run.trigger", dag_id, now, run_pk=run_pk, conf_keys=sorted(conf)[:50])
    bus.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
    return run_pk


def set_paused(sessions: sessionmaker[Session], dag_id: str, is_paused: bool, *, by: Actor | None = None, clock: Clock | None = None) -> None:
    """Pause or unpause a DAG. As in Airflow, the scheduler creates no
    scheduled runs of a paused DAG, starts none of its queued runs and no
    new task instances of its running runs. It reads the flag on its next
    tick, so no event is needed."""
    with transaction(sessions) as session:
        dag = session.get(Dag, dag_id)
        if dag is None:
            raise DagNotFound(f"DAG {dag_id!r} not found; list DAGs with GET /api/v1/dags")
        dag.is_paused = is_paused
        _audit(session, by, "dag.pause" if is_paused else "dag.unpause", dag_id, utcnow(clock))


# --- operator actions on runs and task instances ------------------------------

#: States ``only_failed`` clears (Airflow's).
_FAILED_STATES = (TaskState.FAILED, TaskState.UPSTREAM_FAILED)
MARKABLE = (TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED)


def clear(
    sessions: sessionmaker[Session], bus: ev.EventBus, clock: Clock, run_pk: int, *,
    task_ids: list[str] | None = None, map_indexes: list[int] | None = None,
    include_downstream: bool = False, include_upstream: bool = False, only_failed: bool = False, dry_run: bool = False,
    actor: str = "operator", by: Actor | None = None,
) -> list[dict[str, Any]]:
    """Clear task instances of a run so they run again (Airflow's "clear").

    ``task_ids`` None means every task (a rerun of the whole run). Each
    cleared instance goes back to state ``none`` with its try history kept:
    its next try gets the next try number, and it gets its task's retries
    again (``max_tries`` = tries so far + retries + 1). Work still open on
    an agent is cancelled, so a late result cannot decide the new try. A
    finished run goes back to queued and starts again (as soon as
    ``max_active_runs`` allows) with ``clear_number`` one higher; a queued
    or running one just carries on (Airflow's rule). Returns the instances
    it cleared (``dry_run``: would clear) as ``{id, task_id, map_index, state}``."""
    now = utcnow(clock)
    with transaction(sessions) as session:
        run, tasks, chosen = _select(session, run_pk, task_ids, map_indexes, include_downstream, include_upstream)
        if only_failed:
            chosen = [ti for ti in chosen if ti.state in _FAILED_STATES]
        affected = [_brief(ti) for ti in chosen]
        if dry_run or not chosen:
            return affected
        record_operator_action(session, chosen, "clear", now, _hlc(clock), actor=by.actor if by else actor, reason="cleared")
        _audit(session, by, "run.clear" if task_ids else "run.rerun", f"run:{run_pk}", now, dag_id=run.dag_id, task_ids=sorted({ti.task_id for ti in chosen}), count=len(chosen))
        cancel_assignments(session, [ti.id for ti in chosen if ti.kind == "agent"], now, _hlc(clock), "the task instance was cleared")
        for ti in chosen:
            reset_for_rerun(ti, int((tasks.get(ti.task_id) or {}).get("retries", max(ti.max_tries - 1, 0))))
        if reopen_run(run):
            start_queued_runs(session, now, {run.dag_id})
        dag_id = run.dag_id
    bus.emit(ev.OUTBOX_WRITTEN)
    bus.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
    return affected


def mark(
    sessions: sessionmaker[Session], bus: ev.EventBus, clock: Clock, run_pk: int, state: str, *,
    task_ids: list[str], map_indexes: list[int] | None = None, include_downstream: bool = False, include_upstream: bool = False,
    actor: str = "operator", by: Actor | None = None,
) -> list[dict[str, Any]]:
    """Set task instances to ``success``, ``failed`` or ``skipped`` by hand
    (Airflow's "mark success/failed"), optionally with their downstream (or
    upstream) tasks. No try is used and no callback runs; open work on
    agents is cancelled. In a running run the scheduler carries on from the
    new states; a finished run keeps its state. Returns the instances
    changed, with their state before."""
    try:
        target = TaskState(state)
    except ValueError:
        target = None
    if target not in MARKABLE:
        raise InvalidRequest(f"state must be one of {', '.join(MARKABLE)}, got {state!r}")
    if not task_ids:
        raise InvalidRequest("name at least one task_id to mark")
    now = utcnow(clock)
    with transaction(sessions) as session:
        run, _tasks, chosen = _select(session, run_pk, task_ids, map_indexes, include_downstream, include_upstream)
        chosen = [ti for ti in chosen if ti.state != target]
        affected = [_brief(ti) for ti in chosen]
        record_operator_action(session, chosen, "mark", now, _hlc(clock), state=str(target), actor=by.actor if by else actor, reason=f"marked {target}")
        _audit(session, by, "task.mark", f"run:{run_pk}", now, dag_id=run.dag_id, state=str(target), task_ids=sorted({ti.task_id for ti in chosen}), count=len(chosen))
        cancel_assignments(session, [ti.id for ti in chosen if ti.kind == "agent"], now, _hlc(clock), f"the task instance was marked {target}")
        for ti in chosen:
            ti.state, ti.next_try_at = target, None
            ti.ended_at = now
            if ti.started_at is None:
                ti.started_at = now
        dag_id = run.dag_id
    if affected:
        bus.emit(ev.OUTBOX_WRITTEN)
        bus.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
    return affected


def _select(
    session: Session, run_pk: int, task_ids: list[str] | None, map_indexes: list[int] | None, downstream: bool, upstream: bool,
) -> tuple[DagRun, dict[str, dict[str, Any]], list[TaskInstance]]:
    """The run (locked), its tasks and the chosen instances. Unknown task
    ids are an error naming them."""
    run = session.scalar(for_update(select(DagRun).where(DagRun.id == run_pk), session))
    if run is None:
        raise RunNotFound(f"run {run_pk} not found; list runs with GET /api/v1/runs")
    tasks = tasks_spec(session, run)
    instances = list(session.scalars(for_update(select(TaskInstance).where(TaskInstance.run_pk == run_pk).order_by(TaskInstance.id), session)))
    present = {ti.task_id for ti in instances}
    if task_ids is None:
        wanted = present
    else:
        unknown = sorted(set(task_ids) - present)
        if unknown:
            raise InvalidRequest(f"run {run_pk} has no task {', '.join(repr(t) for t in unknown)}; its tasks: {', '.join(sorted(present))}")
        wanted = set(task_ids)
        if downstream:
            wanted |= _reachable(tasks, wanted, down=True)
        if upstream:
            wanted |= _reachable(tasks, wanted, down=False)
    named = set(task_ids or ())
    chosen = [
        ti for ti in instances
        if ti.task_id in wanted and (map_indexes is None or ti.task_id not in named or ti.map_index in map_indexes)
    ]
    return run, tasks, chosen


def _reachable(tasks: dict[str, dict[str, Any]], start: set[str], *, down: bool) -> set[str]:
    edges: dict[str, set[str]] = {t: set() for t in tasks}
    for task_id, task in tasks.items():
        for up in task.get("upstream", ()):
            if down:
                edges.setdefault(up, set()).add(task_id)
            else:
                edges.setdefault(task_id, set()).add(up)
    seen: set[str] = set()
    stack = list(start)
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _brief(ti: TaskInstance) -> dict[str, Any]:
    return {"id": ti.id, "task_id": ti.task_id, "map_index": ti.map_index, "state": str(ti.state), "try_number": ti.try_number}


_clocks: dict[int, tuple[Clock, HybridClock]] = {}


def _hlc(clock: Clock) -> HybridClock:
    # Stamps for Cancel messages and operator decisions written by the API
    # process. One per clock, so this process's stamps never go backwards:
    # the conflict rule orders operator actions by them.
    found = _clocks.get(id(clock))
    if found is None or found[0] is not clock:
        found = _clocks[id(clock)] = (clock, HybridClock("hub", lambda: int(clock.now() * 1000)))
    return found[1]


# --- pools --------------------------------------------------------------------


def set_pool(sessions: sessionmaker[Session], name: str, slots: int, description: str | None = None, *, create_only: bool = False) -> None:
    """Create or change a pool. ``slots`` -1 means unlimited. Lowering the
    slots never stops running work: new work waits until it fits."""
    if not isinstance(name, str) or not _POOL_NAME.fullmatch(name):
        raise InvalidRequest(f"invalid pool name {name!r}: use letters, digits, '_', '.', '-' (max 256)")
    if slots < -1:
        raise InvalidRequest(f"slots must be -1 (unlimited) or at least 0, got {slots}")
    with transaction(sessions) as session:
        pool = session.get(Pool, name)
        if pool is not None and create_only:
            raise Conflict(f"pool {name!r} already exists; change it with PATCH /api/v1/pools/{name}")
        if pool is None:
            pool = Pool(name=name, slots=slots, description=description or "")
            session.add(pool)
        pool.slots = slots
        if description is not None:
            pool.description = description


def delete_pool(sessions: sessionmaker[Session], name: str) -> None:
    """Delete a pool; ``default_pool`` cannot be deleted (Airflow's rule),
    nor a pool that task instances hold slots of right now."""
    if name == DEFAULT_POOL:
        raise InvalidRequest("default_pool cannot be deleted; set its slots instead")
    with transaction(sessions) as session:
        pool = session.get(Pool, name)
        if pool is None:
            raise PoolNotFound(f"pool {name!r} not found; list pools with GET /api/v1/pools")
        busy = session.scalar(select(func.count()).select_from(TaskInstance).where(TaskInstance.pool == name, TaskInstance.state.in_([str(s) for s in OCCUPYING])))
        if busy:
            raise Conflict(f"pool {name!r} has {busy} task instance(s) queued or running; delete it when they are done")
        session.delete(pool)


def set_run_state(
    sessions: sessionmaker[Session], bus: ev.EventBus, clock: Clock, run_pk: int, state: str, *, actor: str = "operator", by: Actor | None = None,
) -> list[dict[str, Any]]:
    """Mark a whole run ``success`` or ``failed`` by hand (Airflow's "mark
    DAG run as success/failed"). Success: every unfinished task instance
    becomes ``success``. Failed: running ones become ``failed`` and those
    not started yet ``skipped``. Open work on agents is cancelled; no
    callback runs. Returns the instances changed, with their state before."""
    if state not in (RunState.SUCCESS, RunState.FAILED):
        raise InvalidRequest(f"a run can be marked success or failed, not {state!r}")
    now = utcnow(clock)
    with transaction(sessions) as session:
        run, _tasks, instances = _select(session, run_pk, None, None, False, False)
        unfinished = [ti for ti in instances if ti.state not in FINISHED]
        affected = [_brief(ti) for ti in unfinished]
        cancel_assignments(session, [ti.id for ti in unfinished if ti.kind == "agent"], now, _hlc(clock), f"the run was marked {state}")
        for ti in unfinished:
            if state == RunState.SUCCESS:
                new_state = TaskState.SUCCESS
            else:
                new_state = TaskState.FAILED if ti.state in _STARTED else TaskState.SKIPPED
            record_operator_action(
                session, [ti], "mark" if state == RunState.SUCCESS else "cancel", now, _hlc(clock), state=str(new_state), actor=by.actor if by else actor,
                reason=f"the run was marked {state}",
            )
            ti.state = new_state
            ti.ended_at, ti.next_try_at = now, None
        run.state, run.ended_at = RunState(state), now
        dag_id = run.dag_id
        _audit(session, by, "run.mark", f"run:{run_pk}", now, dag_id=dag_id, state=state, count=len(unfinished))
        start_queued_runs(session, now, {dag_id})  # it may have held a max_active_runs slot
    bus.emit(ev.OUTBOX_WRITTEN)
    bus.emit(ev.RUN_FINISHED, dag_id=dag_id, run_pk=run_pk, state=state)
    return affected


#: Instances that ``set_run_state(failed)`` fails rather than skips: they had started.
_STARTED = (TaskState.RUNNING, TaskState.DELIVERED, TaskState.DEVICE_OFFLINE)
