"""The audit log (admin only)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from hub import audit
from hub.api.deps import MAX_LIMIT, ReadSession
from hub.auth.roles import Role, requires

router = APIRouter(tags=["audit"])


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    target: str
    success: bool
    remote: str
    detail: dict[str, Any]


class AuditList(BaseModel):
    items: list[AuditOut]


@router.get("/audit", response_model=AuditList)
@requires(Role.ADMIN)
def list_audit(
    session: ReadSession,
    actor: Annotated[str | None, Query(description="Exact actor, e.g. user:alice.")] = None,
    action: Annotated[str | None, Query(description="Exact action (run.trigger) or a prefix ending in .* (auth.*).")] = None,
    since: Annotated[datetime | None, Query(description="From this time (inclusive, ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Before this time (ISO 8601).")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> dict[str, Any]:
    """Audit records, newest first."""
    since, until = (t.replace(tzinfo=UTC) if t is not None and t.tzinfo is None else t for t in (since, until))
    rows = audit.recent(session, actor=actor, action=action, since=since, until=until, limit=limit)
    return {"items": [audit_dict(r) for r in rows]}


def audit_dict(r: Any) -> dict[str, Any]:
    return {"id": r.id, "at": r.at, "actor": r.actor, "action": r.action, "target": r.target, "success": r.success, "remote": r.remote, "detail": r.detail or {}}
