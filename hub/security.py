"""Security events: the record of signed messages that did not verify.

Two kinds land in ``security_events``:

* the hub refused a device message (source ``mqtt`` or ``http``):
  ``unknown_agent`` (no such agent, or no public key registered),
  ``revoked_agent``, ``unknown_key`` (signed with a key other than the
  registered one), ``bad_signature`` (missing, malformed or wrong),
  ``sender_mismatch`` (a correctly signed envelope from another agent on this
  agent's topic);
* a device refused a hub message and said so (source ``agent``, from its
  ``rejected`` event with a ``security.<code>`` code): ``unknown_key``,
  ``bad_signature``, ``wrong_device``, ``expired``, ``replayed``,
  ``bad_announcement``.

A device whose key is not registered keeps re-sending its results; so that
it cannot flood the table, :class:`Throttle` keeps at most one record per
(agent, source, code) per ``every`` seconds (the counters count them all).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime
from collections.abc import Collection
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.models import SecurityEvent

#: Codes a device reports with this prefix are security events.
AGENT_PREFIX = "security."


def _text(value: str, limit: int) -> str:
    # PostgreSQL text cannot hold NUL; a device's bytes can. Keep them visible.
    return value.replace("\x00", "\\x00")[:limit]


def event(at: datetime, agent_id: str | None, source: str, code: str, detail: str, excerpt: bytes | str = b"") -> SecurityEvent:
    """A record whose every field fits its column on any backend."""
    text = excerpt.decode("utf-8", "backslashreplace") if isinstance(excerpt, bytes) else excerpt
    return SecurityEvent(
        at=at, agent_id=_text(agent_id, 128) if agent_id else None, source=_text(source, 20), code=_text(code, 50),
        detail=_text(detail, 2000), excerpt=_text(text[:512], 2048),
    )


class Throttle:
    """At most one record per key per ``every`` seconds (monotonic time)."""

    def __init__(self, every: float = 10.0, size: int = 10_000) -> None:
        self.every = every
        self.size = size
        self._last: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def allow(self, *key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.every:
                return False
            if len(self._last) >= self.size:
                self._last.clear()  # bounded memory; worst case a few extra records
            self._last[key] = now
            return True


def query(
    session: Session, *, agent_id: str | None = None, code: str | None = None, source: str | None = None,
    since: datetime | None = None, until: datetime | None = None, limit: int = 100, offset: int = 0, agent_ids: Collection[str] | None = None,
) -> tuple[list[SecurityEvent], int, dict[str, int]]:
    """Newest first: the page, the total matching, and counts per code (of all
    matching). ``agent_ids`` (a user's scope) limits all three to those agents'
    events; events naming no agent are then left out."""
    conditions: list[Any] = []
    if agent_ids is not None:
        conditions.append(SecurityEvent.agent_id.in_(agent_ids))
    if agent_id:
        conditions.append(SecurityEvent.agent_id == agent_id)
    if code:
        conditions.append(SecurityEvent.code == code)
    if source:
        conditions.append(SecurityEvent.source == source)
    if since is not None:
        conditions.append(SecurityEvent.at >= since)
    if until is not None:
        conditions.append(SecurityEvent.at < until)
    rows = list(session.scalars(select(SecurityEvent).where(*conditions).order_by(SecurityEvent.id.desc()).limit(limit).offset(offset)))
    counts = dict(session.execute(select(SecurityEvent.code, func.count()).where(*conditions).group_by(SecurityEvent.code)).all())
    return rows, sum(counts.values()), {str(k): int(v) for k, v in sorted(counts.items())}


def counts_by_code(session: Session) -> dict[tuple[str, str], int]:
    """(source, code) -> how many, over the whole table (for /metrics)."""
    rows = session.execute(select(SecurityEvent.source, SecurityEvent.code, func.count()).group_by(SecurityEvent.source, SecurityEvent.code)).all()
    return {(str(s), str(c)): int(n) for s, c, n in rows}
