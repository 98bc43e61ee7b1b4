"""Offline operation, hub side: work held by a device that went away.

The rules (docs/concepts.md, "Offline operation"):

- **Going offline.** When the hub marks an agent offline (silent for
  ``agent_offline_after``, or its ``offline`` status or last will arrived),
  its task instances that are ``queued``, ``delivered`` or ``running`` on it
  become ``device_offline`` (``offline_since`` = now): never ``failed``, the
  device may be working on them right now. Work delivered *ahead*
  (``delivered`` with a ``not_before`` still in the future) stays
  ``delivered``: the device is expected to run it offline, so nothing is
  wrong before ``not_before``; it becomes ``device_offline`` only if the
  device is still gone then. The same sweep catches work queued on a device
  that was already offline (a task pinned to it).
- **Coming back.** When it returns (an ``online`` status, or a heartbeat
  after it was marked offline), each ``device_offline`` instance goes back
  to what the reports justify: listed as running in the heartbeat, or its
  start was already reported → ``running``; accepted → ``delivered``;
  otherwise ``queued``. Every assignment of the device that was sent but
  never accepted (and not cancelled) is sent again at once, from the hub
  DB through the outbox: correctness never depends on the broker's session
  store (a broker restarted without persistence, a clean-start session).
- **Offline grace.** An instance ``device_offline`` for longer than its
  task's ``offline_grace`` (hub default ``default_offline_grace``; counted
  from ``offline_since``, or from the assignment's ``not_before`` if that is
  later) is taken back: its assignment is cancelled with
  ``cancel_assignments(..., reason="offline_grace")``. Not pinned
  (``any_agent()``): the instance is re-targeted: it becomes ``scheduled``
  and the next pass dispatches it to another healthy matching agent as a
  new try; that try does not use up a retry (``max_tries`` grows by one),
  because the task did not fail. Pinned (``on_agent()``, or one device of
  an ``every_agent()`` fan-out): the try fails with error code
  ``device_offline`` (retryable, so the task's ``retries`` apply; a retry
  is sent to the same device and waits for it, within its grace again).

A late result of a try taken back this way is kept, not applied
(ingestion checks the cancelled assignment); the conflict rule decides what
it means.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub import events as ev
from hub import templating
from hub.db import for_update, skip_locked
from hub.dispatcher import Dispatcher
from hub.lifecycle import OPEN_ASSIGNMENT_STATES, cancel_assignments, finish_try, task_callback, task_spec
from hub.models import Agent, Assignment, DagRun, OutboxMessage, TaskInstance, TaskResult
from shared.envelope import Envelope, encode
from hub.xcom import run_context
from shared.hlc import HybridClock
from shared.messages import Cancel
from shared.states import FINISHED, TaskState
from shared.topics import assign_topic

log = logging.getLogger(__name__)

#: States in which an instance's work is on (or on its way to) its device.
ON_DEVICE = (TaskState.QUEUED, TaskState.DELIVERED, TaskState.RUNNING)
#: The error code of a try given up because its device stayed offline.
DEVICE_OFFLINE_CODE = "device_offline"
#: ``cancel_assignments`` reason of every offline-grace decision.
GRACE_REASON = "offline_grace"


@dataclass
class Changes:
    """What a step did, for the events the caller sends after its commit."""

    #: (ti id, run pk, task id, new state) of every instance that changed.
    states: list[tuple[int, int, str, str]] = field(default_factory=list)
    #: Assignments written to the outbox again.
    resent: int = 0

    def note(self, ti: TaskInstance) -> None:
        self.states.append((ti.id, ti.run_pk, ti.task_id, str(ti.state)))

    def __bool__(self) -> bool:
        return bool(self.states or self.resent)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """The hub events announcing these changes."""
        out: list[tuple[str, dict[str, Any]]] = [(ev.TASK_STATE_CHANGED, {"ti_id": ti_id, "state": state}) for ti_id, _r, _t, state in self.states]
        if self.resent:
            out.append((ev.OUTBOX_WRITTEN, {}))
        return out


def _current_assignments(session: Session, tis: list[TaskInstance]) -> dict[int, Assignment]:
    """Each instance's assignment for its current try on its agent."""
    if not tis:
        return {}
    wanted = {(ti.id, ti.try_number, ti.agent_id): ti.id for ti in tis}
    rows = session.scalars(select(Assignment).where(Assignment.ti_id.in_([ti.id for ti in tis])))
    return {wanted[(a.ti_id, a.try_number, a.agent_id)]: a for a in rows if (a.ti_id, a.try_number, a.agent_id) in wanted}


def _delivered_ahead(ti: TaskInstance, assignment: Assignment | None, now: datetime) -> bool:
    return ti.state == TaskState.DELIVERED and assignment is not None and assignment.not_before is not None and assignment.not_before > now


def mark_offline(session: Session, now: datetime, default_grace: float | None, agent_ids: Iterable[str] | None = None) -> Changes:
    """Move the work on offline agents (all of them, or those of
    ``agent_ids`` that are offline) to ``device_offline``, and note when
    its grace runs out (``offline_until``; without ``default_grace`` the
    scheduler's grace step notes it, as the owner of that setting)."""
    changes = Changes()
    offline = select(Agent.agent_id).where(Agent.state != "online")
    if agent_ids is not None:
        offline = offline.where(Agent.agent_id.in_(list(agent_ids)))
    # Delivered ahead (not_before still to come) is left out in SQL: at fleet
    # scale a whole night's work sits like that on offline devices, and this
    # runs on every full pass.
    ahead = select(Assignment.id).where(
        Assignment.ti_id == TaskInstance.id, Assignment.try_number == TaskInstance.try_number, Assignment.not_before > now
    ).exists()
    stmt = select(TaskInstance).where(
        TaskInstance.kind == "agent", TaskInstance.state.in_(ON_DEVICE), TaskInstance.agent_id.in_(offline),
        ~((TaskInstance.state == TaskState.DELIVERED) & ahead),
    )
    tis = list(session.scalars(skip_locked(stmt, session)))
    assignments = _current_assignments(session, tis)
    held = _hold_runs(session, tis) if default_grace is not None else []  # noqa: F841 (see _hold_runs)
    for ti in tis:
        assignment = assignments.get(ti.id)
        if _delivered_ahead(ti, assignment, now):
            continue  # the device holds it and runs it offline at not_before
        ti.state, ti.offline_since = TaskState.DEVICE_OFFLINE, now
        ti.offline_until = None if default_grace is None else grace_ends(session, ti, assignment, now, default_grace)
        changes.note(ti)
    if changes.states:
        log.info("%d task instance(s) now device_offline", len(changes.states))
    return changes


def device_returned(
    session: Session, agent_id: str, now: datetime, dispatcher: Dispatcher, running: Iterable[str] | None = None, *,
    resend: bool = True, last_heard: datetime | None = None,
) -> Changes:
    """``agent_id`` is back: restore its ``device_offline`` instances from
    what the hub knows (``running``: the assignment ids its heartbeat lists,
    when a heartbeat brought it back) and, with ``resend``, re-send every
    assignment it was sent but never accepted, and the Cancel of every
    assignment cancelled since it was ``last_heard`` from (it may hold it
    still, and the broker may have lost the Cancel)."""
    changes = Changes()
    listed = set(running or ())
    # Locked (PostgreSQL): a scheduler deciding its grace right now commits
    # first, and the state it leaves is read again before this changes it.
    stmt = select(TaskInstance).where(TaskInstance.agent_id == agent_id, TaskInstance.state == TaskState.DEVICE_OFFLINE).order_by(TaskInstance.id)
    tis = list(session.scalars(for_update(stmt, session)))
    assignments = _current_assignments(session, tis)
    for ti in tis:
        assignment = assignments.get(ti.id)
        if assignment is None or assignment.state not in OPEN_ASSIGNMENT_STATES:
            continue  # nothing open on the device: offline_grace decides
        if assignment.id in listed or assignment.state == "started":
            if assignment.state != "started":
                # The device says it runs it; its "started" is still in its outbox.
                assignment.state = "started"
                ti.started_at = ti.started_at or now
                task_callback(session, ti, TaskState.RUNNING, now)
            ti.state = TaskState.RUNNING
        elif assignment.state == "accepted":
            ti.state = TaskState.DELIVERED
        else:
            ti.state = TaskState.QUEUED
        ti.offline_since = ti.offline_until = None
        changes.note(ti)
    if resend:
        changes.resent = resend_unaccepted(session, agent_id, now, dispatcher)
        if last_heard is not None:
            changes.resent += resend_cancels(session, agent_id, last_heard, now, dispatcher.hlc)
    if changes:
        log.info("agent %s is back: %d task instance(s) restored, %d assignment(s) sent again", agent_id, len(changes.states), changes.resent)
    return changes


def resend_unaccepted(session: Session, agent_id: str, now: datetime, dispatcher: Dispatcher) -> int:
    """Write every assignment of ``agent_id`` that was sent and never
    accepted to the outbox again (the same body; the inbox deduplicates)."""
    count = 0
    for assignment in session.scalars(select(Assignment).where(Assignment.agent_id == agent_id, Assignment.state == "sent").order_by(Assignment.created_at)):
        ti = session.get(TaskInstance, assignment.ti_id)
        if ti is None or ti.try_number != assignment.try_number or ti.state in FINISHED or ti.state == TaskState.UP_FOR_RETRY:
            continue  # no longer current: the redelivery step retires it
        assignment.state = "pending"
        session.add(dispatcher.outbox_row(ti, assignment, now, ti.execution_timeout))
        count += 1
    return count


def resend_cancels(session: Session, agent_id: str, since: datetime, now: datetime, hlc: HybridClock) -> int:
    """Write the Cancel of each assignment of ``agent_id`` cancelled at or
    after ``since`` that it never reported on to the outbox again. Not
    through ``cancel_assignments``: these are copies of decisions already
    made, not new ones."""
    reported = select(TaskResult.id).where(TaskResult.assignment_id == Assignment.id).exists()
    stmt = select(Assignment.id).where(Assignment.agent_id == agent_id, Assignment.state == "cancelled", Assignment.finished_at >= since, ~reported)
    count = 0
    for assignment_id in session.scalars(stmt.order_by(Assignment.finished_at)):
        payload = encode(Envelope(Cancel(assignment_id, "cancelled while the device was away (sent again on its return)"), sender="hub", hlc=hlc.now()))
        session.add(OutboxMessage(topic=assign_topic(agent_id), payload=payload, qos=1, retain=False, assignment_id=None, created_at=now, attempts=0))
        count += 1
    return count


def restore_returned(session: Session, now: datetime, dispatcher: Dispatcher) -> Changes:
    """Catch-up for instances left ``device_offline`` on an agent that is
    online (its return and an offline sweep raced on another hub process).
    Nothing is re-sent here: that happens once, when the return is seen."""
    changes = Changes()
    online = select(Agent.agent_id).where(Agent.state == "online")
    stuck = session.scalars(select(TaskInstance.agent_id).where(TaskInstance.state == TaskState.DEVICE_OFFLINE, TaskInstance.agent_id.in_(online)).distinct())
    for agent_id in list(stuck):
        if agent_id is not None:
            done = device_returned(session, agent_id, now, dispatcher, resend=False)
            changes.states += done.states
            changes.resent += done.resent
    return changes


def pinned(task: dict[str, Any], ti: TaskInstance) -> bool:
    """True when ``ti`` may only run on its device: ``on_agent()``, or one
    device of an ``every_agent()`` fan-out (the scheduler's retry rule)."""
    mode = (task.get("target") or {}).get("mode", "any")
    return mode != "any" or (ti.map_index >= 0 and not task.get("mapped"))


def _grace(task: dict[str, Any], default_grace: float) -> float:
    grace = task.get("offline_grace")
    return float(default_grace if grace is None else grace)


def grace_ends(session: Session, ti: TaskInstance, assignment: Assignment | None, since: datetime, default_grace: float, task: dict[str, Any] | None = None) -> datetime:
    """When ``ti``, ``device_offline`` from ``since``, is taken back: its
    task's grace later, counted from ``not_before`` if that is later."""
    if assignment is not None and assignment.not_before is not None and assignment.not_before > since:
        since = assignment.not_before  # scheduled ahead: nothing was due before not_before
    return since + timedelta(seconds=_grace(task if task is not None else task_spec(session, ti), default_grace))


def _hold_runs(session: Session, tis: list[TaskInstance]) -> list[DagRun]:
    """Load the runs of ``tis`` at once and keep them referenced, so the
    structure look-ups per instance find them in the session (one query,
    not one per instance)."""
    run_pks = {ti.run_pk for ti in tis}
    return list(session.scalars(select(DagRun).where(DagRun.id.in_(run_pks)))) if run_pks else []


