"""kill -9 of firmware.update after each step: the device is wholly on the
old or wholly on the new image, and running the job again finishes it.

The job runs in a real child process (``harness.main``); the test makes it
stop at a checkpoint (``OUTPOST_OTA_TEST_HALT``), mid-download (the server
stalls) or inside a slow health-check hook, then SIGKILLs its process group.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from firmware_jobs.devroot import DeviceRoot
from firmware_jobs.ota import slots
from firmware_jobs.ota.job import HALT_ENV
from shared.signing import SigningKey
from tests.firmware_jobs.ota.harness import OLD, ArtifactServer, add_hook, make_release, whole_version

ROOT = Path(__file__).resolve().parents[3]
NEW = bytes(range(256)) * 1200


class Driver:
    def __init__(self, tmp_path: Path, device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, agent_key: SigningKey) -> None:
        self.tmp = tmp_path
        key_path = tmp_path / "agent.key"
        agent_key.save(key_path)
        self.config = tmp_path / "config.json"
        self.config.write_text(json.dumps({
            "assignment_id": "as-1", "work_dir": str(tmp_path / "work"), "key": str(key_path),
            "params": {"artifact_id": "sensor-fw-2.0.0", "health_timeout": 5},
            "settings": {"device_root": str(device.path), "hub_url": server.url, "release_keys": [release_key.public.to_text()]},
        }))
        self.result = tmp_path / "result.json"

    def start(self, halt: str | None = None) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if k != HALT_ENV}
        if halt:
            env[HALT_ENV] = f"{halt}:{self.tmp / 'halted'}"
        self.result.unlink(missing_ok=True)
        code = "import sys; from tests.firmware_jobs.ota.harness import main; main(sys.argv[1:])"
        with open(self.tmp / "stderr", "wb") as err:
            return subprocess.Popen([sys.executable, "-c", code, str(self.config), str(self.result)], cwd=ROOT, env=env,
                                    start_new_session=True, stdout=subprocess.DEVNULL, stderr=err)

    def kill_when(self, process: subprocess.Popen[bytes], ready: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert process.poll() is None, f"the job ended early: {(self.tmp / 'stderr').read_text()}"
            assert time.monotonic() < deadline, "the job never reached the point to kill it at"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # the job and any hook it runs
        process.wait(10)
        assert process.returncode == -signal.SIGKILL and not self.result.exists()

    def finish(self) -> dict[str, Any]:
        process = self.start()
        process.wait(60)
        assert process.returncode == 0, (self.tmp / "stderr").read_text()
        return dict(json.loads(self.result.read_text()))


@pytest.fixture
def driver(tmp_path: Path, device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, agent_key: SigningKey) -> Driver:
    server.publish(make_release(release_key, "2.0.0", NEW, security_version=3), NEW)
    return Driver(tmp_path, device, server, release_key, agent_key)


def assert_finished(device: DeviceRoot, outcome: dict[str, Any]) -> None:
    assert outcome["ok"]["version"] == "2.0.0", outcome
    state = slots.load_state(device)
    assert whole_version(device) == "2.0.0" and state["active"] == "b"
    assert state["pending"] is None and state["rollback_floor"] == 3
    assert slots.image_path(device, "a").read_bytes() == OLD


@pytest.mark.parametrize(("step", "on"), [
    ("downloaded", "1.0.0"), ("verified", "1.0.0"), ("installing", "1.0.0"), ("installed", "1.0.0"),
    ("switched", "2.0.0"), ("healthy", "2.0.0"),
])
def test_kill_after_each_step_then_rerun(driver: Driver, device: DeviceRoot, step: str, on: str) -> None:
    process = driver.start(halt=step)
    driver.kill_when(process, (driver.tmp / "halted").exists)
    assert whole_version(device) == on  # wholly old before the switch, wholly new (on trial) after it
    if on == "2.0.0":
        assert slots.load_state(device)["pending"]["phase"] == "trial"
    outcome = driver.finish()
    assert outcome["ok"]["status"] == "installed"
    assert_finished(device, outcome)
    assert driver.finish()["ok"]["status"] == "already_installed"


def test_kill_mid_download_resumes_from_the_partial_file(driver: Driver, device: DeviceRoot, server: ArtifactServer) -> None:
    server.stall, server.stall_after = threading.Event(), 120_000
    part = device.downloads_dir / "sensor-fw-2.0.0.part"
    process = driver.start()
    driver.kill_when(process, lambda: part.exists() and part.stat().st_size >= 120_000)
    server.stall.set()
    server.stall = None
    assert whole_version(device) == "1.0.0"
    assert_finished(device, driver.finish())
    ranges = [s.range for s in server.seen if s.path.endswith("/image")]
    assert ranges == [None, "bytes=120000-"]


def test_kill_during_the_health_check_then_the_rerun_commits(driver: Driver, device: DeviceRoot) -> None:
    marker = driver.tmp / "checking"
    add_hook(device, "health-check", f"touch {marker}\nsleep 30\n")
    process = driver.start()
    driver.kill_when(process, marker.exists)
    assert whole_version(device) == "2.0.0" and slots.load_state(device)["pending"] is not None
    add_hook(device, "health-check", "exit 0\n")
    assert_finished(device, driver.finish())


def test_kill_during_the_health_check_then_the_rerun_rolls_back(driver: Driver, device: DeviceRoot) -> None:
    marker = driver.tmp / "checking"
    add_hook(device, "health-check", f"touch {marker}\nsleep 30\n")
    driver.kill_when(driver.start(), marker.exists)
    add_hook(device, "health-check", "echo still broken\nexit 1\n")
    outcome = driver.finish()
    assert outcome["error"] == "health_check_failed" and outcome["retryable"] is False
    state = slots.load_state(device)
    assert whole_version(device) == "1.0.0" and state["pending"] is None and state["rollback_floor"] == 0
