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
    #: The data interval of the next scheduled run (its logical date is the start).
    next_data_interval_start: Mapped[datetime | None]
    next_data_interval_end: Mapped[datetime | None]
    max_active_runs: Mapped[int] = mapped_column(Integer, default=16)
    max_active_tasks: Mapped[int] = mapped_column(Integer, default=16)
    #: The newest row of ``dag_versions`` for this DAG.
    latest_version_id: Mapped[int | None] = mapped_column(Integer)


class DagVersion(Base):
    """One structure of a DAG. A parse that changes the structure adds a
    version; a run keeps the version it started with."""

    __tablename__ = "dag_versions"
    __table_args__ = (UniqueConstraint("dag_id", "version_number"), Index("ix_dag_versions_hash", "dag_id", "structure_hash"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(ForeignKey("dags.dag_id"))
    version_number: Mapped[int] = mapped_column(Integer)
    structure: Mapped[dict[str, Any]] = mapped_column(default=dict)
    structure_hash: Mapped[str] = mapped_column(String(64))
    fileloc: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime]


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
    data_interval_start: Mapped[datetime | None]
    data_interval_end: Mapped[datetime | None]
    #: The DAG structure this run follows (see ``DagVersion``).
    dag_version_id: Mapped[int | None] = mapped_column(ForeignKey("dag_versions.id"))
    backfill_id: Mapped[int | None] = mapped_column(ForeignKey("backfills.id"), index=True)
    queued_at: Mapped[datetime | None]
    #: How many times the whole run was cleared to run again.
    clear_number: Mapped[int] = mapped_column(Integer, default=0)
    #: What caused the run beyond its run_type: an asset event id, an agent event, a user.
    triggered_by: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: The DAG's params merged with the conf and validated at trigger time
    #: (what tasks see as ``params``); the conf itself is kept as given.
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)

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
    operator: Mapped[str] = mapped_column(String(100), default="")
    pool: Mapped[str] = mapped_column(String(256), default="default_pool")
    pool_slots: Mapped[int] = mapped_column(Integer, default=1)
    priority_weight: Mapped[int] = mapped_column(Integer, default=1)
    #: Templated fields as rendered for the current try.
    rendered_fields: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    #: A sensor's first poke, from which its timeout counts (reschedules keep it).
    sensor_started_at: Mapped[datetime | None]
    #: The worker process running a hub task.
    pid: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    #: When the instance became ``device_offline``; its ``offline_grace`` counts from here (hub.offline).
    offline_since: Mapped[datetime | None]
    #: When its offline_grace runs out (the scheduler's cheap test for "due").
    offline_until: Mapped[datetime | None] = mapped_column(index=True)
    #: The device's last progress report for the current try, in [0, 1].
    progress: Mapped[float | None] = mapped_column(Float)
    progress_message: Mapped[str | None] = mapped_column(String(500))

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
    #: The Assign's not_before / deadline, fixed at creation so every copy sent is the same message.
    not_before: Mapped[datetime | None]
    deadline: Mapped[datetime | None]


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
    #: The hub's HLC stamp when it took the result in (``hub.reconcile`` orders reports by it).
    received_hlc: Mapped[str | None] = mapped_column(String(200))


class TaskLogChunk(Base):
    """One chunk of the log of one try on a device, stored once (unique on
    assignment and sequence number, so a redelivered chunk is recognised)."""

    __tablename__ = "task_log_chunks"
    __table_args__ = (
        UniqueConstraint("assignment_id", "seq"), Index("ix_task_log_chunks_ti_try", "ti_id", "try_number"),
        # Retention (tasklogs.prune_chunks) finds the oldest chunks by it.
        Index("ix_task_log_chunks_received_at", "received_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ti_id: Mapped[int] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"))
    try_number: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str] = mapped_column(String(128))
    assignment_id: Mapped[str] = mapped_column(String(64))
    seq: Mapped[int] = mapped_column(Integer)
    data: Mapped[str] = mapped_column(Text)
    #: True on the try's last chunk: the log is complete.
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    received_at: Mapped[datetime]


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
    #: HLC of the newest status applied: an ``online`` stamped no later is a
    #: replay (or a retained copy already applied) and is refused.
    status_hlc: Mapped[str] = mapped_column(String(200), default="")
    #: HLC of the last heartbeat applied: one stamped no later is a replay
    #: (a captured heartbeat sent again to fake liveness) and is refused.
    heartbeat_hlc: Mapped[str] = mapped_column(String(200), default="", server_default="")
    #: Seconds the device's clock was ahead (+) or behind (-) the hub's at its last fresh status or heartbeat.
    clock_skew: Mapped[float | None] = mapped_column(Float)
    #: Set while |clock_skew| exceeds max_clock_skew: the device's clock is not trusted (hub.fleet.clock_trusted).
    clock_skew_flagged_at: Mapped[datetime | None]
    #: The device's Ed25519 public key (``ed25519:...``), set at enrolment or
    #: pre-registration; messages from the device must verify with it.
    public_key: Mapped[str | None] = mapped_column(String(100))
    #: When the public key was registered.
    registered_at: Mapped[datetime | None]
    #: Set when an admin revoked the device: its messages, API calls and
    #: broker access are refused from then on.
    revoked_at: Mapped[datetime | None]
    #: The last per-device sequence number the hub signed a message with;
    #: the device refuses a number it has already seen (replay).
    send_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: Fleet groups the operator put the device in (hub-side; rollouts cap
    #: how many devices of one group update at once).
    groups: Mapped[list[Any]] = mapped_column(default=list, server_default="[]")
    #: The device's last reported inventory (hardware model, firmware and
    #: agent versions, job types, free disk and memory), see shared.messages.Inventory.
    inventory: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default="{}")
    #: Copied out of ``inventory`` so selectors and filters can use an index.
    hardware_model: Mapped[str] = mapped_column(String(100), default="", server_default="", index=True)
    firmware_version: Mapped[str] = mapped_column(String(50), default="", server_default="", index=True)


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


