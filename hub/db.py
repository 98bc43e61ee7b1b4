"""Engine, sessions and transactions for the metadata DB.

SQLite (WAL) is the embedded default; PostgreSQL is the production store.
Nothing here or in the models is SQLite-only: the same migrations run on both.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Select, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
_WRITE = "outpost_write"
#: One write lock per SQLite engine (see _serialize_sqlite_writers).
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


def make_engine(url: str, *, sqlite_synchronous: str = "FULL", **kwargs: Any) -> Engine:
    """Create an engine; for SQLite, create the folder and set WAL pragmas.

    ``sqlite_synchronous`` FULL makes every commit survive power loss; the
    hub acknowledges results after commit and the agent then forgets them,
    so NORMAL (safe against process crashes only) could lose a result when
    the hub machine loses power."""
    if sqlite_synchronous not in ("FULL", "NORMAL"):
        raise ValueError(f"sqlite_synchronous must be FULL or NORMAL, not {sqlite_synchronous!r}")
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", lambda conn, record: _sqlite_pragmas(conn, sqlite_synchronous))
        _serialize_sqlite_writers(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_conn: Any, synchronous: str) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _serialize_sqlite_writers(engine: Engine) -> None:
    """SQLite has one writer at a time. Write transactions (those opened by
    :func:`transaction`) take the write lock up front (``BEGIN IMMEDIATE``),
    so a read-then-write never fails half way, and queue on a lock of this
    process first (held from before BEGIN to after COMMIT), so threads of one
    hub wait in line instead of in SQLite's busy handler, whose back-off
    sleeps cost tens of milliseconds. Reads use a plain ``BEGIN`` and, thanks
    to WAL, never wait for writers."""
    _WRITE_LOCKS[engine] = threading.RLock()

    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN")

    event.listen(engine, "begin", begin)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work that writes: commit on success, roll back on any
    exception. Reads need no transaction helper: use ``factory()``."""
    engine = factory.kw.get("bind")
    lock = _WRITE_LOCKS.get(engine) if engine is not None else None
    with lock or contextlib.nullcontext():
        with factory() as session, session.begin():
            session.connection(execution_options={_WRITE: True})
            yield session


def skip_locked(stmt: Select[Any], session: Session) -> Select[Any]:
    """Lock the selected rows for this transaction, skipping rows another
    scheduler holds (PostgreSQL). SQLite has one writer at a time, so its
    transaction already excludes the others."""
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update(skip_locked=True)
    return stmt


def for_update(stmt: Select[Any], session: Session) -> Select[Any]:
    """Lock the selected rows until commit (PostgreSQL), waiting for other
    hub processes that hold them: used where two processes may change the
    same rows (ingestion of one agent's events through a shared
    subscription). Sort ``stmt`` by primary key so lock order is stable."""
    if session.get_bind().dialect.name == "postgresql":
        return stmt.with_for_update()
    return stmt


def upgrade(url: str) -> None:
    """Bring the schema to the newest migration."""
    from alembic import command

    command.upgrade(alembic_config(url), "head")


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg
