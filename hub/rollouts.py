"""The staged-rollout engine: a fleet task with a ``Rollout`` policy.

When the scheduler first dispatches such a task (``start``), the target's
selector is taken over the whole registry (online and offline devices, not
revoked, with the job type): one ``rollouts`` row, and one task instance per
device (``map_index`` = its place in the order, pinned to the device) in
state ``deferred``, with a ``rollout_devices`` row each. The scheduler never
decides a ``deferred`` instance (it is neither waiting nor finished, so the
run stays open); only this module starts one, by assigning it
(``Dispatcher.assign``: ``queued``, a new try).

Every full scheduler pass calls ``advance_all``. For each rollout that is
not done it: syncs device states from their task instances (one join over
the devices not yet done); aborts when failed / finished devices exceeds
the failure threshold (no new device notified, pending ones ``skipped``
with ``rollout_aborted``, in-flight ones finish); gives up devices still
pending or offline at the deadline (``timed_out``: the instance is skipped,
not failed); fills the current batch with pending devices that are online,
in a maintenance window and under the per-group cap (an offline device is
passed over and joins whichever batch wants devices when it returns); and
moves to the next batch once ``success_threshold`` of the current one
succeeded. A batch that can no longer reach it fails the rollout. A retry
of a device's task is the scheduler's ordinary retry, on the same device.

Device states: pending, notified, succeeded, failed (its last try failed),
timed_out, skipped. Each pass reads per-rollout aggregates and light rows
of the devices it may notify, never every instance as an object.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.orm import Session, sessionmaker

from hub import audit, offline, templating
from hub import events as ev
from hub.auth.roles import Actor
from hub.db import skip_locked, transaction
from hub.dispatcher import Dispatcher
from hub.errors import Conflict, NotFound
from hub.lifecycle import cancel_assignments, tasks_spec
from hub.models import Agent, Dag, DagRun, RolloutDevice, RolloutRecord, TaskInstance
from hub.rollout_policy import Rollout
from hub.targeting import AgentView, Selector
from shared.clock import Clock, utcnow
from shared.errors import PayloadTooLarge
from shared.states import FINISHED, RunState, TaskState

PENDING, NOTIFIED, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED = "pending", "notified", "succeeded", "failed", "timed_out", "skipped"
DEVICE_STATES = (PENDING, NOTIFIED, SUCCEEDED, FAILED, TIMED_OUT, SKIPPED)
#: Rollout states in which it may still notify devices.
ACTIVE = ("running", "paused")
ROLLOUT_STATES = ("running", "paused", "aborted", "failed", "completed")
#: How a finished task instance counts for its device.
_BY_TI_STATE = {TaskState.SUCCESS: SUCCEEDED, TaskState.FAILED: FAILED, TaskState.UPSTREAM_FAILED: FAILED, TaskState.SKIPPED: SKIPPED, TaskState.REMOVED: SKIPPED}
_RD = RolloutDevice


class RolloutNotFound(NotFound):
    code = "rollout_not_found"


def selector_of(target: dict[str, Any]) -> Selector:
    return Selector.from_dict(target)


def select_fleet(target: dict[str, Any], fleet: list[AgentView]) -> list[AgentView]:
    """The fleet an every_agent() fan-out without a rollout chooses from:
    its selector's groups, hardware and firmware applied (labels are
    ``targeting.choose``'s)."""
    if not (target.get("groups") or target.get("hardware") or target.get("firmware")):
        return fleet
    selector = selector_of(target)
    return [v for v in fleet if selector.selects(v)]


# --- start -----------------------------------------------------------------------


