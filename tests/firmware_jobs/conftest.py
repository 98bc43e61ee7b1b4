"""Fixtures for job tests: ``ctx`` is a fresh ``RecordingContext``."""

from __future__ import annotations

from pathlib import Path

import pytest

from job_context import RecordingContext
from shared.clock import ManualClock


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
