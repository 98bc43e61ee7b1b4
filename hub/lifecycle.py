"""How a task instance's try ends: success, failure, or a retry later.

One place for the rule, used by result ingestion (agent tasks) and by the
hub-task executor. The decision and what it causes commit together: the
retry time (``retry_delay``, or Airflow's exponential backoff with jitter
capped by ``max_retry_delay``) and the ``CallbackRequest`` rows of the
task's ``on_success_callback`` / ``on_retry_callback`` /
``on_failure_callback``, written in the caller's transaction so a crash
cannot decide a task and lose its callback.
"""

from __future__ import annotations

import hashlib
import math
import threading
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, object_session

from hub.asset_events import record_outlets
from hub.models import Assignment, CallbackRequest, Dag, DagRun, DagVersion, Decision, OutboxMessage, TaskInstance
from shared.conflicts import AUTOMATIC_KINDS
from shared.envelope import Envelope, encode
from shared.hlc import HybridClock
from shared.messages import Cancel
from shared.states import RunState, TaskState
from shared.topics import assign_topic

#: Assignment states in which the agent may still be working on it.
OPEN_ASSIGNMENT_STATES = ("pending", "sent", "accepted", "started")

#: Airflow's ceiling for an exponential retry delay (core.max_task_retry_delay): a day.
MAX_RETRY_DELAY = 86400.0

#: Set in ``session.info`` when a callback request was added in that session,
#: so the caller can announce ``CALLBACKS_REQUESTED`` after its commit.
CALLBACKS_FLAG = "outpost_callbacks_requested"

#: CallbackRequest kinds, and the callback attribute each one calls.
TASK_CALLBACK_KINDS = {
    "task_success": "on_success_callback", "task_retry": "on_retry_callback", "task_failure": "on_failure_callback",
    # Hub tasks call on_execute_callback in their worker; agent tasks get a request when the device starts them.
    "task_execute": "on_execute_callback",
}
DAG_CALLBACK_KINDS = {"dag_success": "on_success_callback", "dag_failure": "on_failure_callback", "sla_miss": "sla_miss_callback"}

_STATE_CALLBACK = {TaskState.SUCCESS: "task_success", TaskState.UP_FOR_RETRY: "task_retry", TaskState.FAILED: "task_failure", TaskState.RUNNING: "task_execute"}


def finish_try(ti: TaskInstance, *, success: bool, now: datetime, output: Any = None, error: dict[str, Any] | None = None) -> TaskState:
    """Record the outcome of ``ti``'s current try and return its new state.

    A failure is retried when tries are left and the error does not say
    ``retryable: false`` (a job that can never succeed, such as an unknown
    job type, is not retried)."""
    ti.ended_at = now
    session = object_session(ti)
    task = task_spec(session, ti) if session is not None else {}
    if success:
        ti.state = TaskState.SUCCESS
        ti.output = output
        ti.error = None
    else:
        ti.error = error or {"code": "failed", "message": "the task failed"}
        retryable = bool((error or {}).get("retryable", True))
        if retryable and ti.try_number < ti.max_tries:
            ti.state = TaskState.UP_FOR_RETRY
            delay = retry_delay_seconds(
                ti.key, ti.try_number, ti.retry_delay,
                exponential=bool(task.get("retry_exponential_backoff")), max_retry_delay=task.get("max_retry_delay"),
            )
            ti.next_try_at = now + timedelta(seconds=delay)
        else:
            ti.state = TaskState.FAILED
    state = TaskState(ti.state)
    if session is not None:
        task_callback(session, ti, state, now, task)
        if state == TaskState.SUCCESS and task.get("outlets"):
            # Committed with the success itself: DAGs scheduled on these
            # assets see the update exactly when the success is recorded.
            record_outlets(session, ti, list(task["outlets"]), now)
    return state


def retry_delay_seconds(key: str, try_number: int, retry_delay: float, *, exponential: bool = False, max_retry_delay: float | None = None) -> float:
    """Seconds before the next try after try ``try_number`` failed.

    Without backoff: ``retry_delay``. With ``retry_exponential_backoff``
    (Airflow's formula): at least ``retry_delay * 2**(try_number - 1)``
    (rounded up, at least 1 s) plus a jitter below that much again, taken
    from a hash of the instance and try so it is the same on every hub;
    at most a day, and at most ``max_retry_delay`` when set."""
    if not exponential:
        delay = float(retry_delay)
    else:
        # Cap the exponent: past 2**60 the day-long ceiling applies anyway.
        min_backoff = max(1, math.ceil(float(retry_delay) * 2 ** min(max(try_number - 1, 0), 60)))
        jitter = int(hashlib.sha1(f"{key}#{try_number}".encode()).hexdigest(), 16) % min_backoff
        delay = min(float(min_backoff + jitter), MAX_RETRY_DELAY)
    if max_retry_delay is not None and exponential:
        delay = min(delay, float(max_retry_delay))
    return delay


