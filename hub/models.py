"""The metadata tables (SQLAlchemy 2). Schema changes go through Alembic
(``hub/migrations``); ``tests/hub/test_migrations.py`` checks the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[Any]: JSON, Any: JSON}


class Dag(Base):
    __tablename__ = "dags"

    dag_id: Mapped[str] = mapped_column(String(250), primary_key=True)
    fileloc: Mapped[str] = mapped_column(String(1000))
    description: Mapped[str | None] = mapped_column(Text)
    schedule: Mapped[str | None] = mapped_column(String(100))
    is_paused: Mapped[bool] = mapped_column(Boolean, default=False)
    #: False once the DAG disappeared from the DAG folder.
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    tags: Mapped[list[Any]] = mapped_column(default=list)
    #: Serialized structure: tasks, dependencies, targets (see hub.dag.DAG.serialize).
    structure: Mapped[dict[str, Any]] = mapped_column(default=dict)
    next_run_at: Mapped[datetime | None]
    last_parsed_at: Mapped[datetime | None]


class DagImportError(Base):
    __tablename__ = "dag_import_errors"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    fileloc: Mapped[str] = mapped_column(String(1000), unique=True)
    kind: Mapped[str] = mapped_column(String(50))
    error: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime]


class DagRun(Base):
    __tablename__ = "dag_runs"
    __table_args__ = (UniqueConstraint("dag_id", "run_id"), Index("ix_dag_runs_state", "state"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(ForeignKey("dags.dag_id"))
    run_id: Mapped[str] = mapped_column(String(250))
    run_type: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20))
    logical_date: Mapped[datetime]
    conf: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]

    task_instances: Mapped[list[TaskInstance]] = relationship(back_populates="run", order_by="TaskInstance.id")


class TaskInstance(Base):
    __tablename__ = "task_instances"
    __table_args__ = (UniqueConstraint("run_pk", "task_id", "map_index"), Index("ix_task_instances_state", "state"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("dag_runs.id", ondelete="CASCADE"), index=True)
    dag_id: Mapped[str] = mapped_column(String(250))
    run_id: Mapped[str] = mapped_column(String(250))
    task_id: Mapped[str] = mapped_column(String(250))
    #: -1 for an unmapped task; 0..n-1 for each device of a fleet fan-out.
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    #: "hub" (Python callable on the hub) or "agent" (a job type on a device).
    kind: Mapped[str] = mapped_column(String(10))
    state: Mapped[str] = mapped_column(String(20))
    try_number: Mapped[int] = mapped_column(Integer, default=0)
    max_tries: Mapped[int] = mapped_column(Integer, default=1)
    retry_delay: Mapped[float] = mapped_column(Float, default=0.0)
    execution_timeout: Mapped[float | None] = mapped_column(Float)
    job_type: Mapped[str | None] = mapped_column(String(100))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    agent_id: Mapped[str | None] = mapped_column(String(128), index=True)
    output: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    ended_at: Mapped[datetime | None]
    next_try_at: Mapped[datetime | None]

    run: Mapped[DagRun] = relationship(back_populates="task_instances")

    @property
    def key(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}[{self.map_index}]"


class Assignment(Base):
    """One try of one task instance sent to one agent."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("ti_id", "try_number", "agent_id"), Index("ix_assignments_state", "state"))

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    ti_id: Mapped[int] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"), index=True)
    try_number: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str] = mapped_column(String(128), index=True)
    #: pending → sent → accepted → started → finished (or cancelled).
    state: Mapped[str] = mapped_column(String(20))
    created_at: Mapped[datetime]
    last_sent_at: Mapped[datetime | None]
    send_count: Mapped[int] = mapped_column(Integer, default=0)
    accepted_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class OutboxMessage(Base):
    """A message committed with the state change that caused it; the
    publisher sends it and stamps ``published_at`` (transactional outbox)."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(300))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    qos: Mapped[int] = mapped_column(Integer, default=1)
    retain: Mapped[bool] = mapped_column(Boolean, default=False)
    assignment_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime]
    published_at: Mapped[datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)


class TaskResult(Base):
    """A device's result, applied once: unique on task instance, try, agent."""

    __tablename__ = "task_results"
    __table_args__ = (UniqueConstraint("ti_id", "try_number", "agent_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ti_id: Mapped[int] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"), index=True)
    try_number: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str] = mapped_column(String(128))
    assignment_id: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(20))
    output: Mapped[Any | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    hlc: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[datetime]
    #: False when the result arrived too late to decide the task (kept, not applied).
    applied: Mapped[bool] = mapped_column(Boolean, default=True)


class Agent(Base):
    __tablename__ = "agents"

    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255), default="")
    agent_version: Mapped[str] = mapped_column(String(50), default="")
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: [{"name": ..., "version": ...}] as advertised in the agent's status.
    job_types: Mapped[list[Any]] = mapped_column(default=list)
    #: "online" or "offline".
    state: Mapped[str] = mapped_column(String(20), default="offline")
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]
    #: The last heartbeat body (queue depths, running, counters).
    last_heartbeat: Mapped[dict[str, Any]] = mapped_column(default=dict)
    #: HLC of the last status applied, so a stale retained status never wins.
    status_hlc: Mapped[str] = mapped_column(String(200), default="")


class RejectedMessage(Base):
    """Bad input from the wire: recorded, counted, never fatal."""

    __tablename__ = "rejected_messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(20))
    topic: Mapped[str] = mapped_column(String(300), default="")
    agent_id: Mapped[str | None] = mapped_column(String(128))
    code: Mapped[str] = mapped_column(String(50), index=True)
    detail: Mapped[str] = mapped_column(Text)
    excerpt: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime]
