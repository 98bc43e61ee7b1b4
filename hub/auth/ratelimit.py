"""Login rate limiting: failed logins per user name and per client address
over a window, counted in ``login_failures`` so every hub process (and a
restart) sees the same count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from hub.models_auth import LoginFailure


@dataclass(frozen=True)
class LoginLimits:
    max_per_user: int
    max_per_address: int
    window: float


def retry_after(session: Session, username: str, address: str, now: datetime, limits: LoginLimits) -> int:
    """Seconds until a login for ``username`` from ``address`` may be tried
    again; 0 if it may be tried now."""
    since = now - timedelta(seconds=limits.window)
    waits = [0.0]
    for column, value, limit in ((LoginFailure.username, username, limits.max_per_user), (LoginFailure.address, address, limits.max_per_address)):
        count = session.scalar(select(func.count()).select_from(LoginFailure).where(column == value, LoginFailure.at > since)) or 0
        if count >= limit:
            # Allowed again when the oldest failure that counts leaves the window.
            times = list(session.scalars(select(LoginFailure.at).where(column == value, LoginFailure.at > since).order_by(LoginFailure.at.desc()).limit(limit)))
            waits.append((times[-1] + timedelta(seconds=limits.window) - now).total_seconds())
    return max(0, math.ceil(max(waits)))


def record_failure(session: Session, username: str, address: str, now: datetime, limits: LoginLimits) -> None:
    session.add(LoginFailure(username=username[:100], address=address[:100], at=now))
    # Old rows are of no use; dropping them here keeps the table small without a job.
    session.execute(delete(LoginFailure).where(LoginFailure.at <= now - timedelta(seconds=limits.window)))


def clear(session: Session, username: str) -> None:
    """A successful login forgets that user name's failures (not the address's)."""
    session.execute(delete(LoginFailure).where(LoginFailure.username == username))
