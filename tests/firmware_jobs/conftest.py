"""Fixtures for job tests, and ``RecordingContext``: a real, minimal
``JobContext`` with a temporary work dir, collected log lines and progress
reports, and an abort flag a test can raise from any thread."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from shared.clock import Clock, ManualClock


@dataclass
class RecordingContext:
    assignment_id: str
    work_dir: Path
    clock: Clock
    settings: Mapping[str, Any]
    lines: list[str] = field(default_factory=list)
    reports: list[tuple[float, str]] = field(default_factory=list)
    abort: threading.Event = field(default_factory=threading.Event)

    def progress(self, fraction: float, message: str = "") -> None:
        self.reports.append((fraction, message))

    def log(self, line: str) -> None:
        self.lines.append(line)

    def should_abort(self) -> bool:
        return self.abort.is_set()


@pytest.fixture
def ctx(tmp_path: Path, manual_clock: ManualClock) -> RecordingContext:
    work_dir = tmp_path / "work"
    work_dir.mkdir()
    return RecordingContext(
        assignment_id="a-1",
        work_dir=work_dir,
        clock=manual_clock,
        settings={"agent_version": "0.1.0-test", "command_allowlist": [], "state_dir": str(tmp_path / "state")},
    )