def start(session: Session, ti: TaskInstance, task: dict[str, Any], fleet: list[AgentView], now: datetime,
          dispatcher: Dispatcher, emitted: list[tuple[str, dict[str, Any]]], by_task: dict[str, list[str]]) -> int:
    """Turn ``ti`` (the fleet task's one instance) into a rollout; returns
    how many devices were notified at once (the first batch's online ones)."""
    policy = Rollout.from_dict(task["rollout"])
    selector = selector_of(task.get("target") or {})
    job_type = ti.job_type or ""
    devices = sorted((v for v in fleet if not v.revoked and job_type in v.job_types and selector.selects(v)), key=lambda v: v.agent_id)
    if not devices:
        ti.state, ti.ended_at = TaskState.SKIPPED, now
        ti.error = {"code": "no_matching_agents", "message": "no registered device matched the rollout's selector", "retryable": False}
        return 0
    seed = None
    if policy.shuffle:
        seed = policy.seed if policy.seed is not None else zlib.crc32(f"{ti.dag_id}/{ti.run_id}/{ti.task_id}".encode())
        random.Random(seed).shuffle(devices)
    record = RolloutRecord(
        dag_id=ti.dag_id, run_pk=ti.run_pk, run_id=ti.run_id, task_id=ti.task_id, job_type=job_type, policy=policy.to_dict(),
        selector=selector.to_dict(), state="running", batch=0, total=len(devices), seed=seed, started_at=now,
        deadline=None if policy.deadline is None else now + timedelta(seconds=float(policy.deadline)), updated_at=now, actor="hub",
    )
    session.add(record)
    ti.map_index, ti.agent_id, ti.state = 0, devices[0].agent_id, TaskState.DEFERRED
    copied = {
        "run_pk": ti.run_pk, "dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "kind": ti.kind, "state": TaskState.DEFERRED,
        "try_number": 0, "max_tries": ti.max_tries, "retry_delay": ti.retry_delay, "execution_timeout": ti.execution_timeout,
        "job_type": ti.job_type, "params": dict(ti.params or {}), "rendered_fields": ti.rendered_fields, "pool": ti.pool,
        "pool_slots": ti.pool_slots, "priority_weight": ti.priority_weight, "operator": ti.operator,
    }
    if len(devices) > 1:
        # One INSERT for thousands of devices, not an object each.
        session.execute(insert(TaskInstance), [{**copied, "map_index": i, "agent_id": d.agent_id} for i, d in enumerate(devices[1:], start=1)])
    session.flush()
    ti_ids = dict(session.execute(select(TaskInstance.map_index, TaskInstance.id).where(TaskInstance.run_pk == ti.run_pk, TaskInstance.task_id == ti.task_id)).all())
    session.execute(insert(RolloutDevice), [
        {"rollout_id": record.id, "seq": i, "agent_id": d.agent_id, "ti_id": ti_ids[i], "groups": sorted(d.groups) or [""], "state": PENDING}
        for i, d in enumerate(devices)
    ])
    by_task[ti.task_id].extend([TaskState.DEFERRED] * (len(devices) - 1))
    _announce(emitted, record, "started")
    return advance(session, record, now, dispatcher, emitted)


def rejoin(session: Session, ti: TaskInstance, now: datetime, emitted: list[tuple[str, dict[str, Any]]]) -> bool:
    """A device instance of a rollout task is being dispatched again. A
    retry (its device is ``notified``) goes on to its device: False. A
    cleared one rejoins its rollout as pending, waiting for a batch again,
    and a rollout that had ended runs again: True."""
    device = session.scalar(select(RolloutDevice).where(RolloutDevice.ti_id == ti.id))
    if device is None or device.state == NOTIFIED:
        return False
    record = session.get(RolloutRecord, device.rollout_id)
    assert record is not None
    device.state, device.batch, device.notified_at, device.finished_at, device.error_code = PENDING, None, None, None, None
    ti.state = TaskState.DEFERRED
    if record.state not in ACTIVE:
        record.state, record.reason, record.finished_at, record.updated_at = "running", "devices were cleared: the rollout runs again", None, now
        _announce(emitted, record, "running")
    return True


# --- advance -----------------------------------------------------------------------


def advance_all(session: Session, now: datetime, dispatcher: Dispatcher, emitted: list[tuple[str, dict[str, Any]]]) -> bool:
    """One pass over every rollout not done yet; True if any changed."""
    changed = False
    # Locked for this pass: two schedulers never notify the same devices (PostgreSQL; hub.db.skip_locked).
    stmt = skip_locked(select(RolloutRecord).where(RolloutRecord.finished_at.is_(None)).order_by(RolloutRecord.id), session)
    for record in session.scalars(stmt):
        before = (record.state, record.batch, record.finished_at, record.updated_at)
        notified = advance(session, record, now, dispatcher, emitted)
        changed |= bool(notified) or before != (record.state, record.batch, record.finished_at, record.updated_at)
    return changed


