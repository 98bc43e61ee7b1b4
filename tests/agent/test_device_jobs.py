"""``config.apply`` and ``data.collect`` through the real runner: the job
runs in a fork-server child, gets ``device_root`` from the agent's job
settings and its result lands in the outbox."""

from __future__ import annotations

import json
from pathlib import Path

from firmware_jobs.config_apply import ApplyConfig
from firmware_jobs.data_collect import CollectData
from firmware_jobs.registry import Registry
from shared.messages import Assign

from .conftest import RunnerParts


def _parts(state_dir: Path, manual_clock: object, device: Path) -> RunnerParts:
    registry = Registry()
    registry.register(ApplyConfig)
    registry.register(CollectData)
    parts = RunnerParts(state_dir, manual_clock, registry)
    runner = parts.runner(start=False)
    runner.job_settings["device_root"] = str(device)
    runner.start()
    return parts


def test_config_apply_and_data_collect_run_in_the_agent(state_dir: Path, manual_clock, tmp_path: Path) -> None:
    device = tmp_path / "device"
    (device / "data").mkdir(parents=True)
    (device / "hooks").mkdir()
    health = device / "hooks" / "health-check"
    health.write_text('#!/bin/sh\n! grep -q broken "$OUTPOST_CONFIG_PATH"\n')
    health.chmod(0o755)
    now = manual_clock.now()
    (device / "data" / "s.jsonl").write_text("".join(json.dumps({"ts": now - i, "sensor": "temp", "value": i}) + "\n" for i in range(5)) + "junk\n")
    parts = _parts(state_dir, manual_clock, device)
    try:
        parts.put_assign(Assign("c-1", "dag", "run", "apply", 1, "config.apply", {"path": "app.toml", "content": "rate = 5\n", "format": "toml"}))
        parts.put_assign(Assign("c-2", "dag", "run", "apply", 1, "config.apply", {"path": "app.toml", "content": "rate = 'broken'\n", "format": "toml"}))
        parts.put_assign(Assign("d-1", "dag", "run", "collect", 1, "data.collect", {"file": "s.jsonl", "window_seconds": 2.5, "percentiles": [50]}))
        applied = parts.result("c-1")
        assert applied.status == "success" and applied.output["changed"] is True  # type: ignore[index]
        rolled_back = parts.result("c-2")
        assert rolled_back.status == "failed" and rolled_back.error is not None
        assert rolled_back.error.code == "health_check_failed" and rolled_back.error.retryable is False and "rolled_back" in rolled_back.error.message
        assert (device / "config" / "app.toml").read_text() == "rate = 5\n"
        summary = parts.result("d-1")
        assert summary.status == "success"
        assert summary.output["sensors"] == {"temp": {"count": 3, "min": 0.0, "max": 2.0, "mean": 1.0, "p50": 1.0}}  # type: ignore[index]
        assert summary.output["bad_lines"] == 1  # type: ignore[index]
    finally:
        parts.close()
