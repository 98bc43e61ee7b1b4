"""First-run credentials for ``outpost-hub standalone``: an admin user with
a random password and an admin API token in a file for the ``outpost`` CLI."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub.auth import tokens, users
from hub.auth.keys import write_private
from hub.auth.roles import Role
from hub.db import transaction
from hub.models_auth import User

ADMIN_NAME = "admin"
#: In the hub state folder: the first admin password and an admin API token (mode 0600).
PASSWORD_FILE = "admin-password"
TOKEN_FILE = "admin-token"


@dataclass(frozen=True)
class AdminLogin:
    name: str
    #: The file holding the first-run password (None if the admin existed before this folder's file).
    password_file: Path | None
    #: The file holding an admin token (None when there is no enabled admin called ``admin``).
    token_file: Path | None


def ensure_admin(sessions: sessionmaker[Session], folder: Path, now: datetime) -> AdminLogin:
    """With no users yet, create ``admin`` with a random password (kept in
    ``folder/admin-password``, 0600, for the console and the README demo).
    Make sure ``folder/admin-token`` holds a working admin token."""
    folder.mkdir(parents=True, exist_ok=True)
    password_file = folder / PASSWORD_FILE
    token_file = folder / TOKEN_FILE
    with transaction(sessions) as session:
        if not session.scalar(select(func.count()).select_from(User)):
            password = secrets.token_urlsafe(12)
            users.create_user(session, ADMIN_NAME, password, Role.ADMIN, now)
            audit.record(session, "hub", "user.create", ADMIN_NAME, at=now, role="admin", reason="standalone first run")
            write_private(password_file, password + "\n")
        admin = session.scalar(select(User).where(User.name == ADMIN_NAME, User.role == Role.ADMIN.value, User.disabled_at.is_(None)))
    if admin is not None and not _token_works(sessions, token_file, now):
        with transaction(sessions) as session:
            user = session.get(User, admin.id)
            assert user is not None
            secret, row = tokens.create_token(session, user, "standalone CLI", now)
            audit.record(session, "hub", "token.create", f"token:{row.id}", at=now, user=ADMIN_NAME, name=row.name, role=row.role, reason="standalone CLI token")
        write_private(token_file, secret + "\n")
    return AdminLogin(ADMIN_NAME, password_file if password_file.exists() else None, token_file if admin is not None else None)


def _token_works(sessions: sessionmaker[Session], path: Path, now: datetime) -> bool:
    if not path.exists():
        return False
    who = tokens.authenticate(sessions, path.read_text().strip(), now)
    return who is not None and who.role == Role.ADMIN
