"""Read models of pools and deadline misses, for the REST API and the
dashboard (plain dicts, like ``hub.queries``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.admission import UNLIMITED
from hub.errors import InvalidRequest, PoolNotFound
from hub.models import DeadlineMiss, Pool, TaskInstance
from hub.scheduling_options import DEFAULT_POOL
from shared.states import TaskState

_HELD = {"queued": (TaskState.QUEUED,), "running": (TaskState.RUNNING, TaskState.DELIVERED, TaskState.DEVICE_OFFLINE)}
DEADLINE_KINDS = ("task_sla", "dagrun_timeout", "deadline")


def list_pools(session: Session, default_pool_slots: int, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
    """Every pool by name, ``default_pool`` always among them (with the
    hub's ``default_pool_slots`` until it is set through the API), with the
    slots its task instances hold now."""
    rows = {p.name: p for p in session.scalars(select(Pool))}
    names = sorted(set(rows) | {DEFAULT_POOL})
    usage = _usage(session, names[offset:offset + limit])
    items = [_pool(name, rows.get(name), default_pool_slots, usage.get(name, {})) for name in names[offset:offset + limit]]
    return {"items": items, "total": len(names), "limit": limit, "offset": offset}


def get_pool(session: Session, name: str, default_pool_slots: int) -> dict[str, Any]:
    row = session.get(Pool, name)
    if row is None and name != DEFAULT_POOL:
        raise PoolNotFound(f"pool {name!r} not found; list pools with GET /api/v1/pools")
    return _pool(name, row, default_pool_slots, _usage(session, [name]).get(name, {}))


def _usage(session: Session, names: list[str]) -> dict[str, dict[str, int]]:
    usage: dict[str, dict[str, int]] = {}
    if not names:
        return usage
    states = [str(s) for group in _HELD.values() for s in group] + [str(TaskState.SCHEDULED)]
    for pool, state, slots in session.execute(
        select(TaskInstance.pool, TaskInstance.state, func.coalesce(func.sum(TaskInstance.pool_slots), 0))
        .where(TaskInstance.pool.in_(names), TaskInstance.state.in_(states))
        .group_by(TaskInstance.pool, TaskInstance.state)
    ):
        bucket = usage.setdefault(pool, {})
        kind = next((k for k, group in _HELD.items() if state in group), "scheduled")
        bucket[kind] = bucket.get(kind, 0) + int(slots)
    return usage


def _pool(name: str, row: Pool | None, default_pool_slots: int, usage: dict[str, int]) -> dict[str, Any]:
    slots = row.slots if row is not None else default_pool_slots
    held = usage.get("queued", 0) + usage.get("running", 0)
    return {
        "name": name,
        "slots": slots,
        "description": row.description if row is not None else "The pool of every task that names none.",
        "queued_slots": usage.get("queued", 0),
        "running_slots": usage.get("running", 0),
        "scheduled_slots": usage.get("scheduled", 0),
        "open_slots": None if slots == UNLIMITED else max(0, slots - held),
    }


def list_deadline_misses(
    session: Session, *, dag_id: str | None = None, run_pk: int | None = None, kind: str | None = None, limit: int = 100, offset: int = 0,
) -> dict[str, Any]:
    """Recorded SLA misses and run timeouts, newest first."""
    if kind is not None and kind not in DEADLINE_KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(DEADLINE_KINDS)}, got {kind!r}")
    stmt = select(DeadlineMiss)
    if dag_id is not None:
        stmt = stmt.where(DeadlineMiss.dag_id == dag_id)
    if run_pk is not None:
        stmt = stmt.where(DeadlineMiss.run_pk == run_pk)
    if kind is not None:
        stmt = stmt.where(DeadlineMiss.kind == kind)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(stmt.order_by(DeadlineMiss.id.desc()).limit(limit).offset(offset))
    items = [
        {"id": m.id, "dag_id": m.dag_id, "run_pk": m.run_pk, "run_id": m.run_id, "task_id": m.task_id or None, "kind": m.kind,
         "deadline": m.deadline, "detected_at": m.detected_at, "description": m.description, "notified_at": m.notified_at}
        for m in rows
    ]
    return {"items": items, "total": total, "limit": limit, "offset": offset}
