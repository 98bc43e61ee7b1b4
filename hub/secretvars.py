"""Variables and connections as DAG code sees them.

Templates read ``{{ var.value.NAME }}``, ``{{ var.json.NAME }}``,
``{{ var.value.get("NAME", "fallback") }}``, ``{{ conn.ID.host }}``,
``{{ conn.ID.password }}`` or ``{{ conn.get("ID").extra_dejson.region }}``;
hub-task code calls ``Variable.get("NAME")`` and ``Connection.get("ID")``
(importable from hub.sdk, as in Airflow). Both read through the
:class:`SecretStore` of the process: the hub's for agent-task params
(rendered on the hub), the worker's for hub tasks (set around each task by
hub.worker). Every sensitive value read is registered with the masker.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from sqlalchemy.orm import Session, sessionmaker

from hub import vault
from hub.encryption import SecretCipher
from hub.errors import HubError
from hub.masking import MASKER, is_sensitive

_NOTSET: Any = object()


class SecretsUnavailable(HubError):
    """No store: this process was started without ``fernet_keys``."""

    status = 503
    code = "secrets_unavailable"


@dataclass(frozen=True)
class ConnectionValue:
    """A connection with its secrets, as Airflow's ``Connection`` reads."""

    conn_id: str
    conn_type: str = ""
    description: str = ""
    host: str | None = None
    login: str | None = None
    password: str | None = None
    port: int | None = None
    schema: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def extra_dejson(self) -> dict[str, Any]:
        return dict(self.extra)

    def get_uri(self) -> str:
        """``type://login:password@host:port/schema`` (quoted parts)."""
        auth = ""
        if self.login or self.password:
            auth = quote(self.login or "", safe="") + (":" + quote(self.password, safe="") if self.password else "") + "@"
        port = f":{self.port}" if self.port else ""
        schema = f"/{quote(self.schema, safe='')}" if self.schema else ""
        return f"{self.conn_type or 'generic'}://{auth}{self.host or ''}{port}{schema}"

    def __repr__(self) -> str:  # never print the password
        return f"<Connection {self.conn_id} {self.conn_type} {self.login or ''}@{self.host or ''}>"


class SecretStore:
    """Reads variables and connections with the hub's keys."""

    def __init__(self, sessions: sessionmaker[Session], cipher: SecretCipher) -> None:
        self.sessions = sessions
        self.cipher = cipher

    def variable(self, key: str) -> str | None:
        with self.sessions() as session:
            value = vault.read_variable(session, self.cipher, key)
        if value is not None and is_sensitive(key):
            MASKER.add(value)
        return value

    def connection(self, conn_id: str) -> ConnectionValue | None:
        with self.sessions() as session:
            found = vault.read_connection(session, self.cipher, conn_id)
        if found is None:
            return None
        if found["password"]:
            MASKER.add(found["password"])
        for name, value in found["extra"].items():
            if is_sensitive(name) and value is not None:
                MASKER.add(value)
        return ConnectionValue(**found)


def open_store(sessions: sessionmaker[Session], cipher: SecretCipher) -> SecretStore:
    """The store of a process that runs DAG code or renders templates; the
    process's masker learns the stored secrets from the same database."""
    MASKER.set_source(vault.secret_values(sessions, cipher))
    return SecretStore(sessions, cipher)


_current: contextvars.ContextVar[SecretStore | None] = contextvars.ContextVar("outpost_secret_store", default=None)
_default: list[SecretStore | None] = [None]


def set_default_store(store: SecretStore | None) -> None:
    """The store of this process (a hub-task worker, the hub)."""
    _default[0] = store


@contextlib.contextmanager
def using(store: SecretStore | None) -> Iterator[None]:
    """Run DAG code with ``store`` (None: the process's default)."""
    token = _current.set(store)
    try:
        yield
    finally:
        _current.reset(token)


def current_store() -> SecretStore:
    store = _current.get() or _default[0]
    if store is None:
        raise SecretsUnavailable("variables and connections are not available in this process: the hub runs without fernet_keys")
    return store


class Variable:
    """Airflow's ``Variable`` for hub-task code."""

    @staticmethod
    def get(key: str, default_var: Any = _NOTSET, deserialize_json: bool = False, *, default: Any = _NOTSET) -> Any:
        """The value of variable ``key`` (parsed as JSON with
        ``deserialize_json``); ``default_var`` (or ``default``) when it does
        not exist, else ``VariableNotFound``."""
        fallback = default if default is not _NOTSET else default_var
        value = current_store().variable(key)
        if value is None:
            if fallback is not _NOTSET:
                return fallback
            raise vault.VariableNotFound(f"variable {key!r} does not exist; set it with 'outpost variables set {key} VALUE'")
        if deserialize_json:
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError(f"variable {key!r} is not JSON") from None
        return value


class Connection:
    """Airflow's ``Connection`` for hub-task code."""

    @staticmethod
    def get(conn_id: str) -> ConnectionValue:
        found = current_store().connection(conn_id)
        if found is None:
            raise vault.ConnectionNotFound(f"connection {conn_id!r} does not exist; add it with 'outpost connections add {conn_id} ...'")
        return found

    get_connection_from_secrets = get


# --- templates: var and conn -----------------------------------------------------


class _VariableValues:
    def __init__(self, deserialize: bool) -> None:
        self._deserialize = deserialize

    def get(self, key: str, default: Any = _NOTSET) -> Any:
        return Variable.get(key, default, deserialize_json=self._deserialize)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        return self.get(key)

    __getitem__ = get


class VariableAccessor:
    """``var`` in templates: ``var.value.NAME`` and ``var.json.NAME``."""

    value = _VariableValues(False)
    json = _VariableValues(True)


class ConnectionAccessor:
    """``conn`` in templates: ``conn.ID.host``, ``conn.get("ID")``."""

    def get(self, conn_id: str, default: Any = _NOTSET) -> Any:
        try:
            return Connection.get(conn_id)
        except vault.ConnectionNotFound:
            if default is not _NOTSET:
                return default
            raise

    def __getattr__(self, conn_id: str) -> Any:
        if conn_id.startswith("__"):
            raise AttributeError(conn_id)
        return self.get(conn_id)

    __getitem__ = get


def template_accessors() -> dict[str, Any]:
    """The context entries templates and task code get."""
    return {"var": VariableAccessor(), "conn": ConnectionAccessor()}
