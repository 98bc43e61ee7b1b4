"""Logs and progress of device tasks, as the agents report them.

An agent ships the log of each try as ``LogChunk`` messages (through its
outbox, so at least once, before the try's result). :func:`apply_chunk`
stores each chunk once, unique on (assignment, seq): a redelivered chunk is
recognised and acknowledged again, never stored twice. :func:`read_log`
puts a try's chunks back together for the API, :func:`list_logs` says
which tries have a stored log, and :func:`prune_chunks` removes the chunks
of finished tries once they are older than the retention period.

``Progress`` reports are best effort and only ever update the current try of
a running task instance (:func:`apply_progress`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import LargeBinary, case, cast, delete, func, or_, select
from sqlalchemy.orm import Session

from hub.errors import NotFound
from hub.masking import MASKER
from hub.models import Assignment, TaskInstance, TaskLogChunk
from shared.messages import LogChunk, Progress
from shared.states import FINISHED

#: Longest progress message kept (the column's size).
MAX_PROGRESS_MESSAGE = 500
#: Most chunks one pruning pass deletes, so a large backlog never holds the
#: database's write lock for long; the next pass goes on.
PRUNE_BATCH = 10_000


class TaskInstanceNotFound(NotFound):
    code = "task_instance_not_found"


def apply_chunk(session: Session, agent_id: str, chunk: LogChunk, assignment: Assignment, now: datetime) -> bool:
    """Store ``chunk`` of ``assignment``'s log unless it is already stored;
    True when it was new. ``ValueError`` for a chunk that cannot be stored."""
    if chunk.seq < 0 or chunk.seq > 1_000_000:
        raise ValueError(f"log chunk sequence number {chunk.seq} is out of range")
    # Autoflush makes a copy queued earlier in the same batch visible here.
    exists = session.scalar(select(TaskLogChunk.id).where(TaskLogChunk.assignment_id == assignment.id, TaskLogChunk.seq == chunk.seq))
    if exists is not None:
        return False
    session.add(
        TaskLogChunk(
            ti_id=assignment.ti_id, try_number=assignment.try_number, agent_id=agent_id, assignment_id=assignment.id,
            # PostgreSQL text cannot hold NUL; a device's log can.
            # Secrets the device was given never reach the stored log (read_log masks again: one may span chunks).
            seq=chunk.seq, data=MASKER.mask_text(chunk.data.replace("\x00", "\\x00")), final=chunk.final, received_at=now,
        )
    )
    return True


def apply_progress(ti: TaskInstance | None, progress: Progress) -> bool:
    """Record a progress report on ``ti`` (None: the try is no longer
    current, so the report is dropped). True when applied."""
    if ti is None:
        return False
    fraction = progress.fraction
    if not 0.0 <= fraction <= 1.0:  # also NaN
        fraction = min(1.0, max(0.0, fraction)) if fraction == fraction else 0.0
    ti.progress = fraction
    ti.progress_message = progress.message[:MAX_PROGRESS_MESSAGE].replace("\x00", "")
    return True


def reset_progress(ti: TaskInstance) -> None:
    """A new try started: the last try's progress no longer applies."""
    ti.progress = None
    ti.progress_message = None


def _task_instance(session: Session, run_pk: int, ti_id: int) -> TaskInstance:
    ti = session.get(TaskInstance, ti_id)
    if ti is None or ti.run_pk != run_pk:
        raise TaskInstanceNotFound(f"run {run_pk} has no task instance {ti_id}")
    return ti


