"""API tokens: random, shown once, stored as SHA-256, per user, with a role
no higher than the user's, an optional expiry, last use, revocable."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hub.auth.keys import digest
from hub.auth.roles import Principal, at_least, parse_role
from hub.auth.users import principal
from hub.db import transaction
from hub.errors import InvalidRequest, NotFound
from hub.models_auth import ApiToken, User

#: Every token starts with this, so secret scanners and people recognise one.
TOKEN_PREFIX = "opt_"
#: last_used_at is written at most this often per token, so reads stay reads.
_TOUCH_EVERY = timedelta(seconds=60)


class TokenNotFound(NotFound):
    code = "token_not_found"


def create_token(session: Session, user: User, name: str, now: datetime, *, role: str | None = None, expires_at: datetime | None = None) -> tuple[str, ApiToken]:
    """A new token for ``user``: ``(secret, row)``. The secret is not stored
    and cannot be shown again."""
    wanted = parse_role(role or user.role)
    if not at_least(user.role, wanted):
        raise InvalidRequest(f"a token cannot have more than its user's role: {user.name} is {user.role}, the token asked for {wanted.value}")
    if not name.strip() or len(name) > 100:
        raise InvalidRequest("token name must be 1 to 100 characters")
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("token expiry must be in the future")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, name=name.strip(), token_hash=digest(secret), prefix=secret[:10], role=wanted.value, created_at=now, expires_at=expires_at)
    session.add(row)
    session.flush()
    return secret, row


def list_tokens(session: Session, user_id: int | None = None) -> list[tuple[ApiToken, str]]:
    """Tokens (newest first) with their user's name."""
    stmt = select(ApiToken, User.name).join(User, User.id == ApiToken.user_id).order_by(ApiToken.id.desc())
    if user_id is not None:
        stmt = stmt.where(ApiToken.user_id == user_id)
    return [(t, n) for t, n in session.execute(stmt)]


def get_token(session: Session, token_id: int) -> ApiToken:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise TokenNotFound(f"no API token with id {token_id}")
    return row


def revoke(session: Session, token_id: int, now: datetime) -> ApiToken:
    row = get_token(session, token_id)
    if row.revoked_at is None:
        row.revoked_at = now
    return row


def authenticate(sessions: sessionmaker[Session], secret: str, now: datetime) -> Principal | None:
    """The principal of a bearer token, or None if it is unknown, revoked,
    expired or its user is disabled."""
    if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    with sessions() as session:
        found = session.execute(select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.token_hash == digest(secret))).first()
    if found is None:
        return None
    token, user = found
    if token.revoked_at is not None or user.disabled_at is not None or (token.expires_at is not None and token.expires_at <= now):
        return None
    if token.last_used_at is None or now - token.last_used_at >= _TOUCH_EVERY:
        with transaction(sessions) as session:
            session.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
    return principal(user, token.role, via="token", token_id=token.id)


def token_dict(token: ApiToken, user_name: str, now: datetime) -> dict[str, Any]:
    if token.revoked_at is not None:
        state = "revoked"
    elif token.expires_at is not None and token.expires_at <= now:
        state = "expired"
    else:
        state = "active"
    return {
        "id": token.id, "user": user_name, "name": token.name, "prefix": token.prefix, "role": token.role, "state": state,
        "created_at": token.created_at, "expires_at": token.expires_at, "last_used_at": token.last_used_at, "revoked_at": token.revoked_at,
    }