def task_callback(session: Session, ti: TaskInstance, state: TaskState, now: datetime, task: dict[str, Any] | None = None, reason: str | None = None) -> CallbackRequest | None:
    """Record the callback the task has for reaching ``state``, if any."""
    kind = _STATE_CALLBACK.get(state)
    if kind is None:
        return None
    task = task if task is not None else task_spec(session, ti)
    if TASK_CALLBACK_KINDS[kind] not in (task.get("callbacks") or ()):
        return None
    run = session.get(DagRun, ti.run_pk)
    payload: dict[str, Any] = {"reason": reason or str(state), "try_number": ti.try_number, "map_index": ti.map_index}
    if ti.error:
        payload["exception"] = ti.error
    request = CallbackRequest(
        kind=kind, dag_id=ti.dag_id, run_pk=ti.run_pk, ti_id=ti.id, task_id=ti.task_id,
        dag_version_id=run.dag_version_id if run is not None else None, payload=payload, created_at=now, attempts=0,
    )
    session.add(request)
    session.info[CALLBACKS_FLAG] = True
    return request


def dag_callback(session: Session, run: DagRun, kind: str, now: datetime, payload: dict[str, Any], dag: dict[str, Any] | None = None) -> CallbackRequest | None:
    """Record a DAG-level callback (``dag_success``, ``dag_failure``,
    ``sla_miss``) if the DAG defines it."""
    dag = dag if dag is not None else dag_spec(session, run)
    if DAG_CALLBACK_KINDS[kind] not in (dag.get("callbacks") or ()):
        return None
    request = CallbackRequest(
        kind=kind, dag_id=run.dag_id, run_pk=run.id, ti_id=None, task_id=None,
        dag_version_id=run.dag_version_id, payload=payload, created_at=now, attempts=0,
    )
    session.add(request)
    session.info[CALLBACKS_FLAG] = True
    return request


# --- the structure a run follows --------------------------------------------

