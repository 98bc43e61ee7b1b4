"""The audit log: one append-only record per security-relevant action.

Callers record inside the transaction that makes the change, so an action
and its record commit together or not at all. A failed login has no change
to ride on: record it in a transaction of its own (``success=False``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.models import AuditRecord

#: Longest free-text field values kept (device- or user-supplied text must not bloat the log).
_MAX_TEXT = 300


def record(
    session: Session,
    actor: str,
    action: str,
    target: str = "",
    *,
    at: datetime,
    success: bool = True,
    remote: str = "",
    **detail: Any,
) -> AuditRecord:
    """Add one record to ``session`` (committed with the caller's transaction).

    ``actor`` is ``user:<name>``, ``token:<id>``, ``agent:<id>``, ``hub`` or
    ``cli``; ``action`` a dotted verb such as ``agent.revoke``; ``detail``
    JSON-safe facts (never a secret: no passwords, tokens or keys)."""
    entry = AuditRecord(
        at=at,
        actor=actor[:200],
        action=action[:100],
        target=target[:_MAX_TEXT],
        success=success,
        remote=remote[:100],
        detail=detail,
    )
    session.add(entry)
    return entry


def recent(
    session: Session,
    *,
    actor: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[AuditRecord]:
    """Newest first, filtered; ``action`` may end in ``.*`` for a prefix (``auth.*``)."""
    stmt = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit)
    if actor:
        stmt = stmt.where(AuditRecord.actor == actor)
    if action:
        stmt = stmt.where(AuditRecord.action.startswith(action[:-1]) if action.endswith(".*") else AuditRecord.action == action)
    if since is not None:
        stmt = stmt.where(AuditRecord.at >= since)
    if until is not None:
        stmt = stmt.where(AuditRecord.at < until)
    return list(session.scalars(stmt))
