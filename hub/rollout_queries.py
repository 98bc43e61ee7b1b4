"""Read side of rollouts for the API, the CLI and the dashboard: plain
dicts, counts by aggregate queries (a rollout of thousands of devices is
never loaded row by row), devices a page at a time."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.errors import InvalidRequest
from hub.models import RolloutDevice, RolloutRecord, TaskInstance
from hub.rollout_policy import Rollout
from hub.rollouts import DEVICE_STATES, ROLLOUT_STATES, RolloutNotFound

_RD = RolloutDevice


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _counts(session: Session, rollout_ids: list[int]) -> dict[int, dict[str, int]]:
    found: dict[int, dict[str, int]] = defaultdict(lambda: {s: 0 for s in DEVICE_STATES})
    if rollout_ids:
        stmt = select(_RD.rollout_id, _RD.state, func.count()).where(_RD.rollout_id.in_(rollout_ids)).group_by(_RD.rollout_id, _RD.state)
        for rollout_id, state, count in session.execute(stmt):
            found[rollout_id][state] = int(count)
    return found


def summary(record: RolloutRecord, counts: dict[str, int]) -> dict[str, Any]:
    policy = Rollout.from_dict(record.policy)
    finished = counts.get("succeeded", 0) + counts.get("failed", 0)
    canary = policy.has_canary(record.total)
    if record.finished_at is not None:
        phase = "done"
    elif record.state not in ("running", "paused"):
        phase = "finishing"  # aborted or failed: in-flight devices finish
    else:
        phase = "canary" if canary and record.batch == 0 else "batches"
    return {
        "id": record.id, "dag_id": record.dag_id, "run_pk": record.run_pk, "run_id": record.run_id, "task_id": record.task_id,
        "job_type": record.job_type, "state": record.state, "phase": phase, "batch": record.batch,
        "batch_target": policy.batch_target(record.batch, record.total), "total": record.total,
        "counts": counts, "failure_rate": (counts.get("failed", 0) / finished) if finished else 0.0,
        "failure_threshold": policy.failure_threshold, "success_threshold": policy.needed_success,
        "started_at": _iso(record.started_at), "deadline": _iso(record.deadline), "updated_at": _iso(record.updated_at),
        "finished_at": _iso(record.finished_at), "reason": record.reason, "actor": record.actor,
    }


def list_rollouts(
    session: Session, *, state: str | None = None, dag_id: str | None = None, limit: int = 100, offset: int = 0, dag_ids: Collection[str] | None = None,
) -> dict[str, Any]:
    """Rollouts, newest first; ``dag_ids`` (a user's scope) limits them."""
    if state is not None and state not in ROLLOUT_STATES:
        raise InvalidRequest(f"unknown rollout state {state!r}; one of {', '.join(ROLLOUT_STATES)}")
    stmt = select(RolloutRecord)
    if dag_ids is not None:
        stmt = stmt.where(RolloutRecord.dag_id.in_(dag_ids))
    if dag_id is not None:
        stmt = stmt.where(RolloutRecord.dag_id == dag_id)
    if state is not None:
        stmt = stmt.where(RolloutRecord.state == state)
    total = int(session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
    records = list(session.scalars(stmt.order_by(RolloutRecord.id.desc()).limit(limit).offset(offset)))
    counts = _counts(session, [r.id for r in records])
    return {"items": [summary(r, counts[r.id]) for r in records], "total": total, "limit": limit, "offset": offset}


def get_record(session: Session, rollout_id: int) -> RolloutRecord:
    record = session.get(RolloutRecord, rollout_id)
    if record is None:
        raise RolloutNotFound(f"no rollout {rollout_id}; list rollouts with GET /api/v1/rollouts")
    return record


def get_rollout(session: Session, rollout_id: int) -> dict[str, Any]:
    """One rollout: its summary, policy and selector, and per batch the devices in each state."""
    record = get_record(session, rollout_id)
    batches: dict[int, dict[str, int]] = defaultdict(dict)
    stmt = select(_RD.batch, _RD.state, func.count()).where(_RD.rollout_id == rollout_id, _RD.batch.is_not(None)).group_by(_RD.batch, _RD.state)
    for batch, state, count in session.execute(stmt):
        batches[int(batch)][state] = int(count)
    return {
        **summary(record, _counts(session, [rollout_id])[rollout_id]), "policy": dict(record.policy), "selector": dict(record.selector),
        "seed": record.seed, "batches": [{"batch": b, "counts": batches[b]} for b in sorted(batches)],
    }


def list_devices(session: Session, rollout_id: int, *, state: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """The rollout's devices in rollout order, with their task instance's try and error."""
    get_record(session, rollout_id)
    if state is not None and state not in DEVICE_STATES:
        raise InvalidRequest(f"unknown device state {state!r}; one of {', '.join(DEVICE_STATES)}")
    where = [_RD.rollout_id == rollout_id] + ([_RD.state == state] if state is not None else [])
    total = int(session.scalar(select(func.count()).select_from(_RD).where(*where)) or 0)
    rows = session.execute(
        select(_RD, TaskInstance.run_pk, TaskInstance.state, TaskInstance.try_number, TaskInstance.error, TaskInstance.map_index)
        .join(TaskInstance, TaskInstance.id == _RD.ti_id).where(*where).order_by(_RD.seq).limit(limit).offset(offset)
    ).all()
    items = [
        {
            "agent_id": d.agent_id, "state": d.state, "batch": d.batch, "seq": d.seq, "groups": [g for g in d.groups or [] if g],
            "ti_id": d.ti_id, "run_pk": run_pk, "map_index": map_index, "ti_state": ti_state, "try_number": try_number,
            "error": (error or {}).get("code") or d.error_code, "error_message": (error or {}).get("message"),
            "notified_at": _iso(d.notified_at), "finished_at": _iso(d.finished_at),
        }
        for d, run_pk, ti_state, try_number, error, map_index in rows
    ]
    return {"items": items, "total": total, "limit": limit, "offset": offset}
