"""Login rate limiting: failed logins per user name and per client address
over a window, counted in ``login_failures`` so every hub process (and a
restart) sees the same count.

The same table counts other guesses per client address (device enrolment
tokens): such rows carry a key starting with ``#`` in ``username``, which no
user name can (see ``hub.auth.users``), and do not count towards logins."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

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
    logins = LoginFailure.username.not_like(f"{_KEY_MARK}%")
    for where, limit in (((LoginFailure.username == username,), limits.max_per_user), ((LoginFailure.address == address, logins), limits.max_per_address)):
        waits.append(_wait(session, where, limit, since, now, limits.window))
    return max(0, math.ceil(max(waits)))


def _wait(session: Session, where: tuple[Any, ...], limit: int, since: datetime, now: datetime, window: float) -> float:
    count = session.scalar(select(func.count()).select_from(LoginFailure).where(*where, LoginFailure.at > since)) or 0
    if count < limit:
        return 0.0
    # Allowed again when the oldest failure that counts leaves the window.
    times = list(session.scalars(select(LoginFailure.at).where(*where, LoginFailure.at > since).order_by(LoginFailure.at.desc()).limit(limit)))
    return (times[-1] + timedelta(seconds=window) - now).total_seconds()


#: Rows of guesses other than logins start their ``username`` with this.
_KEY_MARK = "#"
#: The key of failed device enrolments (bad enrolment tokens).
ENROL = "#enroll"


def address_retry_after(session: Session, key: str, address: str, now: datetime, limits: LoginLimits) -> int:
    """Seconds until ``address`` may try ``key`` (e.g. ``ENROL``) again after
    more than ``limits.max_per_address`` failures within the window; 0: now."""
    since = now - timedelta(seconds=limits.window)
    wait = _wait(session, (LoginFailure.username == key, LoginFailure.address == address), limits.max_per_address, since, now, limits.window)
    return max(0, math.ceil(wait))


def record_failure(session: Session, username: str, address: str, now: datetime, limits: LoginLimits) -> None:
    session.add(LoginFailure(username=username[:100], address=address[:100], at=now))
    # Old rows are of no use; dropping them here keeps the table small without a job.
    session.execute(delete(LoginFailure).where(LoginFailure.at <= now - timedelta(seconds=limits.window)))


def clear(session: Session, username: str) -> None:
    """A successful login forgets that user name's failures (not the address's)."""
    session.execute(delete(LoginFailure).where(LoginFailure.username == username))
