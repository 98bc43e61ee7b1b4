"""Engine, sessions and transactions for the metadata DB.

SQLite (WAL) is the embedded default; PostgreSQL is the production store.
Nothing here or in the models is SQLite-only: the same migrations run on both.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Select, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")
_WRITE = "outpost_write"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """Create an engine; for SQLite, create the folder and set WAL pragmas."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        _serialize_sqlite_writers(engine)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _serialize_sqlite_writers(engine: Engine) -> None:
    """SQLite has one writer at a time. Write transactions (those opened by
    :func:`transaction`) take the write lock up front (``BEGIN IMMEDIATE``),
    so a read-then-write never fails half way, and queue on a lock in this
    process first, so threads of one hub wait in line instead of in SQLite's
    busy handler, whose back-off sleeps cost tens of milliseconds. Reads use
    a plain ``BEGIN`` and, thanks to WAL, never wait for writers."""
    lock = threading.Lock()

    def begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_WRITE):
            lock.acquire()
            conn.info[_WRITE] = True
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            except BaseException:
                _release(conn)
                raise
        else:
            conn.exec_driver_sql("BEGIN")

    def _release(conn: Connection) -> None:
        if conn.info.pop(_WRITE, False):
            lock.release()

    def checkin(dbapi_conn: Any, record: Any) -> None:
        if record.info.pop(_WRITE, False):  # a transaction that never ended cleanly
            lock.release()

    event.listen(engine, "begin", begin)
    event.listen(engine, "commit", _release)
    event.listen(engine, "rollback", _release)
    event.listen(engine.pool, "checkin", checkin)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work that writes: commit on success, roll back on any
    exception. Reads need no transaction helper: use ``factory()``."""
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