def apply_offline_grace(session: Session, now: datetime, hlc: HybridClock, default_grace: float) -> tuple[Changes, Changes]:
    """Take back instances ``device_offline`` past their grace. Returns
    (re-targeted, given up)."""
    retargeted, given_up = Changes(), Changes()
    # Only the due ones are loaded (an index on offline_until): most passes
    # load nothing, however many devices are away. An instance that entered
    # device_offline without one (through ingestion) gets it here, counted
    # from when it went offline.
    is_due = (TaskInstance.offline_until <= now) | TaskInstance.offline_until.is_(None)
    stmt = select(TaskInstance).where(TaskInstance.state == TaskState.DEVICE_OFFLINE, is_due).order_by(TaskInstance.id)
    tis = list(session.scalars(skip_locked(stmt, session)))
    assignments = _current_assignments(session, tis)
    held = _hold_runs(session, tis)  # noqa: F841 (see _hold_runs)
    due: list[tuple[TaskInstance, dict[str, Any]]] = []
    with session.no_autoflush:
        for ti in tis:
            task = task_spec(session, ti)
            if ti.offline_until is None:
                ti.offline_since = ti.offline_since or now
                ti.offline_until = grace_ends(session, ti, assignments.get(ti.id), ti.offline_since, default_grace, task)
            if now >= ti.offline_until:
                due.append((ti, task))
    # One cancellation for all of them (each gets its Cancel message).
    cancel_assignments(session, [ti.id for ti, _ in due], now, hlc, reason=GRACE_REASON)
    for ti, task in due:
        grace = _grace(task, default_grace)
        device = ti.agent_id
        ti.offline_since = ti.offline_until = None
        if not pinned(task, ti):
            # A new try elsewhere, not a failure: the task keeps its retries.
            ti.state, ti.agent_id, ti.next_try_at, ti.max_tries = TaskState.SCHEDULED, None, None, ti.max_tries + 1
            log.warning("%s: device %s offline for more than %gs (offline_grace); re-targeting", ti.key, device, grace)
            retargeted.note(ti)
        else:
            error = {"code": DEVICE_OFFLINE_CODE, "message": f"device {device} stayed offline longer than the task's offline_grace ({grace:g}s); try {ti.try_number} given up", "retryable": True}
            finish_try(ti, success=False, now=now, error=error)
            log.warning("%s: device %s offline for more than %gs (offline_grace); try %d given up (%s)", ti.key, device, grace, ti.try_number, ti.state)
            given_up.note(ti)
    return retargeted, given_up


# --- scheduled-ahead assignments ------------------------------------------------


def assignment_window(session: Session, ti: TaskInstance, task: dict[str, Any]) -> tuple[datetime | None, datetime | None]:
    """The ``not_before`` and ``deadline`` of ``ti``'s next assignment, from
    its task's ``not_before`` / ``deadline``: seconds after the run's data
    interval end, or a template rendered to an ISO 8601 time (an aware
    datetime; a naive one is UTC). Raises ``templating.TemplateError``."""
    window = task.get("window") or {}
    if not window:
        return None, None
    run = session.get(DagRun, ti.run_pk)
    if run is None:
        raise templating.TemplateError(f"run of {ti.key} not found")
    anchor = run.data_interval_end or run.logical_date
    context: dict[str, Any] | None = None
    times: list[datetime | None] = []
    for name in ("not_before", "deadline"):
        spec = window.get(name)
        if spec is None:
            times.append(None)
        elif isinstance(spec, (int, float)):
            times.append(anchor + timedelta(seconds=float(spec)))
        else:
            if context is None:
                context = run_context(lambda: nullcontext(session), ti, run, read_only=True)
            times.append(_as_time(ti, name, templating.render(str(spec), context)))
    not_before, deadline = times
    if not_before is not None and deadline is not None and deadline <= not_before:
        raise templating.TemplateError(f"task {ti.task_id!r}: deadline {deadline.isoformat()} is not after not_before {not_before.isoformat()}")
    return not_before, deadline


def _as_time(ti: TaskInstance, name: str, value: Any) -> datetime:
    if isinstance(value, datetime):
        when = value
    else:
        try:
            when = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise templating.TemplateError(f"task {ti.task_id!r}: {name} rendered to {str(value)[:100]!r}, not an ISO 8601 time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def agent_state_changed(
    session: Session, agent_id: str, state: str, now: datetime, dispatcher: Dispatcher, running: Iterable[str] | None = None, last_heard: datetime | None = None,
) -> Changes:
    """Ingestion's hook: an agent's status or a heartbeat said ``state``
    (``last_heard``: when the hub heard from it before this message)."""
    if state == "online":
        return device_returned(session, agent_id, now, dispatcher, running, last_heard=last_heard)
    return mark_offline(session, now, None, [agent_id])