class XCom(Base):
    """Values a task pushed under a key other than ``return_value`` (the
    return value itself is ``TaskInstance.output``)."""

    __tablename__ = "xcoms"
    __table_args__ = (UniqueConstraint("run_pk", "task_id", "map_index", "key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("dag_runs.id", ondelete="CASCADE"), index=True)
    task_id: Mapped[str] = mapped_column(String(250))
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    key: Mapped[str] = mapped_column(String(250))
    value: Mapped[Any | None] = mapped_column(JSON)
    created_at: Mapped[datetime]


class Pool(Base):
    """A limit on how many task slots run at once across all DAGs."""

    __tablename__ = "pools"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    slots: Mapped[int] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text, default="")


class Asset(Base):
    __tablename__ = "assets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uri: Mapped[str] = mapped_column(String(1000), unique=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]


class AssetEvent(Base):
    """An asset was updated: by a task's outlet, an agent event or the API."""

    __tablename__ = "asset_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"), index=True)
    source_dag_id: Mapped[str | None] = mapped_column(String(250))
    source_run_id: Mapped[str | None] = mapped_column(String(250))
    source_task_id: Mapped[str | None] = mapped_column(String(250))
    source_map_index: Mapped[int] = mapped_column(Integer, default=-1)
    source_agent_id: Mapped[str | None] = mapped_column(String(128))
    #: "<agent id>/<event id>" of an agent event: a redelivered one is recognised, never applied twice.
    source_event_id: Mapped[str | None] = mapped_column(String(300), unique=True)
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    timestamp: Mapped[datetime]


class AssetDagRunQueue(Base):
    """Asset updates a consuming DAG has seen but not yet run for."""

    __tablename__ = "asset_dag_run_queue"

    asset_id: Mapped[int] = mapped_column(ForeignKey("assets.id"), primary_key=True)
    target_dag_id: Mapped[str] = mapped_column(ForeignKey("dags.dag_id"), primary_key=True)
    created_at: Mapped[datetime]


class Backfill(Base):
    __tablename__ = "backfills"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(ForeignKey("dags.dag_id"), index=True)
    from_date: Mapped[datetime]
    to_date: Mapped[datetime]
    run_backwards: Mapped[bool] = mapped_column(Boolean, default=False)
    max_active_runs: Mapped[int] = mapped_column(Integer, default=10)
    #: "none" (skip intervals that have a run), "failed" (rerun failed ones) or "completed" (rerun all).
    reprocess_behavior: Mapped[str] = mapped_column(String(20), default="none")
    dag_run_conf: Mapped[dict[str, Any]] = mapped_column(default=dict)
    is_paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]


