"""What a job gets while it runs on this device: its ``JobContext`` (the
``firmware_jobs.base.JobContext`` protocol), its abort flag, and the shape of
a failed result. Kept apart from the runner's scheduling of work."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shared.clock import Clock
from shared.messages import AGENT_EVENT_NAME_RE, MAX_AGENT_EVENT_PAYLOAD_BYTES, AgentEvent, Assign, Result
from shared.messages import JobError as ErrorBody

log = logging.getLogger("agent.runner")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Run:
    """A started assignment: its abort flag and why it was set."""

    def __init__(self, assignment_id: str) -> None:
        self.assignment_id = assignment_id
        self.abort_flag = threading.Event()
        self.reason: str | None = None
        self.detail = ""

    def abort(self, reason: str, detail: str = "") -> None:
        if self.reason is None:
            self.reason, self.detail = reason, detail
        self.abort_flag.set()


class JobContextImpl:
    """What a running job gets (the ``firmware_jobs.base.JobContext`` protocol)."""

    def __init__(
        self, run: Run, work_dir: Path, clock: Clock, settings: Mapping[str, Any],
        emit: Callable[[str, Mapping[str, Any] | None], str] | None = None,
    ) -> None:
        self.assignment_id = run.assignment_id
        self._work_dir = work_dir
        self.clock = clock
        self.settings = settings
        self.last_progress: tuple[float, str] = (0.0, "")
        self._run = run
        self._emit = emit

    @property
    def work_dir(self) -> Path:
        """This assignment's own folder, made on first use (most jobs never
        need one, and making and removing it is most of a no-op job's cost)."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    def progress(self, fraction: float, message: str = "") -> None:
        self.last_progress = (min(1.0, max(0.0, float(fraction))), message)
        log.debug("[%s] progress %.0f%% %s", self.assignment_id, self.last_progress[0] * 100, message)

    def log(self, line: str) -> None:
        log.info("[%s] %s", self.assignment_id, str(line)[:2000])

    def should_abort(self) -> bool:
        return self._run.abort_flag.is_set()

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> str:
        """Report a condition of this device (``battery_low``) to the hub,
        where it triggers the DAGs scheduled on ``AgentEvent(name)``. It is
        stored in the outbox before this returns and sent like a result,
        whatever becomes of the job. Returns the event id; raises
        ``ValueError`` for a bad name or a payload that is not a JSON object
        of at most 16 KiB."""
        if self._emit is None:
            raise RuntimeError("this job context cannot emit events")
        return self._emit(name, data)


def make_agent_event(name: str, data: Mapping[str, Any] | None, now: float) -> AgentEvent:
    """A new agent event, checked as the hub will check it; ``ValueError``
    names the problem."""
    if not isinstance(name, str) or not AGENT_EVENT_NAME_RE.fullmatch(name):
        raise ValueError(f"event name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    payload = dict(data or {})
    try:
        size = len(json.dumps(payload, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event {name!r}: the data is not JSON: {exc}") from None
    if size > MAX_AGENT_EVENT_PAYLOAD_BYTES:
        raise ValueError(f"event {name!r}: the data is {size} bytes, over {MAX_AGENT_EVENT_PAYLOAD_BYTES}; send a reference, not the data")
    return AgentEvent(secrets.token_hex(16), name, payload, now)


def failed(assign: Assign, code: str, message: str, retryable: bool, started_at: float | None = None, finished_at: float | None = None) -> Result:
    """A failed Result for ``assign``."""
    return Result(assign.assignment_id, assign.try_number, "failed", None, ErrorBody(code, message, retryable), started_at, finished_at)


def dir_name(assignment_id: str) -> str:
    """A file-name-safe folder name for an assignment id from the wire."""
    if _SAFE_NAME.fullmatch(assignment_id):
        return assignment_id
    return "h-" + hashlib.sha256(assignment_id.encode()).hexdigest()[:32]
