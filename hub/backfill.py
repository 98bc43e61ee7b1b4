"""Backfills: runs for past data intervals of a DAG, Airflow 3 style.

``create_backfill`` takes a DAG with a time-based schedule and a range
``[from_date, to_date]`` and creates one run (``run_type`` "backfill",
``backfill_id`` set) for every data interval of the schedule whose logical
date (start) lies in the range, all at once and *queued*. The scheduler
(``hub.scheduler.start_queued_runs``) starts them in logical-date order, or
newest first with ``run_backwards``, never more than the backfill's own
``max_active_runs`` at a time (independent of the DAG's), and as earlier
ones finish. Creating every run up front, rather than lazily, makes the
whole backfill visible (and cancellable) at once, and a hub restart loses
nothing: the queue is the database.

Intervals that already have a run follow ``reprocess_behavior``: ``none``
skips them, ``failed`` creates a new run where the latest run failed,
``completed`` where it succeeded or failed. An interval whose latest run is
still queued or running is never run twice. Skipped intervals are reported
back with the reason.

Pausing a backfill stops it from starting more runs; cancelling it also
fails its runs that have not started (running ones finish), as Airflow does.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from hub import timetables
from hub.errors import Conflict, DagNotFound, InvalidDag, InvalidRequest, NotFound
from hub.models import Backfill, Dag, DagRun
from hub.scheduler import trigger_run
from shared.states import RunState

REPROCESS_BEHAVIORS = ("none", "failed", "completed")
#: A backfill larger than this is almost certainly a wrong range or schedule.
MAX_BACKFILL_RUNS = 10_000
DEFAULT_MAX_ACTIVE_RUNS = 10
_ACTIVE = (RunState.QUEUED, RunState.RUNNING)


class BackfillNotFound(NotFound):
    code = "backfill_not_found"


class AlreadyRunningBackfill(Conflict):
    code = "backfill_already_running"


@dataclass(frozen=True)
class Skipped:
    logical_date: datetime
    reason: str


def _aware(value: datetime, name: str) -> datetime:
    # The API and the CLI take dates as written; a date without an offset is UTC, as in Airflow.
    if not isinstance(value, datetime):
        raise InvalidRequest(f"{name} must be a date-time")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def plan(session: Session, dag: Dag, from_date: datetime, to_date: datetime, reprocess_behavior: str) -> tuple[list[timetables.DataInterval], list[Skipped]]:
    """The intervals a backfill creates runs for, oldest first, and those it skips."""
    try:
        timetable = timetables.from_dict((dag.structure or {}).get("timetable"))
    except InvalidDag as exc:
        raise InvalidRequest(f"DAG {dag.dag_id!r} has an unreadable schedule: {exc}") from None
    if not timetable.periodic:
        raise InvalidRequest(f"DAG {dag.dag_id!r} has no time-based schedule ({timetable.summary}): a backfill needs a cron or timedelta schedule")
    intervals: list[timetables.DataInterval] = []
    for interval in timetable.iter_intervals(from_date, to_date):
        intervals.append(interval)
        if len(intervals) > MAX_BACKFILL_RUNS:
            raise InvalidRequest(f"the range holds more than {MAX_BACKFILL_RUNS} intervals of {dag.dag_id!r}'s schedule; backfill a shorter range")
    if not intervals:
        return [], []
    latest: dict[datetime, str] = {}
    rows = session.execute(
        select(DagRun.logical_date, DagRun.state)
        .where(DagRun.dag_id == dag.dag_id, DagRun.logical_date >= intervals[0].start, DagRun.logical_date <= intervals[-1].start)
        .order_by(DagRun.id)
    )
    for logical_date, state in rows:
        latest[logical_date] = state  # by id order: the last one wins
    todo: list[timetables.DataInterval] = []
    skipped: list[Skipped] = []
    for interval in intervals:
        state = latest.get(interval.start)
        reason = _no_create_reason(state, reprocess_behavior)
        if reason is None:
            todo.append(interval)
        else:
            skipped.append(Skipped(interval.start, reason))
    return todo, skipped


def _no_create_reason(state: str | None, reprocess_behavior: str) -> str | None:
    if state is None:
        return None
    if state in _ACTIVE:
        return "already_running"
    if reprocess_behavior == "none":
        return "already_exists"
    if reprocess_behavior == "failed" and state != RunState.FAILED:
        return "already_succeeded"
    return None


def create_backfill(
    session: Session,
    dag_id: str,
    from_date: datetime,
    to_date: datetime,
    now: datetime,
    *,
    max_active_runs: int = DEFAULT_MAX_ACTIVE_RUNS,
    reprocess_behavior: str = "none",
    run_backwards: bool = False,
    dag_run_conf: dict[str, Any] | None = None,
) -> tuple[Backfill, list[Skipped]]:
    """Create a backfill and its queued runs in the caller's transaction.
    Raises ``DagNotFound``, ``InvalidRequest`` or ``AlreadyRunningBackfill``."""
    dag, from_date, to_date, conf = _check(session, dag_id, from_date, to_date, now, max_active_runs, reprocess_behavior, run_backwards, dag_run_conf)
    running = session.scalar(select(Backfill.id).where(Backfill.dag_id == dag_id, Backfill.completed_at.is_(None)).limit(1))
    if running is not None:
        raise AlreadyRunningBackfill(f"backfill {running} of {dag_id!r} is still running; wait for it, or cancel it with 'outpost backfills cancel {running}'")
    todo, skipped = plan(session, dag, from_date, to_date, reprocess_behavior)
    if not todo:
        why = "the range holds no interval of the schedule" if not skipped else f"all {len(skipped)} intervals already have runs (reprocess_behavior {reprocess_behavior!r})"
        raise InvalidRequest(f"nothing to backfill for {dag_id!r} between {from_date.isoformat()} and {to_date.isoformat()}: {why}")
    backfill = Backfill(
        dag_id=dag_id, from_date=from_date, to_date=to_date, run_backwards=run_backwards, max_active_runs=max_active_runs,
        reprocess_behavior=reprocess_behavior, dag_run_conf=conf, is_paused=False, created_at=now,
    )
    session.add(backfill)
    session.flush()
    # Created in start order: trigger_run starts what the limit allows at once.
    for interval in reversed(todo) if run_backwards else todo:
        trigger_run(
            session, dag_id, dict(conf), now, run_type="backfill", logical_date=interval.start,
            data_interval=(interval.start, interval.end), backfill_id=backfill.id,
        )
    return backfill, skipped


def dry_run(
    session: Session, dag_id: str, from_date: datetime, to_date: datetime, now: datetime, *,
    max_active_runs: int = DEFAULT_MAX_ACTIVE_RUNS, reprocess_behavior: str = "none", run_backwards: bool = False,
    dag_run_conf: dict[str, Any] | None = None,
) -> tuple[list[timetables.DataInterval], list[Skipped]]:
    """What ``create_backfill`` would run and skip now, creating nothing
    (Airflow's backfill dry run); same checks, same errors."""
    dag, from_date, to_date, _ = _check(session, dag_id, from_date, to_date, now, max_active_runs, reprocess_behavior, run_backwards, dag_run_conf)
    todo, skipped = plan(session, dag, from_date, to_date, reprocess_behavior)
    return (list(reversed(todo)) if run_backwards else todo), skipped


def _check(
    session: Session, dag_id: str, from_date: datetime, to_date: datetime, now: datetime, max_active_runs: int,
    reprocess_behavior: str, run_backwards: bool, dag_run_conf: dict[str, Any] | None,
) -> tuple[Dag, datetime, datetime, dict[str, Any]]:
    dag = session.get(Dag, dag_id)
    if dag is None or not dag.is_active:
        raise DagNotFound(f"DAG {dag_id!r} does not exist (or its file was removed); see 'outpost dags list'")
    from_date, to_date = _aware(from_date, "from_date"), _aware(to_date, "to_date")
    if from_date > to_date:
        raise InvalidRequest(f"from_date {from_date.isoformat()} is after to_date {to_date.isoformat()}")
    if to_date > now:
        raise InvalidRequest(f"to_date {to_date.isoformat()} is in the future: a backfill covers past intervals only")
    if reprocess_behavior not in REPROCESS_BEHAVIORS:
        raise InvalidRequest(f"reprocess_behavior {reprocess_behavior!r} is not one of {', '.join(REPROCESS_BEHAVIORS)}")
    if not isinstance(max_active_runs, int) or isinstance(max_active_runs, bool) or max_active_runs < 1:
        raise InvalidRequest(f"max_active_runs must be a positive integer, not {max_active_runs!r}")
    conf = {} if dag_run_conf is None else dag_run_conf
    if not isinstance(conf, dict):
        raise InvalidRequest("dag_run_conf must be a JSON object")
    if run_backwards:
        past = [t["task_id"] for t in (dag.structure or {}).get("tasks", []) if t.get("depends_on_past")]
        if past:
            raise InvalidRequest(f"run_backwards cannot be used: task(s) {', '.join(past)} of {dag_id!r} have depends_on_past=True")
    return dag, from_date, to_date, conf


def get_backfill(session: Session, backfill_id: int) -> Backfill:
    backfill = session.get(Backfill, backfill_id)
    if backfill is None:
        raise BackfillNotFound(f"backfill {backfill_id} not found; list backfills with 'outpost backfills list'")
    return backfill


def set_paused(session: Session, backfill_id: int, paused: bool) -> Backfill:
    """A paused backfill starts no more runs; running ones go on."""
    backfill = get_backfill(session, backfill_id)
    if backfill.completed_at is not None:
        raise Conflict(f"backfill {backfill_id} is already complete")
    backfill.is_paused = paused
    return backfill


def cancel(session: Session, backfill_id: int, now: datetime) -> Backfill:
    """Stop a backfill: its runs that have not started are failed (Airflow
    does the same), running ones finish, and it is complete."""
    backfill = get_backfill(session, backfill_id)
    if backfill.completed_at is not None:
        raise Conflict(f"backfill {backfill_id} is already complete")
    backfill.is_paused = True
    session.execute(
        update(DagRun).where(DagRun.backfill_id == backfill_id, DagRun.state == RunState.QUEUED).values(state=RunState.FAILED, ended_at=now)
    )
    backfill.completed_at = now
    return backfill


def run_counts(session: Session, backfill_ids: list[int]) -> dict[int, dict[str, int]]:
    counts: dict[int, dict[str, int]] = {b: {} for b in backfill_ids}
    if backfill_ids:
        rows = session.execute(select(DagRun.backfill_id, DagRun.state, func.count()).where(DagRun.backfill_id.in_(backfill_ids)).group_by(DagRun.backfill_id, DagRun.state))
        for backfill_id, state, n in rows:
            counts[backfill_id][state] = n
    return {b: dict(sorted(c.items())) for b, c in counts.items()}


def to_dict(backfill: Backfill, counts: dict[str, int], skipped: list[Skipped] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": backfill.id, "dag_id": backfill.dag_id, "from_date": backfill.from_date, "to_date": backfill.to_date,
        "run_backwards": backfill.run_backwards, "max_active_runs": backfill.max_active_runs,
        "reprocess_behavior": backfill.reprocess_behavior, "dag_run_conf": dict(backfill.dag_run_conf or {}),
        "is_paused": backfill.is_paused, "created_at": backfill.created_at, "completed_at": backfill.completed_at,
        "run_counts": dict(counts),
    }
    if skipped is not None:
        data["skipped"] = [{"logical_date": s.logical_date, "reason": s.reason} for s in skipped]
    return data


def list_backfills(session: Session, *, dag_id: str | None, active: bool | None, limit: int, offset: int, dag_ids: Collection[str] | None = None) -> dict[str, Any]:
    """Backfills, newest first; ``dag_ids`` (a user's scope) limits them to those DAGs'."""
    stmt = select(Backfill)
    if dag_ids is not None:
        stmt = stmt.where(Backfill.dag_id.in_(dag_ids))
    if dag_id is not None:
        stmt = stmt.where(Backfill.dag_id == dag_id)
    if active is True:
        stmt = stmt.where(Backfill.completed_at.is_(None))
    elif active is False:
        stmt = stmt.where(Backfill.completed_at.is_not(None))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = list(session.scalars(stmt.order_by(Backfill.id.desc()).limit(limit).offset(offset)))
    counts = run_counts(session, [b.id for b in rows])
    return {"items": [to_dict(b, counts[b.id]) for b in rows], "total": total, "limit": limit, "offset": offset}


def run_pks(session: Session, backfill_id: int) -> list[int]:
    return list(session.scalars(select(DagRun.id).where(DagRun.backfill_id == backfill_id).order_by(DagRun.id)))


def describe(session: Session, backfill_id: int) -> dict[str, Any]:
    backfill = get_backfill(session, backfill_id)
    return to_dict(backfill, run_counts(session, [backfill.id])[backfill.id])
