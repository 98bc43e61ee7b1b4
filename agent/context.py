"""What a job gets while it runs on this device: its ``JobContext`` (the
``firmware_jobs.base.JobContext`` protocol), its abort flag, and the shape of
a failed result. Kept apart from the runner's scheduling of work."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.clock import Clock
from shared.messages import Assign, Result
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

    def __init__(self, run: Run, work_dir: Path, clock: Clock, settings: Mapping[str, Any]) -> None:
        self.assignment_id = run.assignment_id
        self._work_dir = work_dir
        self.clock = clock
        self.settings = settings
        self.last_progress: tuple[float, str] = (0.0, "")
        self._run = run

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


def failed(assign: Assign, code: str, message: str, retryable: bool, started_at: float | None = None, finished_at: float | None = None) -> Result:
    """A failed Result for ``assign``."""
    return Result(assign.assignment_id, assign.try_number, "failed", None, ErrorBody(code, message, retryable), started_at, finished_at)


def dir_name(assignment_id: str) -> str:
    """A file-name-safe folder name for an assignment id from the wire."""
    if _SAFE_NAME.fullmatch(assignment_id):
        return assignment_id
    return "h-" + hashlib.sha256(assignment_id.encode()).hexdigest()[:32]
