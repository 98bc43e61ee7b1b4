"""``diagnostics.collect``: every field present and plausible."""

from __future__ import annotations

import json
import platform
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from firmware_jobs import diagnostics, registry
from firmware_jobs.base import JobError

if TYPE_CHECKING:  # the ctx fixture's type
    from tests.firmware_jobs.conftest import RecordingContext


def collect(ctx: RecordingContext, **params: object) -> dict:
    job = registry.get("diagnostics.collect")
    return job.run(ctx, job.validate(dict(params)))


def test_report_has_every_field_with_sane_values(ctx: RecordingContext) -> None:
    report = collect(ctx)
    assert json.loads(json.dumps(report)) == report
    assert report["collected_at"] == ctx.clock.now()
    disk = report["disk"]
    assert disk["path"] == "/"
    assert 0 < disk["free_bytes"] <= disk["total_bytes"] and disk["used_bytes"] <= disk["total_bytes"]
    memory = report["memory"]
    assert memory["total_bytes"] > 16 * 1024 * 1024
    assert 0 < memory["available_bytes"] <= memory["total_bytes"]
    assert len(report["load"]) == 3 and all(x >= 0 for x in report["load"])
    assert report["uptime_seconds"] > 0
    assert report["agent_version"] == "0.1.0-test"
    assert report["hostname"] == socket.gethostname()
    assert report["python_version"] == platform.python_version()
    assert report["platform"] and report["machine"]


def test_disk_usage_of_a_chosen_path(ctx: RecordingContext) -> None:
    assert collect(ctx, path=str(ctx.work_dir))["disk"]["path"] == str(ctx.work_dir)


def test_missing_path_fails_without_retry(ctx: RecordingContext) -> None:
    with pytest.raises(JobError) as info:
        collect(ctx, path=str(ctx.work_dir / "nope"))
    assert info.value.code == "path_unavailable" and info.value.retryable is False
    assert "nope" in str(info.value)


def test_missing_proc_files_degrade_to_null(ctx: RecordingContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(diagnostics, "PROC", tmp_path / "no-proc")
    report = collect(ctx)
    assert report["uptime_seconds"] is None
    assert report["memory"]["available_bytes"] is None
    assert report["memory"]["total_bytes"] > 0  # from sysconf


def test_running_twice_changes_nothing(ctx: RecordingContext) -> None:
    before = sorted(p.name for p in ctx.work_dir.iterdir())
    first, second = collect(ctx), collect(ctx)
    assert first.keys() == second.keys() and first["hostname"] == second["hostname"]
    assert sorted(p.name for p in ctx.work_dir.iterdir()) == before