def advance(session: Session, record: RolloutRecord, now: datetime, dispatcher: Dispatcher, emitted: list[tuple[str, dict[str, Any]]]) -> int:
    """Advance one rollout (see the module docstring); returns how many devices it notified."""
    policy = Rollout.from_dict(record.policy)
    if _sync(session, record, now):
        record.updated_at = now
    run_state, dag_paused = session.execute(
        select(DagRun.state, Dag.is_paused).outerjoin(Dag, Dag.dag_id == DagRun.dag_id).where(DagRun.id == record.run_pk)
    ).first() or (None, False)
    if record.state in ACTIVE:
        # A device revoked while it waited never gets the update.
        revoked = session.scalars(select(_RD.id).join(Agent, Agent.agent_id == _RD.agent_id).where(
            _RD.rollout_id == record.id, _RD.state == PENDING, Agent.revoked_at.is_not(None))).all()
        if revoked:
            _give_up(session, record, revoked, SKIPPED, "agent_revoked", "the device was revoked before it was notified", now)
            record.updated_at = now
        counts = device_counts(session, record.id)
        if run_state not in (RunState.RUNNING, RunState.QUEUED):
            stop(session, record, "aborted", f"the run ended ({run_state}) before the rollout did", now, emitted)
        elif policy.too_many_failures(counts[FAILED], counts[SUCCEEDED]):
            rate = counts[FAILED] / (counts[FAILED] + counts[SUCCEEDED])
            stop(session, record, "aborted", f"failure rate {rate:.1%} ({counts[FAILED]} of {counts[FAILED] + counts[SUCCEEDED]} finished) exceeds the threshold {policy.failure_threshold:.1%}", now, emitted)
        elif record.deadline is not None and now >= record.deadline:
            if _time_out(session, record, now, dispatcher):
                record.updated_at = now
    past_deadline = record.deadline is not None and now >= record.deadline
    # A paused DAG starts no new work (Airflow): its rollouts notify no device meanwhile.
    moving = record.state == "running" and not past_deadline and run_state == RunState.RUNNING and not dag_paused
    notified = _fill_and_gate(session, record, policy, now, dispatcher, emitted) if moving else 0
    if record.finished_at is None and not session.scalar(select(exists().where(_RD.rollout_id == record.id, _RD.state.in_([PENDING, NOTIFIED])))):
        if record.state in ACTIVE:
            record.state = "completed"
        record.finished_at = record.updated_at = now
        _announce(emitted, record, "finished")
    return notified


def _fill_and_gate(session: Session, record: RolloutRecord, policy: Rollout, now: datetime, dispatcher: Dispatcher, emitted: list[tuple[str, dict[str, Any]]]) -> int:
    """Notify devices for the current batch, then move on while batches pass."""
    in_window = policy.in_window(now)
    notified = 0
    for _ in range(64):  # batches passed in one pass (a pass picks up where this stops)
        target = policy.batch_target(record.batch, record.total)
        counts = Counter(dict(session.execute(
            select(_RD.state, func.count()).where(_RD.rollout_id == record.id, _RD.batch == record.batch).group_by(_RD.state)).all()))
        members = sum(counts.values())
        if members < target and in_window:
            added = _notify(session, record, policy, target - members, now, dispatcher, emitted)
            notified += added
            members += added
            counts[NOTIFIED] += added
        if members == 0:
            break
        # Short of its size, a batch waits for pending devices that are online
        # (held back by a window or the group cap); offline ones may never return.
        if members < target and _pending(session, record, online=True):
            break
        # Devices given up (timed out, skipped) are not the batch's verdict.
        judged = members - counts[TIMED_OUT] - counts[SKIPPED]
        if policy.batch_passed(counts[SUCCEEDED], judged):
            if not _pending(session, record, online=False):
                break
            was_canary = record.batch == 0 and policy.has_canary(record.total)
            record.batch += 1
            record.updated_at = now
            _announce(emitted, record, "batch")
            if was_canary and policy.pause_after_canary:
                record.state, record.reason = "paused", "paused after the canary: resume it to go on"
                _announce(emitted, record, "paused")
                break
            continue
        if counts[NOTIFIED] == 0 and judged > 0:
            needed = policy.needed_success
            stop(session, record, "failed", f"batch {record.batch}: {counts[SUCCEEDED]} of {judged} devices succeeded, below the success threshold {needed:.0%}", now, emitted)
        break
    return notified


def _online_pending() -> Any:
    return (
        select(_RD.id, _RD.agent_id, _RD.ti_id, _RD.groups)
        .join(Agent, Agent.agent_id == _RD.agent_id)
        .join(TaskInstance, TaskInstance.id == _RD.ti_id)
        .where(_RD.state == PENDING, TaskInstance.state == TaskState.DEFERRED, Agent.state == "online", Agent.revoked_at.is_(None))
        # Not to a device whose last heartbeat said it takes no new work (back-pressure).
        .where(~Agent.last_heartbeat["accepting"].as_boolean().is_(False))
    )


def _pending(session: Session, record: RolloutRecord, *, online: bool) -> bool:
    stmt = _online_pending().where(_RD.rollout_id == record.id) if online else select(_RD.id).where(_RD.rollout_id == record.id, _RD.state == PENDING)
    return session.execute(stmt.limit(1)).first() is not None


