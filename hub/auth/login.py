"""Password login for the dashboard: rate limit, check, start a session,
audit. One function, so every way in obeys the same limits."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub.auth import ratelimit, sessions as web_sessions
from hub.auth.ratelimit import LoginLimits
from hub.auth.sessions import SessionPolicy
from hub.auth.keys import digest
from hub.auth.users import check_password, rehash_if_needed, set_password
from hub.db import transaction
from hub.errors import InvalidRequest, RateLimited, Unauthorized
from hub.models_auth import User, WebSession


def login(
    sessions: sessionmaker[Session], name: str, password: str, address: str, now: datetime, limits: LoginLimits, policy: SessionPolicy,
) -> str:
    """Check ``name`` and ``password`` and start a session; returns the
    session cookie value. Raises ``RateLimited`` (with ``retry_after``)
    when the user name or the address failed too often lately, and
    ``Unauthorized`` for a wrong name or password (the same message for
    both, so user names cannot be probed). Every outcome is audited."""
    name = name.strip()[:100]
    # The checks only read; the slow password hash must not hold SQLite's write lock.
    with sessions() as session:
        wait = ratelimit.retry_after(session, name, address, now, limits)
        found = None if wait else check_password(session, name, password)
        user_id = found.id if found is not None else None
    with transaction(sessions) as session:
        user = session.get(User, user_id) if user_id is not None else None
        if wait:
            audit.record(session, f"user:{name}", "auth.login_failed", name, at=now, success=False, remote=address, reason="rate_limited")
        elif user is not None and user.disabled_at is None:
            rehash_if_needed(user, password)
            ratelimit.clear(session, name)
            secret = web_sessions.start(session, user, now, policy, address)
            audit.record(session, f"user:{name}", "auth.login", name, at=now, remote=address)
            return secret
        else:
            ratelimit.record_failure(session, name, address, now, limits)
            audit.record(session, f"user:{name}", "auth.login_failed", name, at=now, success=False, remote=address, reason="bad_credentials")
    if wait:
        raise RateLimited(f"too many failed logins; try again in {wait} s", retry_after=wait)
    raise Unauthorized("wrong user name or password")


def logout(sessions: sessionmaker[Session], secret: str, name: str, address: str, now: datetime) -> None:
    with transaction(sessions) as session:
        web_sessions.end(session, secret, now)
        audit.record(session, f"user:{name}", "auth.logout", name, at=now, remote=address)


class WrongPassword(InvalidRequest):
    """The current password given to change it is wrong: a bad field (422),
    not a refusal of the credentials the request came with."""

    code = "wrong_password"


def change_password(
    sessions: sessionmaker[Session], name: str, current: str, new: str, address: str, now: datetime, limits: LoginLimits, keep_session: str | None = None,
) -> None:
    """A user changes their own password: ``current`` must be right (a wrong
    one counts as a failed login, with the same limits, so a stolen token or
    an unattended browser cannot be used to guess it). On success every
    other dashboard session of the user ends (``keep_session``, the one
    asking, stays); API tokens stay. Every outcome is audited."""
    with sessions() as session:
        wait = ratelimit.retry_after(session, name, address, now, limits)
        found = None if wait else check_password(session, name, current)
        user_id = found.id if found is not None else None
    with transaction(sessions) as session:
        user = session.get(User, user_id) if user_id is not None else None
        if wait:
            audit.record(session, f"user:{name}", "user.set_password", name, at=now, success=False, remote=address, reason="rate_limited")
        elif user is not None:
            set_password(session, user, new, now)  # raises on a too-short password: nothing is recorded then
            if keep_session:
                # set_password ended every session; the one asking goes on.
                session.execute(update(WebSession).where(WebSession.id_hash == digest(keep_session), WebSession.user_id == user.id).values(ended_at=None))
            ratelimit.clear(session, name)
            audit.record(session, f"user:{name}", "user.set_password", name, at=now, remote=address, own=True)
            return
        else:
            ratelimit.record_failure(session, name, address, now, limits)
            audit.record(session, f"user:{name}", "user.set_password", name, at=now, success=False, remote=address, reason="wrong_password")
    if wait:
        raise RateLimited(f"too many failed password checks; try again in {wait} s", retry_after=wait)
    raise WrongPassword("the current password is wrong")
