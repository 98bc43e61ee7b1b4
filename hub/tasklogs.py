"""Logs and progress of device tasks, as the agents report them.

An agent ships the log of each try as ``LogChunk`` messages (through its
outbox, so at least once, before the try's result). :func:`apply_chunk`
stores each chunk once, unique on (assignment, seq): a redelivered chunk is
recognised and acknowledged again, never stored twice. :func:`read_log`
puts a try's chunks back together for the API.

``Progress`` reports are best effort and only ever update the current try of
a running task instance (:func:`apply_progress`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.errors import NotFound
from hub.models import Assignment, TaskInstance, TaskLogChunk
from shared.messages import LogChunk, Progress

#: Longest progress message kept (the column's size).
MAX_PROGRESS_MESSAGE = 500


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
            seq=chunk.seq, data=chunk.data.replace("\x00", "\\x00"), final=chunk.final, received_at=now,
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


def read_log(session: Session, run_pk: int, ti_id: int, try_number: int) -> dict[str, Any]:
    """The log of one try of one task instance of run ``run_pk``: per
    assignment (normally one; more when the try moved between devices), its
    agent, whether the last chunk arrived, how many chunks arrived and their
    text in order (a gap, from a chunk still on its way, is marked)."""
    ti = session.get(TaskInstance, ti_id)
    if ti is None or ti.run_pk != run_pk:
        raise TaskInstanceNotFound(f"run {run_pk} has no task instance {ti_id}")
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
        logs.append({"assignment_id": assignment_id, "agent_id": chunks[0].agent_id, "complete": complete, "chunks": len(chunks), "text": "".join(parts)})
    return {"ti_id": ti_id, "task_id": ti.task_id, "map_index": ti.map_index, "try_number": try_number, "logs": logs}