_cache: dict[tuple[Any, ...], tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 256


def task_spec(session: Session, ti: TaskInstance) -> dict[str, Any]:
    """The serialized task ``ti`` follows (its run's DAG version), or {}."""
    run = ti.run if "run" in ti.__dict__ else session.get(DagRun, ti.run_pk)
    if run is None:
        return {}
    return _structure(session, run)[1].get(ti.task_id, {})


def dag_spec(session: Session, run: DagRun) -> dict[str, Any]:
    """The serialized DAG ``run`` follows (without its tasks)."""
    return _structure(session, run)[0]


def tasks_spec(session: Session, run: DagRun) -> dict[str, dict[str, Any]]:
    """The serialized tasks of ``run``'s DAG version, by task id."""
    return _structure(session, run)[1]


def current_dag_spec(session: Session, dag_id: str) -> dict[str, Any]:
    """The serialized DAG (without tasks) as last parsed: DAG-wide limits
    such as ``max_active_runs`` follow the DAG's current file, as in Airflow."""
    row = session.execute(select(Dag.latest_version_id, Dag.last_parsed_at).where(Dag.dag_id == dag_id)).first()
    if row is None:
        return {}
    return _lookup(session, dag_id, row.latest_version_id, row.last_parsed_at)[0]


def _structure(session: Session, run: DagRun) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    stamp = None if run.dag_version_id is not None else session.scalar(select(Dag.last_parsed_at).where(Dag.dag_id == run.dag_id))
    return _lookup(session, run.dag_id, run.dag_version_id, stamp)


def _lookup(session: Session, dag_id: str, version_id: int | None, stamp: datetime | None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    # A DAG version never changes, so it is parsed once per process; without
    # one (runs made before versions), the DAG row, once per parse. Keyed by
    # database too: one process may serve several (tests do).
    db = str(session.get_bind().engine.url)
    if version_id is not None:
        key: tuple[Any, ...] = (db, "version", version_id)
        found = _cache.get(key)
        return found or _remember(key, session.scalar(select(DagVersion.structure).where(DagVersion.id == version_id)) or {})
    key = (db, "dag", dag_id, stamp)
    found = _cache.get(key)
    return found or _remember(key, session.scalar(select(Dag.structure).where(Dag.dag_id == dag_id)) or {})


def _remember(key: tuple[Any, ...], structure: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    tasks = {t["task_id"]: t for t in structure.get("tasks", []) if isinstance(t, dict) and "task_id" in t}
    dag = {k: v for k, v in structure.items() if k != "tasks"}
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:
            _cache.pop(next(iter(_cache)))
        _cache[key] = (dag, tasks)
    return dag, tasks


# --- stopping work an operator or a deadline took back ------------------------


def cancel_assignments(session: Session, ti_ids: list[int], now: datetime, hlc: HybridClock, reason: str, *, decision: str | None = None) -> int:
    """Cancel the open assignments of these task instances: each becomes
    ``cancelled`` and a Cancel message goes to its agent through the outbox,
    in the caller's transaction. A result that still arrives for one is
    kept and goes through the conflict rule (``hub.reconcile``).

    ``decision`` (or a ``reason`` that is itself one of
    ``shared.conflicts.AUTOMATIC_KINDS``, such as "offline_grace") makes
    each cancelled try an automatic give-up, recorded in ``decisions``
    with its HLC stamp. Returns how many."""
    if not ti_ids:
        return 0
    kind = decision or (reason if reason in AUTOMATIC_KINDS else None)
    if kind is not None and kind not in AUTOMATIC_KINDS:
        raise ValueError(f"decision {kind!r} is not one of {sorted(AUTOMATIC_KINDS)}")
    open_ = list(session.scalars(select(Assignment).where(Assignment.ti_id.in_(ti_ids), Assignment.state.in_(OPEN_ASSIGNMENT_STATES))))
    for assignment in open_:
        assignment.state, assignment.finished_at = "cancelled", now
        stamp = hlc.now()
        payload = encode(Envelope(Cancel(assignment.id, reason[:200]), sender="hub", hlc=stamp))
        session.add(OutboxMessage(topic=assign_topic(assignment.agent_id), payload=payload, qos=1, retain=False, assignment_id=None, created_at=now, attempts=0))
        if kind is not None:
            session.add(Decision(
                ti_id=assignment.ti_id, try_number=assignment.try_number, source="hub", kind=kind, agent_id=assignment.agent_id,
                assignment_id=assignment.id, reason=reason[:2000], hlc=str(stamp), created_at=now,
            ))
    return len(open_)


def record_operator_action(
    session: Session, tis: list[TaskInstance], kind: str, now: datetime, hlc: HybridClock, *,
    state: str | None = None, actor: str = "operator", reason: str = "",
) -> None:
    """Record an operator's ``mark`` / ``cancel`` / ``clear`` of these
    agent task instances (hub tasks have no device to disagree with),
    stamped, in the caller's transaction. The action covers each instance's
    tries up to its current one (``shared.conflicts`` rule R1), so call it
    before a clear moves the instance on."""
    for ti in tis:
        if ti.kind != "agent":
            continue
        session.add(Decision(
            ti_id=ti.id, try_number=ti.try_number, source="operator", kind=kind, state=state, actor=actor[:128],
            reason=reason[:2000], hlc=str(hlc.now()), created_at=now,
        ))


def abandon_try(session: Session, ti: TaskInstance, now: datetime, hlc: HybridClock, kind: str, message: str) -> TaskState:
    """The hub gives up ``ti``'s current try without a result from its
    device (``kind``: "offline_grace", "execution_timeout"): its open
    assignments are cancelled, the give-up is recorded as an automatic
    decision, and the try ends as a retryable failure (retried while tries
    are left). A success the device reports later still wins (rule R2)."""
    cancel_assignments(session, [ti.id], now, hlc, kind, decision=kind)
    return finish_try(ti, success=False, now=now, error={"code": kind, "message": message, "retryable": True})


def reset_for_rerun(ti: TaskInstance, retries: int) -> None:
    """Put an instance back to ``none`` with its try history kept: its next
    try gets the next try number, with ``retries`` more after it (clear)."""
    ti.max_tries = ti.try_number + retries + 1
    ti.state = TaskState.NONE
    ti.next_try_at = ti.queued_at = ti.started_at = ti.ended_at = None
    ti.sensor_started_at = None
    ti.output = ti.error = None
    ti.pid = None


def reopen_run(run: DagRun) -> bool:
    """A finished run goes back to ``queued`` with ``clear_number`` one
    higher, to start again when ``max_active_runs`` allows (Airflow's rule
    for a cleared run); a queued or running one carries on. True if it
    was re-opened."""
    if run.state not in (RunState.SUCCESS, RunState.FAILED):
        return False
    run.state, run.ended_at, run.started_at = RunState.QUEUED, None, None
    run.clear_number += 1
    return True