def _notify(session: Session, record: RolloutRecord, policy: Rollout, want: int, now: datetime, dispatcher: Dispatcher, emitted: list[tuple[str, dict[str, Any]]]) -> int:
    cap = policy.max_concurrent_per_group
    busy: Counter[str] = Counter()
    stmt = _online_pending().where(_RD.rollout_id == record.id).order_by(_RD.seq)
    if cap is None:
        stmt = stmt.limit(want)
    else:
        for (groups,) in session.execute(select(_RD.groups).where(_RD.rollout_id == record.id, _RD.state == NOTIFIED)):
            busy.update(groups or [""])
    chosen = []
    for row in session.execute(stmt):
        if len(chosen) >= want:
            break
        groups = row.groups or [""]
        if cap is not None and any(busy[g] >= cap for g in groups):
            continue
        busy.update(groups)
        chosen.append(row)
    if not chosen:
        return 0
    run = session.get(DagRun, record.run_pk)
    task = tasks_spec(session, run).get(record.task_id, {}) if run is not None else {}
    instances = {ti.id: ti for ti in session.scalars(select(TaskInstance).where(TaskInstance.id.in_([r.ti_id for r in chosen])))}
    for row in chosen:
        ti = instances[row.ti_id]
        try:
            not_before, deadline = offline.assignment_window(session, ti, task)
            dispatcher.assign(session, ti, row.agent_id, now, timeout=ti.execution_timeout, not_before=not_before, deadline=deadline)
        except (templating.TemplateError, PayloadTooLarge) as exc:
            # Counted as the device's failure at the next sync.
            ti.state, ti.ended_at = TaskState.FAILED, now
            ti.error = exc.as_error() if isinstance(exc, templating.TemplateError) else {"code": exc.code, "message": str(exc), "retryable": False}
    session.execute(update(_RD).where(_RD.id.in_([r.id for r in chosen])).values(state=NOTIFIED, batch=record.batch, notified_at=now),
                    execution_options={"synchronize_session": False})
    record.updated_at = now
    emitted.append((ev.OUTBOX_WRITTEN, {}))
    return len(chosen)


def _sync(session: Session, record: RolloutRecord, now: datetime) -> bool:
    """Devices whose task instance finished take its outcome."""
    session.flush()
    rows = session.execute(
        select(_RD.id, _RD.state, TaskInstance.state).join(TaskInstance, TaskInstance.id == _RD.ti_id)
        .where(_RD.rollout_id == record.id, _RD.state.in_([PENDING, NOTIFIED]), TaskInstance.state.in_([str(s) for s in FINISHED]))
    ).all()
    by_state: dict[str, list[int]] = {}
    for device_id, device_state, ti_state in rows:
        # Never notified (its instance marked or skipped from outside): it did not update.
        outcome = SKIPPED if device_state == PENDING else _BY_TI_STATE[TaskState(ti_state)]
        by_state.setdefault(outcome, []).append(device_id)
    for state, ids in by_state.items():
        session.execute(update(_RD).where(_RD.id.in_(ids)).values(state=state, finished_at=now), execution_options={"synchronize_session": False})
    return bool(rows)


def _give_up(session: Session, record: RolloutRecord, device_ids: Iterable[int] | None, state: str, code: str, message: str, now: datetime) -> int:
    """Skip the task instances of pending devices (all, or ``device_ids``)."""
    where = [_RD.rollout_id == record.id]
    where += [_RD.id.in_(list(device_ids))] if device_ids is not None else [_RD.state == PENDING]
    ti_ids = select(_RD.ti_id).where(*where)
    session.execute(
        update(TaskInstance).where(TaskInstance.id.in_(ti_ids), TaskInstance.state.not_in([str(s) for s in FINISHED]))
        .values(state=TaskState.SKIPPED, ended_at=now, next_try_at=None, error={"code": code, "message": message, "retryable": False}),
        execution_options={"synchronize_session": False},
    )
    result = session.execute(update(_RD).where(*where).values(state=state, error_code=code, finished_at=now), execution_options={"synchronize_session": False})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def _time_out(session: Session, record: RolloutRecord, now: datetime, dispatcher: Dispatcher) -> bool:
    """At the deadline: pending devices, and notified ones whose device is
    offline, are given up as timed_out (cancelled, not failed)."""
    message = f"the rollout's deadline ({record.deadline.isoformat() if record.deadline else ''}) passed before the device was done"
    waiting = (TaskState.QUEUED, TaskState.DEVICE_OFFLINE, TaskState.UP_FOR_RETRY, TaskState.SCHEDULED)
    away = session.execute(
        select(_RD.id, _RD.ti_id).join(TaskInstance, TaskInstance.id == _RD.ti_id).join(Agent, Agent.agent_id == _RD.agent_id)
        .where(_RD.rollout_id == record.id, _RD.state == NOTIFIED)
        .where((TaskInstance.state == TaskState.DEVICE_OFFLINE) | ((Agent.state != "online") & TaskInstance.state.in_([str(s) for s in waiting])))
    ).all()
    if away:
        cancel_assignments(session, [ti_id for _, ti_id in away], now, dispatcher.hlc, "the rollout's deadline passed")
    count = _give_up(session, record, [i for i, _ in away], TIMED_OUT, "rollout_timed_out", message, now) if away else 0
    return bool(count + _give_up(session, record, None, TIMED_OUT, "rollout_timed_out", message, now))


