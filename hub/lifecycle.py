"""How a task instance's try ends: success, failure, or a retry later.

One place for the rule, used by result ingestion (agent tasks) and by the
local executor (hub tasks).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hub.models import TaskInstance
from shared.states import TaskState


def finish_try(ti: TaskInstance, *, success: bool, now: datetime, output: Any = None, error: dict[str, Any] | None = None) -> TaskState:
    """Record the outcome of ``ti``'s current try and return its new state.

    A failure is retried when tries are left and the error does not say
    ``retryable: false`` (a job that can never succeed, such as an unknown
    job type, is not retried)."""
    ti.ended_at = now
    if success:
        ti.state = TaskState.SUCCESS
        ti.output = output
        ti.error = None
        return TaskState.SUCCESS
    ti.error = error or {"code": "failed", "message": "the task failed"}
    retryable = bool((error or {}).get("retryable", True))
    if retryable and ti.try_number < ti.max_tries:
        ti.state = TaskState.UP_FOR_RETRY
        ti.next_try_at = now + timedelta(seconds=ti.retry_delay)
    else:
        ti.state = TaskState.FAILED
    return TaskState(ti.state)
