"""Users: create, list, change role/scope/password, disable; password checks.

Passwords are hashed with Argon2id (argon2-cffi's defaults, RFC 9106 low
memory profile); a hash made with older parameters is upgraded at the next
successful login.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hub.auth.roles import Principal, Role, parse_role
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.models_auth import User, WebSession

MIN_PASSWORD_LENGTH = 10
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")
_hasher = PasswordHasher()
#: Verified against when the user name is unknown, so both cases take as long.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


class UserNotFound(NotFound):
    code = "user_not_found"


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidRequest(f"password must be at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def check_password(session: Session, name: str, password: str) -> User | None:
    """The enabled user called ``name`` if ``password`` is theirs, else None.
    Only reads: call it outside a write transaction (the hash is slow on
    purpose and must not hold the database's write lock)."""
    user = session.scalar(select(User).where(User.name == name))
    try:
        _hasher.verify(user.password_hash if user is not None else _DUMMY_HASH, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if user is None or user.disabled_at is not None:
        return None
    return user


def rehash_if_needed(user: User, password: str) -> None:
    """After a successful check: store a new hash if the hashing parameters changed since."""
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)


def clean_scope(values: Iterable[str] | None, what: str) -> list[str] | None:
    if values is None:
        return None
    cleaned = sorted({str(v).strip() for v in values if str(v).strip()})
    if not cleaned:
        raise InvalidRequest(f"{what} scope is empty: give at least one value, or none to lift the restriction")
    return cleaned


def create_user(
    session: Session, name: str, password: str, role: str, now: datetime, *, scope_tags: Iterable[str] | None = None, scope_groups: Iterable[str] | None = None,
) -> User:
    if not _NAME.match(name):
        raise InvalidRequest(f"user name {name!r} is not valid: letters, digits, '_', '.', '@', '-', at most 100, starting with a letter or digit")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    user = User(
        name=name, password_hash=hash_password(password), role=parse_role(role).value, scope_tags=clean_scope(scope_tags, "DAG tag"),
        scope_groups=clean_scope(scope_groups, "device group"), created_at=now, password_changed_at=now,
    )
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserNotFound(f"no user called {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.name)))


def set_role(session: Session, user: User, role: str) -> None:
    user.role = parse_role(role).value


def set_scope(session: Session, user: User, *, tags: Iterable[str] | None, groups: Iterable[str] | None) -> None:
    user.scope_tags = clean_scope(tags, "DAG tag")
    user.scope_groups = clean_scope(groups, "device group")


def set_password(session: Session, user: User, password: str, now: datetime) -> None:
    """New password; the user's dashboard sessions end (tokens stay)."""
    user.password_hash = hash_password(password)
    user.password_changed_at = now
    end_sessions(session, user.id, now)


def set_disabled(session: Session, user: User, disabled: bool, now: datetime) -> None:
    """Disable (no login; its sessions end and its tokens stop working) or enable again."""
    if disabled and user.disabled_at is None:
        user.disabled_at = now
        end_sessions(session, user.id, now)
    elif not disabled:
        user.disabled_at = None


def end_sessions(session: Session, user_id: int, now: datetime) -> None:
    session.execute(update(WebSession).where(WebSession.user_id == user_id, WebSession.ended_at.is_(None)).values(ended_at=now))


def principal(user: User, role: str | None = None, **extra: Any) -> Principal:
    """The principal acting as ``user``, with ``role`` capped by the user's."""
    from hub.auth.roles import lowest

    effective = lowest(role, user.role) if role else Role(user.role)
    return Principal(
        user_id=user.id, name=user.name, role=effective,
        scope_tags=frozenset(user.scope_tags) if user.scope_tags is not None else None,
        scope_groups=frozenset(user.scope_groups) if user.scope_groups is not None else None,
        **extra,
    )


def user_dict(user: User) -> dict[str, Any]:
    return {
        "name": user.name, "role": user.role, "scope_tags": user.scope_tags, "scope_groups": user.scope_groups,
        "created_at": user.created_at, "disabled": user.disabled_at is not None, "disabled_at": user.disabled_at,
        "password_changed_at": user.password_changed_at,
    }
