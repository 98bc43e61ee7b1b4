"""The tables of hub users and their credentials: users, API tokens,
dashboard sessions and failed logins (``hub.auth`` works on them).

Secrets are never stored: passwords as Argon2id hashes, API tokens and
session ids as SHA-256 of the random value (they are 256-bit random, so a
slow hash adds nothing; a leaked table still cannot be replayed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from hub.models import Base


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    #: Argon2id, in the PHC string form argon2-cffi writes.
    password_hash: Mapped[str] = mapped_column(String(200))
    #: admin, operator or viewer (hub.auth.roles).
    role: Mapped[str] = mapped_column(String(20))
    #: DAG tags the user is limited to; null: every DAG.
    scope_tags: Mapped[list[Any] | None] = mapped_column(default=None)
    #: Device groups (the agent label ``group``) the user is limited to; null: every agent.
    scope_groups: Mapped[list[Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime]
    #: Set when disabled: no login, its tokens and sessions stop working.
    disabled_at: Mapped[datetime | None]
    password_changed_at: Mapped[datetime]


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    #: SHA-256 (hex) of the whole token.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: The token's first characters, to tell tokens apart in lists.
    prefix: Mapped[str] = mapped_column(String(20))
    #: The most the token may do; the user's current role caps it further.
    role: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class WebSession(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: SHA-256 (hex) of the cookie value.
    id_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime]
    last_seen_at: Mapped[datetime]
    #: Absolute expiry (created_at + session_max_age); idle expiry is from last_seen_at.
    expires_at: Mapped[datetime]
    ended_at: Mapped[datetime | None]
    address: Mapped[str] = mapped_column(String(100), default="")


class LoginFailure(Base):
    """One failed login; counted per user name and per client address over
    a window, in the DB so every hub process sees the same count."""

    __tablename__ = "login_failures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(100), index=True)
    address: Mapped[str] = mapped_column(String(100), index=True)
    at: Mapped[datetime] = mapped_column(index=True)