class DeadlineMiss(Base):
    """A task or run that was not done by its SLA or deadline."""

    __tablename__ = "deadline_misses"
    __table_args__ = (UniqueConstraint("run_pk", "task_id", "kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("dag_runs.id", ondelete="CASCADE"), index=True)
    dag_id: Mapped[str] = mapped_column(String(250))
    run_id: Mapped[str] = mapped_column(String(250))
    #: Empty for a run-level deadline.
    task_id: Mapped[str] = mapped_column(String(250), default="")
    #: "task_sla", "dagrun_timeout" or "deadline".
    kind: Mapped[str] = mapped_column(String(20))
    deadline: Mapped[datetime]
    detected_at: Mapped[datetime]
    description: Mapped[str] = mapped_column(Text, default="")
    #: Set once the alert (callback, event) went out.
    notified_at: Mapped[datetime | None]


class CallbackRequest(Base):
    """A DAG-file callback to run on the hub (on_success, on_failure,
    on_retry, sla_miss), recorded in the transaction that decided it so a
    crash between the two cannot lose it (``hub.lifecycle`` writes them,
    the hub workers run them).

    ``kind`` and the callback it calls: ``task_success`` /
    ``task_retry`` / ``task_failure`` → the task's ``on_success_callback``
    / ``on_retry_callback`` / ``on_failure_callback`` (``ti_id``,
    ``task_id`` set); ``dag_success`` / ``dag_failure`` → the DAG's
    ``on_success_callback`` / ``on_failure_callback``; ``sla_miss`` → the
    DAG's ``sla_miss_callback`` (``ti_id``, ``task_id`` null). ``run_pk``
    and ``dag_version_id`` name the run and the DAG version it follows.
    ``payload``: ``reason`` (``success``, ``up_for_retry``, ``failed``,
    ``task_failure``, ``timed_out``, ``sla_miss``), for task kinds
    ``try_number`` and ``map_index`` and, after a failure, ``exception``
    (the instance's error dict: ``code``, ``message``...); for
    ``sla_miss`` ``task_ids`` and ``deadlines`` ({task_id: ISO time});
    for ``timed_out`` ``deadline``. A request is only written when the
    task or DAG has that callback (see the ``callbacks`` lists of the
    serialized structure)."""

    __tablename__ = "callback_requests"
    __table_args__ = (Index("ix_callback_requests_pending", "finished_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(30))
    dag_id: Mapped[str] = mapped_column(String(250))
    run_pk: Mapped[int | None] = mapped_column(ForeignKey("dag_runs.id", ondelete="CASCADE"))
    ti_id: Mapped[int | None] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"))
    task_id: Mapped[str | None] = mapped_column(String(250))
    dag_version_id: Mapped[int | None] = mapped_column(Integer)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class Decision(Base):
    """A decision the hub or an operator made about a task instance's try
    without a result from its device: an automatic give-up (``source``
    "hub": ``execution_timeout``, ``offline_grace``, ``deadline``) or an
    operator's ``mark`` / ``cancel`` / ``clear`` (``source`` "operator").
    With the instance's ``task_results`` these are the reports
    ``shared.conflicts`` resolves (``hub.reconcile``)."""

    __tablename__ = "decisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ti_id: Mapped[int] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"), index=True)
    try_number: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(30))
    #: The device whose try was given up (automatic decisions).
    agent_id: Mapped[str | None] = mapped_column(String(128))
    assignment_id: Mapped[str | None] = mapped_column(String(64))
    #: The state an operator's mark or cancel set.
    state: Mapped[str | None] = mapped_column(String(20))
    actor: Mapped[str | None] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text, default="")
    hlc: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime]


class ConflictRecord(Base):
    """One override the conflict rule made: the report that won
    (``kept``), the one it overrode (``overridden``), both as JSON, the
    ``rule`` and the ``resolution`` in words. Unique per task instance and
    ``key`` (rule and overridden report), so a redelivered result never
    records it twice."""

    __tablename__ = "conflicts"
    __table_args__ = (UniqueConstraint("ti_id", "key"), Index("ix_conflicts_rule", "rule"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ti_id: Mapped[int] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"), index=True)
    key: Mapped[str] = mapped_column(String(300))
    run_pk: Mapped[int] = mapped_column(Integer, index=True)
    dag_id: Mapped[str] = mapped_column(String(250), index=True)
    run_id: Mapped[str] = mapped_column(String(250))
    task_id: Mapped[str] = mapped_column(String(250))
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    #: The device of the overridden (or else the kept) result.
    agent_id: Mapped[str | None] = mapped_column(String(128), index=True)
    rule: Mapped[str] = mapped_column(String(40))
    kept: Mapped[dict[str, Any]] = mapped_column(default=dict)
    overridden: Mapped[dict[str, Any]] = mapped_column(default=dict)
    resolution: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]


class SyncCursor(Base):
    """How far an agent's HTTP bulk sync got: the highest outbox sequence
    (litequeue message id) of a batch the hub committed, per outbox stream.
    Only saves re-sending after a restart; idempotency never depends on it."""

    __tablename__ = "sync_cursors"

    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: The agent's outbox stream id; a new outbox (or a clock that went back) starts a new stream.
    stream: Mapped[str] = mapped_column(String(64))
    seq: Mapped[str] = mapped_column(String(64))
    #: Items committed over HTTP on this stream.
    items: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime]