def read_log(session: Session, run_pk: int, ti_id: int, try_number: int) -> dict[str, Any]:
    """The log of one try of one task instance of run ``run_pk``: per
    assignment (normally one; more when the try moved between devices), its
    agent, whether the last chunk arrived, how many chunks arrived and their
    text in order (a gap, from a chunk still on its way, is marked)."""
    ti = _task_instance(session, run_pk, ti_id)
    if try_number < 1 or try_number > max(ti.try_number, 1):
        raise NotFound(f"task instance {ti_id} has no try {try_number} (tries so far: {ti.try_number})")
    rows = session.scalars(
        select(TaskLogChunk).where(TaskLogChunk.ti_id == ti_id, TaskLogChunk.try_number == try_number).order_by(TaskLogChunk.assignment_id, TaskLogChunk.seq)
    ).all()
    by_assignment: dict[str, list[TaskLogChunk]] = {}
    for row in rows:
        by_assignment.setdefault(row.assignment_id, []).append(row)
    logs = []
    for assignment_id, chunks in by_assignment.items():
        parts: list[str] = []
        expected = 0
        for row in chunks:
            if row.seq != expected:
                parts.append(f"\n[outpost: {row.seq - expected} log chunk(s) not received yet]\n")
            parts.append(row.data)
            expected = row.seq + 1
        complete = chunks[-1].final and len(chunks) == chunks[-1].seq + 1
        text = MASKER.mask_text("".join(parts))
        logs.append({"assignment_id": assignment_id, "agent_id": chunks[0].agent_id, "complete": complete, "chunks": len(chunks), "text": text})
    return {"ti_id": ti_id, "task_id": ti.task_id, "map_index": ti.map_index, "try_number": try_number, "logs": logs}


def list_logs(session: Session, run_pk: int, ti_id: int) -> dict[str, Any]:
    """Which tries of task instance ``ti_id`` of run ``run_pk`` have a stored
    log: one entry per try and assignment (normally one per try; more when
    the try moved between devices), oldest try first, with its agent, how
    many chunks and bytes arrived, whether it is complete (as in
    :func:`read_log`) and when its first and last chunks arrived. A try
    that logged nothing, or whose chunks were pruned, is not listed."""
    ti = _task_instance(session, run_pk, ti_id)
    if session.get_bind().dialect.name == "postgresql":
        size = func.octet_length(TaskLogChunk.data)
    else:  # SQLite: length() of text counts characters, of a blob bytes
        size = func.length(cast(TaskLogChunk.data, LargeBinary))
    rows = session.execute(
        select(
            TaskLogChunk.try_number, TaskLogChunk.assignment_id, func.min(TaskLogChunk.agent_id), func.count(), func.coalesce(func.sum(size), 0),
            func.max(case((TaskLogChunk.final, 1), else_=0)), func.max(TaskLogChunk.seq), func.min(TaskLogChunk.received_at), func.max(TaskLogChunk.received_at),
        )
        .where(TaskLogChunk.ti_id == ti_id)
        .group_by(TaskLogChunk.try_number, TaskLogChunk.assignment_id)
        .order_by(TaskLogChunk.try_number, TaskLogChunk.assignment_id)
    ).all()
    logs = [
        {
            "try_number": try_number, "assignment_id": assignment_id, "agent_id": agent_id, "chunks": chunks, "bytes": int(size_),
            "complete": bool(final) and chunks == max_seq + 1, "first_received_at": first, "last_received_at": last,
        }
        for try_number, assignment_id, agent_id, chunks, size_, final, max_seq, first, last in rows
    ]
    return {"ti_id": ti_id, "task_id": ti.task_id, "map_index": ti.map_index, "try_number": ti.try_number, "logs": logs}


def prune_chunks(session: Session, now: datetime, retention_days: float, batch: int = PRUNE_BATCH) -> int:
    """Delete at most ``batch`` log chunks received more than
    ``retention_days`` before ``now`` whose try is finished (an earlier try
    than the task instance's current one, or the current one of a finished
    task instance); the number deleted. ``retention_days`` 0 keeps every
    chunk. A pass that deleted ``batch`` chunks may have left more."""
    if retention_days <= 0:
        return 0
    cutoff = now - timedelta(days=retention_days)
    old = (
        select(TaskLogChunk.id)
        .join(TaskInstance, TaskInstance.id == TaskLogChunk.ti_id)
        .where(TaskLogChunk.received_at < cutoff, or_(TaskLogChunk.try_number < TaskInstance.try_number, TaskInstance.state.in_([str(s) for s in FINISHED])))
        .order_by(TaskLogChunk.received_at)
        .limit(batch)
    )
    # One statement: no ids travel to the hub and back.
    result = session.execute(delete(TaskLogChunk).where(TaskLogChunk.id.in_(old.scalar_subquery())), execution_options={"synchronize_session": False})
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
