"""Dashboard sessions: a random id in an HttpOnly cookie, its SHA-256 in
``web_sessions``; idle and absolute expiry; a CSRF value derived from the
id with the hub's secret key."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hub.auth.keys import digest, same, sign
from hub.auth.roles import Principal
from hub.auth.users import principal
from hub.db import transaction
from hub.models_auth import User, WebSession

COOKIE_NAME = "outpost_session"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
#: last_seen_at is written at most this often per session (idle expiry is coarse by that much).
_TOUCH_EVERY = timedelta(seconds=30)


@dataclass(frozen=True)
class SessionPolicy:
    idle_timeout: float
    max_age: float


def start(session: Session, user: User, now: datetime, policy: SessionPolicy, address: str = "") -> str:
    """A new session for ``user``; returns the cookie value (not stored)."""
    secret = secrets.token_urlsafe(32)
    session.add(WebSession(id_hash=digest(secret), user_id=user.id, created_at=now, last_seen_at=now,
                           expires_at=now + timedelta(seconds=policy.max_age), address=address[:100]))
    session.flush()
    return secret


def authenticate(sessions: sessionmaker[Session], secret: str, now: datetime, policy: SessionPolicy) -> Principal | None:
    """The principal of a session cookie, or None if unknown, ended, idle
    for too long, past its absolute expiry, or its user is disabled."""
    if not secret or len(secret) > 200:
        return None
    with sessions() as session:
        found = session.execute(select(WebSession, User).join(User, User.id == WebSession.user_id).where(WebSession.id_hash == digest(secret))).first()
    if found is None:
        return None
    row, user = found
    idle_limit = row.last_seen_at + timedelta(seconds=policy.idle_timeout)
    if row.ended_at is not None or user.disabled_at is not None or now >= row.expires_at or now >= idle_limit:
        return None
    if now - row.last_seen_at >= _TOUCH_EVERY:
        with transaction(sessions) as session:
            session.execute(update(WebSession).where(WebSession.id == row.id).values(last_seen_at=now))
    return principal(user, via="session", session_secret=secret)


def end(session: Session, secret: str, now: datetime) -> None:
    session.execute(update(WebSession).where(WebSession.id_hash == digest(secret), WebSession.ended_at.is_(None)).values(ended_at=now))


def csrf_token(secret_key: str, session_secret: str) -> str:
    """The CSRF value of a session: every dashboard form carries it."""
    return sign(secret_key, "csrf", session_secret)


def csrf_ok(secret_key: str, session_secret: str, given: str) -> bool:
    return bool(given) and same(csrf_token(secret_key, session_secret), given)
