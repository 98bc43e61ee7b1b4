"""The rollout tables (``hub.rollouts``): one row per staged rollout of a
fleet task in a run, and one per device of it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from hub.models import Base


class RolloutRecord(Base):
    """A staged rollout of one fleet task in one run (``hub.rollouts``).
    ``state``: running, paused, aborted, failed or completed; ``finished_at``
    is set once every device is done (an aborted rollout's in-flight devices
    finish first)."""

    __tablename__ = "rollouts"
    __table_args__ = (UniqueConstraint("run_pk", "task_id"), Index("ix_rollouts_state", "state"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dag_id: Mapped[str] = mapped_column(String(250), index=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("dag_runs.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(String(250))
    task_id: Mapped[str] = mapped_column(String(250))
    job_type: Mapped[str] = mapped_column(String(100), default="")
    #: ``hub.rollout_policy.Rollout.to_dict()`` and the target's selector, as started.
    policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(20))
    #: The batch being filled or awaited (0 is the canary when there is one).
    batch: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    #: Set when the device order is a seeded shuffle (null: by agent id).
    seed: Mapped[int | None] = mapped_column(BigInteger)
    started_at: Mapped[datetime]
    deadline: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    #: Why it paused, aborted or failed.
    reason: Mapped[str | None] = mapped_column(Text)
    #: Who made the last manual change (``user:<name>``); ``hub`` for automatic ones.
    actor: Mapped[str] = mapped_column(String(200), default="hub")


class RolloutDevice(Base):
    """One device of a rollout, with its task instance (``map_index`` ==
    ``seq``). ``state``: pending (its instance is ``deferred``), notified,
    succeeded, failed, timed_out or skipped."""

    __tablename__ = "rollout_devices"
    __table_args__ = (
        UniqueConstraint("rollout_id", "agent_id"), Index("ix_rollout_devices_rollout_state", "rollout_id", "state"),
        Index("ix_rollout_devices_rollout_seq", "rollout_id", "seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str] = mapped_column(String(128))
    ti_id: Mapped[int] = mapped_column(ForeignKey("task_instances.id", ondelete="CASCADE"), index=True)
    #: The device's groups when the rollout started ([""] for none): the per-group cap counts them.
    groups: Mapped[list[Any]] = mapped_column(default=list)
    state: Mapped[str] = mapped_column(String(20))
    #: The batch it was notified in (null while pending).
    batch: Mapped[int | None] = mapped_column(Integer)
    notified_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    #: Why the rollout gave it up (rollout_aborted, rollout_failed, rollout_timed_out, ...).
    error_code: Mapped[str | None] = mapped_column(String(50))
