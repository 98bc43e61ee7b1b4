"""firmware.update through the agent: the job's process asks the agent to
sign its hub requests (it never holds the device key), the agent gives it
device_root, hub_url and the release keys, and release keys are managed with
``outpost-agent trust add --release``."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent import jobhost, trust
from agent.cli import ExitCode, main
from agent.config import load_settings
from firmware_jobs.ota.job import FirmwareUpdate
from shared.signing import SigningKey
from tests.agent.conftest import AGENT_ID
from tests.firmware_jobs.ota.harness import ArtifactServer, make_device, make_release, whole_version

IMAGE = b"new firmware 2.0.0\n" * 5000


def test_an_assignment_updates_the_device_through_the_agent(make_agent: Callable[..., Any], hub: Any, tmp_path: Path) -> None:
    release_key = SigningKey.generate()
    device = make_device(tmp_path / "device")
    server = ArtifactServer(SigningKey.generate().public, agent_id=AGENT_ID)
    try:
        server.publish(make_release(release_key, "2.0.0", IMAGE, security_version=2), IMAGE)
        agent = make_agent(hub_url=server.url, device_root=device.path, release_public_keys=(release_key.public.to_text(),))
        server.agent_key = agent.device_key.public  # the hub knows the device's key
        hub.assign("fw-1", "firmware.update", {"artifact_id": "sensor-fw-2.0.0"})
        result = hub.wait_for("result", "fw-1", timeout=30)[0]
        assert result.status == "success", result.error
        assert result.output["version"] == "2.0.0" and result.output["rollback_floor"] == 2
        assert whole_version(device) == "2.0.0"
        assert [s.signed for s in server.seen] == [True, True]
        # The agent signs nothing else for a job.
        for method, path in [("POST", "/api/v1/artifacts/x/image"), ("GET", f"/api/v1/agents/{AGENT_ID}/sync"), ("GET", "/api/v1/artifacts/../agents")]:
            with pytest.raises(ValueError):
                agent._sign_for_job(method, path)
    finally:
        server.close()


def test_a_child_without_a_signer_fails_cleanly(tmp_path: Path) -> None:
    release_key = SigningKey.generate()
    device = make_device(tmp_path / "device")
    server = ArtifactServer(SigningKey.generate().public)
    try:
        server.publish(make_release(release_key, "2.0.0", IMAGE), IMAGE)
        settings = {"device_root": str(device.path), "hub_url": server.url, "release_keys": [release_key.public.to_text()]}
        spec = jobhost.Spec("fw-2", FirmwareUpdate, {"artifact_id": "sensor-fw-2.0.0", "health_timeout": 5}, tmp_path / "work", None,
                            settings, jobhost.Limits())
        outcome, _ = jobhost.run(spec, jobhost.Hooks(), timeout=30, abort=threading.Event(), grace=2)
        assert (outcome.kind, outcome.code, outcome.retryable) == ("job_error", "signing_unavailable", True)
        assert server.seen == [] and whole_version(device) == "1.0.0"
    finally:
        server.close()


def test_release_keys_are_kept_apart_from_hub_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    configured = SigningKey.generate().public
    path = tmp_path / "agent.toml"
    path.write_text(f'agent_id = "pump-7"\nstate_dir = "{tmp_path / "state"}"\nrelease_public_keys = ["{configured.to_text()}"]\n')
    key = SigningKey.generate().public
    assert main(["trust", "add", "--release", key.to_text(), "--config", str(path)]) == ExitCode.OK
    assert "release key" in capsys.readouterr().out
    assert main(["trust", "add", "--release", key.to_text(), "--config", str(path)]) == ExitCode.OK
    assert "already trusted" in capsys.readouterr().out
    settings = load_settings(path)
    assert trust.release_keys_path(settings).stat().st_mode & 0o777 == 0o600
    assert sorted(trust.release_keys(settings)) == sorted([key.to_text(), configured.to_text()])
    assert trust.TrustStore(settings).keys() == {}  # a release key is no hub key
    assert main(["trust", "list", "--config", str(path)]) == ExitCode.OK
    listed = capsys.readouterr().out
    assert f"{key.kid}  {key.to_text()}  firmware release key" in listed and configured.to_text() in listed
    assert main(["trust", "add", "--release", "ed25519:short", "--config", str(path)]) == ExitCode.CONFIG_ERROR
    trust.release_keys_path(settings).write_text("not json")
    assert trust.release_keys(settings) == [configured.to_text()]  # a damaged file fails closed


def test_kill_9_of_the_agent_mid_trial_then_the_restarted_agent_commits(spawn_agent: Callable[..., Any], hub: Any, state_dir: Path, tmp_path: Path) -> None:
    import fcntl
    import os
    import signal
    import time

    from firmware_jobs.ota import slots
    from firmware_jobs.ota.job import HALT_ENV

    release_key = SigningKey.generate()
    device = make_device(tmp_path / "device")
    server = ArtifactServer(SigningKey.generate().public, agent_id=AGENT_ID)
    try:
        server.publish(make_release(release_key, "2.0.0", IMAGE, security_version=2), IMAGE)
        extra = f'hub_url = "{server.url}"\ndevice_root = "{device.path}"\nrelease_public_keys = ["{release_key.public.to_text()}"]\n'
        halted = tmp_path / "halted"
        proc = spawn_agent(extra, env={HALT_ENV: f"switched:{halted}"})
        hub.wait_status("online", timeout=15)
        server.agent_key = SigningKey.load(state_dir / "identity" / "device.key").public
        hub.assign("fw-1", "firmware.update", {"artifact_id": "sensor-fw-2.0.0"})
        deadline = time.monotonic() + 20
        while not halted.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        assert whole_version(device) == "2.0.0" and slots.load_state(device)["pending"]["phase"] == "trial"
        # The job's process dies with the agent (its update lock with it).
        fd = os.open(device.ota_dir / "lock", os.O_RDWR)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            os.close(fd)
        proc = spawn_agent(extra)
        result = hub.wait_for("result", "fw-1", timeout=30)[0]
        assert result.status == "success", result.error
        assert result.output["version"] == "2.0.0" and result.output["previous_version"] == "1.0.0"
        state = slots.load_state(device)
        assert whole_version(device) == "2.0.0" and state["pending"] is None and state["rollback_floor"] == 2
        assert len(hub.of("started", "fw-1")) == 2  # re-run once after the restart
    finally:
        server.close()