class Variable(Base):
    """Airflow's Variable: a named value DAGs read (``var.value.NAME``,
    ``Variable.get``). The value is stored encrypted (hub.encryption) and
    never returned by the API."""

    __tablename__ = "variables"

    key: Mapped[str] = mapped_column(String(250), primary_key=True)
    #: Fernet token of the value (text).
    value_encrypted: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Connection(Base):
    """Airflow's Connection: where and how tasks reach a system. ``password``
    and ``extra`` (a JSON object) are stored encrypted; host, login, port
    and schema are not secrets and are stored plain."""

    __tablename__ = "connections"

    conn_id: Mapped[str] = mapped_column(String(250), primary_key=True)
    conn_type: Mapped[str] = mapped_column(String(100), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    host: Mapped[str | None] = mapped_column(String(500))
    login: Mapped[str | None] = mapped_column(String(500))
    port: Mapped[int | None] = mapped_column(Integer)
    schema: Mapped[str | None] = mapped_column(String(500))
    password_encrypted: Mapped[str | None] = mapped_column(Text)
    extra_encrypted: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class AuditRecord(Base):
    """Who did what to what, for logins, keys, roles, triggers, clears,
    rollouts, enrolments and revocations (``hub.audit``). Append-only."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    #: ``user:<name>``, ``token:<id>``, ``agent:<id>``, ``hub`` (automatic) or ``cli`` (an admin command on the hub's host).
    actor: Mapped[str] = mapped_column(String(200), index=True)
    #: Dotted verb, e.g. ``auth.login``, ``auth.login_failed``, ``agent.revoke``, ``run.trigger``.
    action: Mapped[str] = mapped_column(String(100), index=True)
    target: Mapped[str] = mapped_column(String(300), default="")
    #: Whether the action took effect (a failed login is recorded with False).
    success: Mapped[bool] = mapped_column(Boolean, default=True)
    #: Client address for actions made over HTTP.
    remote: Mapped[str] = mapped_column(String(100), default="")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class EnrolmentToken(Base):
    """An expiring secret that lets one device (or, with ``uses`` above 1,
    that many devices) enrol (``hub.enrolment``). Only its SHA-256 is
    stored: the token is shown once."""

    __tablename__ = "enrolment_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    #: The agent id the device must enrol as; null: the device chooses.
    agent_id: Mapped[str | None] = mapped_column(String(128))
    #: Labels the enrolled agent starts with.
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(String(200), default="")
    expires_at: Mapped[datetime]
    #: When it was last used (the first and only use of a one-time token).
    used_at: Mapped[datetime | None]
    #: The agent that enrolled with it last.
    used_by: Mapped[str | None] = mapped_column(String(128))
    #: How many enrolments it allows (1: a one-time token; more: a fleet
    #: provisioning token shared by a batch of devices) and how many it made.
    uses: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    use_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class AgentRequestSignature(Base):
    """Signed agent HTTP requests seen recently: the same signature twice
    within the accepted clock window is a replay (``hub.requestauth``)."""

    __tablename__ = "agent_request_signatures"

    #: SHA-256 (hex) of the signature.
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(128))
    seen_at: Mapped[datetime] = mapped_column(index=True)


class SecurityEvent(Base):
    """Something that may be an attack, or a key misconfiguration: a device
    message that did not verify (unknown or revoked device, bad signature,
    sender/topic mismatch), or a hub message a device refused (bad
    signature, wrong device, expired, replayed), as the device reported it
    (``source`` ``agent``). See docs/security-signing.md."""

    __tablename__ = "security_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(index=True)
    agent_id: Mapped[str | None] = mapped_column(String(128), index=True)
    #: ``mqtt``, ``http`` (the hub refused a device message) or ``agent`` (a device refused a hub message).
    source: Mapped[str] = mapped_column(String(20))
    code: Mapped[str] = mapped_column(String(50), index=True)
    detail: Mapped[str] = mapped_column(Text)
    excerpt: Mapped[str] = mapped_column(Text, default="")


# Users, tokens and sessions live in their own module; importing it here puts
# them in Base.metadata for Alembic and the migration test.
from hub import models_auth as _models_auth  # noqa: E402,F401

# The artifact store's tables, for the same reason.
from hub import models_artifacts as _models_artifacts  # noqa: E402,F401
# Rollouts (hub.rollouts): re-exported, the engine and queries import them from here.
from hub.models_rollouts import RolloutDevice, RolloutRecord  # noqa: E402,F401