def stop(session: Session, record: RolloutRecord, state: str, reason: str, now: datetime, emitted: list[tuple[str, dict[str, Any]]], actor: str = "hub") -> None:
    """Abort or fail the rollout: no device is notified any more; pending
    ones are skipped; notified ones finish."""
    record.state, record.reason, record.updated_at, record.actor = state, reason, now, actor
    code = "rollout_aborted" if state == "aborted" else "rollout_failed"
    _give_up(session, record, None, SKIPPED, code, f"the rollout {state} before this device was notified: {reason}", now)
    _announce(emitted, record, state)


def device_counts(session: Session, rollout_id: int) -> Counter[str]:
    counts: Counter[str] = Counter({s: 0 for s in DEVICE_STATES})
    counts.update(dict(session.execute(select(_RD.state, func.count()).where(_RD.rollout_id == rollout_id).group_by(_RD.state)).all()))
    return counts


def run_outcomes(session: Session, run_pk: int) -> dict[str, bool] | None:
    """Task id -> whether its rollout ended well, for the rollouts of a run
    (the run fails when one aborted or failed); None while one has not taken
    its devices' last outcomes yet (its next pass settles it: the run must
    not finish on a verdict the rollout has not reached, say the failure
    that crosses the threshold)."""
    rows = session.execute(select(RolloutRecord.task_id, RolloutRecord.state, RolloutRecord.finished_at).where(RolloutRecord.run_pk == run_pk)).all()
    if any(finished_at is None for _, _, finished_at in rows):
        return None
    return {task_id: state not in ("aborted", "failed") for task_id, state, _ in rows}


def _announce(emitted: list[tuple[str, dict[str, Any]]], record: RolloutRecord, change: str) -> None:
    emitted.append((ev.ROLLOUT_CHANGED, {
        "rollout_id": record.id, "dag_id": record.dag_id, "run_pk": record.run_pk, "task_id": record.task_id,
        "state": record.state, "batch": record.batch, "change": change, "reason": record.reason,
    }))


# --- manual actions ---------------------------------------------------------------


def act(sessions: sessionmaker[Session], bus: ev.EventBus, clock: Clock, rollout_id: int, action: str, *, by: Actor, reason: str = "") -> None:
    """``pause`` (no new device notified; in-flight ones finish), ``resume``
    or ``abort``, audited as ``rollout.<action>``. Raises RolloutNotFound,
    or Conflict when the rollout's state does not allow it."""
    now = utcnow(clock)
    emitted: list[tuple[str, dict[str, Any]]] = []
    reason = (reason or "").strip()[:500]
    with transaction(sessions) as session:
        record = session.get(RolloutRecord, rollout_id, with_for_update=True)
        if record is None:
            raise RolloutNotFound(f"no rollout {rollout_id}")
        allowed = {"pause": ("running",), "resume": ("paused",), "abort": ACTIVE}[action]
        if record.state not in allowed:
            raise Conflict(f"rollout {rollout_id} is {record.state}: it cannot be {'paused' if action == 'pause' else action + 'ed'} (only when {' or '.join(allowed)})")
        if action == "abort":
            stop(session, record, "aborted", reason or f"aborted by {by.actor}", now, emitted, actor=by.actor)
        else:
            record.state = "paused" if action == "pause" else "running"
            record.reason = (reason or f"paused by {by.actor}") if action == "pause" else None
            record.actor, record.updated_at = by.actor, now
            _announce(emitted, record, record.state)
        audit.record(session, by.actor, f"rollout.{action}", f"rollout:{rollout_id}", at=now, remote=by.remote,
                     dag_id=record.dag_id, run_pk=record.run_pk, task_id=record.task_id, reason=reason)
    for name, data in emitted:
        bus.emit(name, **data)
