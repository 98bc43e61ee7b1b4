"""Variables and connections: stored encrypted, written and listed by
operators, read by DAGs.

Values are encrypted with the hub's Fernet keys (hub.encryption) before
they reach the database and decrypted only where a task reads them
(hub.secretvars). What operators see (:func:`variable_view`,
:func:`connection_view`) never carries a value: a variable shows whether it
is set, a connection shows ``***`` for its password and for extra fields
with secret-looking names. :func:`reencrypt` rewrites every stored value
with the primary key (rotation); :func:`secret_values` feeds the masker.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub.db import transaction
from hub.encryption import SecretCipher
from hub.errors import Conflict, InvalidRequest, NotFound
from hub.masking import MASK, MASKER, is_sensitive
from hub.models import Connection, Variable

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
#: Largest variable value or connection extra, as text.
MAX_VALUE_CHARS = 64 * 1024
#: Rows re-encrypted per transaction by :func:`reencrypt`.
REENCRYPT_BATCH = 500
CONNECTION_FIELDS = ("conn_type", "description", "host", "login", "port", "schema", "password", "extra")


class VariableNotFound(NotFound):
    code = "variable_not_found"


class ConnectionNotFound(NotFound):
    code = "connection_not_found"


def check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise InvalidRequest(f"{what} {name!r} is not valid: use 1 to 250 letters, digits, '_', '.' or '-'")


def _check_size(value: str, what: str) -> None:
    if len(value) > MAX_VALUE_CHARS:
        raise InvalidRequest(f"{what} is {len(value)} characters; at most {MAX_VALUE_CHARS} are stored")


# --- variables ------------------------------------------------------------------


def variable_view(row: Variable) -> dict[str, Any]:
    return {
        "key": row.key, "description": row.description, "is_set": bool(row.value_encrypted), "sensitive": is_sensitive(row.key),
        "created_at": row.created_at, "updated_at": row.updated_at,
    }


def list_variables(session: Session, *, limit: int, offset: int) -> dict[str, Any]:
    total = session.scalar(select(func.count()).select_from(Variable)) or 0
    rows = session.scalars(select(Variable).order_by(Variable.key).limit(limit).offset(offset))
    return {"items": [variable_view(r) for r in rows], "total": total, "limit": limit, "offset": offset}


def get_variable(session: Session, key: str) -> Variable:
    row = session.get(Variable, key)
    if row is None:
        raise VariableNotFound(f"variable {key!r} not found; list variables with GET /api/v1/variables")
    return row


def set_variable(
    sessions: sessionmaker[Session], cipher: SecretCipher, key: str, value: str, now: datetime, *,
    description: str | None = None, create_only: bool = False, actor: str = "hub",
) -> bool:
    """Create or replace variable ``key``; True when it was created.
    ``description`` None keeps the current one."""
    check_name(key, "variable key")
    _check_size(value, f"the value of variable {key!r}")
    token = cipher.encrypt(value)
    with transaction(sessions) as session:
        row = session.get(Variable, key)
        if row is not None and create_only:
            raise Conflict(f"variable {key!r} exists; change it with PUT /api/v1/variables/{key}")
        created = row is None
        if row is None:
            row = Variable(key=key, description="", created_at=now)
            session.add(row)
        row.value_encrypted, row.updated_at = token, now
        if description is not None:
            row.description = description
        audit.record(session, actor, "variable.create" if created else "variable.update", key, at=now)
    MASKER.invalidate()
    return created


def delete_variable(sessions: sessionmaker[Session], key: str, now: datetime, *, actor: str = "hub") -> None:
    with transaction(sessions) as session:
        session.delete(get_variable(session, key))
        audit.record(session, actor, "variable.delete", key, at=now)
    MASKER.invalidate()


def read_variable(session: Session, cipher: SecretCipher, key: str) -> str | None:
    """The value of variable ``key`` (None when there is none)."""
    row = session.get(Variable, key)
    if row is None:
        return None
    return cipher.decrypt(row.value_encrypted, f"variable {key!r}")


# --- connections ----------------------------------------------------------------


def _extra_text(extra: Any, conn_id: str) -> str | None:
    if extra is None:
        return None
    if not isinstance(extra, dict):
        raise InvalidRequest(f"the extra of connection {conn_id!r} must be a JSON object")
    text = json.dumps(extra, sort_keys=True)
    _check_size(text, f"the extra of connection {conn_id!r}")
    return text


def connection_view(row: Connection, cipher: SecretCipher | None = None) -> dict[str, Any]:
    """What operators see: no password, and extra values with secret-looking
    names (or known secret values inside) as ``***``. Without a cipher (or
    with a key that cannot read it) the extra shows as null."""
    extra: dict[str, Any] | None = None
    if row.extra_encrypted and cipher is not None:
        try:
            loaded = json.loads(cipher.decrypt(row.extra_encrypted, f"the extra of connection {row.conn_id!r}"))
            extra = MASKER.redact(loaded) if isinstance(loaded, dict) else None
        except Exception:
            extra = None
    return {
        "conn_id": row.conn_id, "conn_type": row.conn_type, "description": row.description, "host": row.host, "login": row.login,
        "port": row.port, "schema": row.schema, "password": MASK if row.password_encrypted else None, "extra": extra,
        "created_at": row.created_at, "updated_at": row.updated_at,
    }


def list_connections(session: Session, cipher: SecretCipher | None, *, limit: int, offset: int) -> dict[str, Any]:
    total = session.scalar(select(func.count()).select_from(Connection)) or 0
    rows = session.scalars(select(Connection).order_by(Connection.conn_id).limit(limit).offset(offset))
    return {"items": [connection_view(r, cipher) for r in rows], "total": total, "limit": limit, "offset": offset}


def get_connection(session: Session, conn_id: str) -> Connection:
    row = session.get(Connection, conn_id)
    if row is None:
        raise ConnectionNotFound(f"connection {conn_id!r} not found; list connections with GET /api/v1/connections")
    return row


def save_connection(
    sessions: sessionmaker[Session], cipher: SecretCipher, conn_id: str, fields: dict[str, Any], now: datetime, *, create: bool, actor: str = "hub"
) -> None:
    """Create connection ``conn_id`` (``create``; Conflict if it exists) or
    change the ``fields`` given (NotFound if it does not exist). A field
    given as None is cleared."""
    check_name(conn_id, "connection id")
    unknown = set(fields) - set(CONNECTION_FIELDS)
    if unknown:
        raise InvalidRequest(f"unknown connection field(s): {', '.join(sorted(unknown))}")
    port = fields.get("port")
    if port is not None and not (isinstance(port, int) and 0 < port < 65536):
        raise InvalidRequest(f"port {port!r} of connection {conn_id!r} is not a port number (1-65535)")
    for name in ("host", "login", "schema"):
        if isinstance(fields.get(name), str) and len(fields[name]) > 500:
            raise InvalidRequest(f"{name} of connection {conn_id!r} is longer than 500 characters")
    if isinstance(fields.get("conn_type"), str) and len(fields["conn_type"]) > 100:
        raise InvalidRequest(f"conn_type of connection {conn_id!r} is longer than 100 characters")
    password = fields.get("password")
    if isinstance(password, str):
        _check_size(password, f"the password of connection {conn_id!r}")
    extra = _extra_text(fields["extra"], conn_id) if "extra" in fields else None
    with transaction(sessions) as session:
        row = session.get(Connection, conn_id)
        if create and row is not None:
            raise Conflict(f"connection {conn_id!r} exists; change it with PATCH /api/v1/connections/{conn_id}")
        if not create and row is None:
            raise ConnectionNotFound(f"connection {conn_id!r} not found; create it with POST /api/v1/connections")
        if row is None:
            row = Connection(conn_id=conn_id, conn_type="", description="", created_at=now)
            session.add(row)
        for name in ("host", "login", "port", "schema"):
            if name in fields:
                setattr(row, name, fields[name])
        for name in ("conn_type", "description"):
            if name in fields:
                setattr(row, name, fields[name] or "")
        if "password" in fields:
            row.password_encrypted = cipher.encrypt(password) if password else None
        if "extra" in fields:
            row.extra_encrypted = cipher.encrypt(extra) if extra else None
        row.updated_at = now
        # Which fields changed, never their values.
        audit.record(session, actor, "connection.create" if create else "connection.update", conn_id, at=now, fields=sorted(fields))
    MASKER.invalidate()


def delete_connection(sessions: sessionmaker[Session], conn_id: str, now: datetime, *, actor: str = "hub") -> None:
    with transaction(sessions) as session:
        session.delete(get_connection(session, conn_id))
        audit.record(session, actor, "connection.delete", conn_id, at=now)
    MASKER.invalidate()


def read_connection(session: Session, cipher: SecretCipher, conn_id: str) -> dict[str, Any] | None:
    """Connection ``conn_id`` with its password and extra decrypted (None
    when there is none)."""
    row = session.get(Connection, conn_id)
    if row is None:
        return None
    extra: dict[str, Any] = {}
    if row.extra_encrypted:
        loaded = json.loads(cipher.decrypt(row.extra_encrypted, f"the extra of connection {conn_id!r}"))
        extra = loaded if isinstance(loaded, dict) else {}
    password = cipher.decrypt(row.password_encrypted, f"the password of connection {conn_id!r}") if row.password_encrypted else None
    return {
        "conn_id": row.conn_id, "conn_type": row.conn_type, "description": row.description, "host": row.host, "login": row.login,
        "password": password, "port": row.port, "schema": row.schema, "extra": extra,
    }


# --- rotation and masking ---------------------------------------------------------


def _batches(sessions: sessionmaker[Session], column: Any, batch: int) -> Iterator[tuple[Session, list[Any]]]:
    """Keyset pages of rows, each in its own transaction (committed when the
    consumer asks for the next page)."""
    last: str | None = None
    model = column.class_
    while True:
        with transaction(sessions) as session:
            stmt = select(model).order_by(column).limit(batch)
            if last is not None:
                stmt = stmt.where(column > last)
            rows = list(session.scalars(stmt))
            if not rows:
                return
            yield session, rows
            last = getattr(rows[-1], column.key)


def reencrypt(sessions: sessionmaker[Session], cipher: SecretCipher, *, batch: int = REENCRYPT_BATCH) -> dict[str, int]:
    """Re-encrypt every stored value not already encrypted with the primary
    key, ``batch`` rows per transaction (a crash leaves every row readable:
    each is old-key or new-key, both in ``fernet_keys``). Raises
    ``SecretUnreadable`` for a value no key decrypts (earlier batches stay
    rotated). Returns how many values were rewritten and left as they were."""
    counts = {"rotated": 0, "unchanged": 0}

    def rotate(token: str | None, what: str) -> str | None:
        if not token:
            return token
        if cipher.is_primary(token):
            counts["unchanged"] += 1
            return token
        counts["rotated"] += 1
        return cipher.rotate(token, what)

    for _session, rows in _batches(sessions, Variable.key, batch):
        for var in rows:
            var.value_encrypted = rotate(var.value_encrypted, f"variable {var.key!r}") or ""
    for _session, rows in _batches(sessions, Connection.conn_id, batch):
        for conn in rows:
            conn.password_encrypted = rotate(conn.password_encrypted, f"the password of connection {conn.conn_id!r}")
            conn.extra_encrypted = rotate(conn.extra_encrypted, f"the extra of connection {conn.conn_id!r}")
    return counts


def _sensitive_leaves(value: Any, name: str | None = None) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _sensitive_leaves(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _sensitive_leaves(v, name)
    elif value is not None and is_sensitive(name):
        yield str(value)


def secret_values(sessions: sessionmaker[Session], cipher: SecretCipher) -> Callable[[], list[str]]:
    """The masker's source: the values of variables with sensitive keys
    (and their JSON leaves), every connection password, and extra values
    under sensitive names. A value no key decrypts is skipped."""

    def load() -> list[str]:
        values: list[str] = []
        with sessions() as session:
            for key, token in session.execute(select(Variable.key, Variable.value_encrypted)):
                if not is_sensitive(key):
                    continue
                try:
                    value = cipher.decrypt(token)
                except Exception:
                    continue
                values.append(value)
                try:
                    parsed = json.loads(value)
                except ValueError:
                    continue
                if isinstance(parsed, (dict, list)):
                    values.extend(_leaves_of(parsed))
            for password, extra in session.execute(select(Connection.password_encrypted, Connection.extra_encrypted)):
                try:
                    if password:
                        values.append(cipher.decrypt(password))
                    if extra:
                        values.extend(_sensitive_leaves(json.loads(cipher.decrypt(extra))))
                except Exception:
                    continue
        return values

    return load


def _leaves_of(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves_of(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves_of(v)
    elif value is not None and not isinstance(value, bool):
        yield str(value)
