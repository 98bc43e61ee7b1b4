"""firmware.update in process against a real HTTP artifact server and a device root."""

from __future__ import annotations

import json
from typing import Any

import pytest

from firmware_jobs import registry
from firmware_jobs.base import JobError
from firmware_jobs.devroot import DeviceRoot
from firmware_jobs.ota import slots
from firmware_jobs.ota.job import FirmwareUpdate
from shared import release
from shared.signing import SigningKey
from tests.firmware_jobs.ota.harness import OLD, ArtifactServer, Context, add_hook, make_release, whole_version

NEW = bytes(range(256)) * 1200  # 300 KiB: several chunks


def run(ctx: Context, **params: Any) -> Any:
    job = FirmwareUpdate()
    return job.run(ctx, job.validate(params))


def failure(ctx: Context, **params: Any) -> JobError:
    with pytest.raises(JobError) as info:
        run(ctx, **params)
    return info.value


def publish(server: ArtifactServer, key: SigningKey, version: str = "2.0.0", image: bytes = NEW, **fields: Any) -> release.SignedManifest:
    signed = make_release(key, version, image, **fields)
    server.publish(signed, image)
    return signed


def test_registered_and_validates_params() -> None:
    assert "firmware.update" in registry.names()
    job = registry.get("firmware.update")
    assert job.validate({"artifact_id": "sensor-fw-2.0.0"})["health_timeout"] == 60


def test_installs_into_the_inactive_slot_and_commits(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key, security_version=3)
    device.downloads_dir.mkdir(parents=True)
    (device.downloads_dir / "sensor-fw-1.9.0.part").write_bytes(b"left by a refused update")
    ctx = make_ctx()
    out = run(ctx, artifact_id="sensor-fw-2.0.0")
    assert out == {"status": "installed", "artifact_id": "sensor-fw-2.0.0", "version": "2.0.0", "slot": "b", "previous_version": "1.0.0",
                   "security_version": 3, "rollback_floor": 3}
    assert whole_version(device) == "2.0.0" and device.firmware_version() == "2.0.0"
    state = slots.load_state(device)
    assert state["pending"] is None and state["rollback_floor"] == 3
    assert slots.image_path(device, "a").read_bytes() == OLD  # the old slot is untouched
    # Manifest and image were fetched with the agent's signature, which the server checked.
    assert [s.path.rsplit("/", 1)[1] for s in server.seen] == ["manifest", "image"] and all(s.signed for s in server.seen)
    assert ctx.reports[-1][0] == 1.0 and any("downloaded" in m for _, m in ctx.reports)
    assert not list(device.downloads_dir.iterdir()) and not (device.ota_dir / "update.json").exists()
    # Re-running the same (or another) assignment of the same release changes nothing.
    again = run(make_ctx("as-2"), artifact_id="sensor-fw-2.0.0")
    assert again["status"] == "already_installed" and len(server.seen) == 3  # only the manifest again


def test_unsigned_requests_are_refused_by_the_hub(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key)
    ctx = make_ctx()
    ctx.key = SigningKey.generate()  # not the key the hub knows for this agent
    err = failure(ctx, artifact_id="sensor-fw-2.0.0")
    assert err.code == "download_refused" and err.retryable
    assert whole_version(device) == "1.0.0"


def test_resumes_after_the_connection_drops_midway(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    signed = publish(server, release_key)
    server.drops = [100_000, 50_000]
    out = run(make_ctx(), artifact_id="sensor-fw-2.0.0", manifest=signed.to_dict())
    assert out["status"] == "installed" and whole_version(device) == "2.0.0"
    images = [s for s in server.seen if s.path.endswith("/image")]
    assert [s.range for s in images] == [None, "bytes=100000-", "bytes=150000-"]


def test_a_server_that_ignores_the_range_restarts_the_file(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    signed = publish(server, release_key)
    server.drops = [100_000]
    server.honour_range = False
    assert run(make_ctx(), artifact_id="sensor-fw-2.0.0", manifest=signed.to_dict())["status"] == "installed"
    assert whole_version(device) == "2.0.0"


def test_aborts_past_the_manifest_size(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key)
    server.extra = b"x" * 5000
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0")
    assert (err.code, err.retryable) == ("too_large", False)
    assert not list(device.downloads_dir.iterdir())
    assert whole_version(device) == "1.0.0" and slots.load_state(device)["slots"]["b"] is None


def test_a_stream_longer_than_announced_stops_at_the_size(tmp_path: Any, release_key: SigningKey) -> None:
    from firmware_jobs.ota import download

    signed = make_release(release_key, "2.0.0", NEW)
    part = tmp_path / "x.part"
    with pytest.raises(JobError) as info:
        download._copy(iter([NEW, b"more"]), part, "wb", 0, len(NEW), lambda have, size: None, lambda: False)
    assert info.value.code == "too_large" and not part.exists()
    assert signed.manifest.size == len(NEW)


def test_hash_mismatch_is_refused(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    signed = make_release(release_key, "2.0.0", NEW)
    server.publish(signed, NEW[:-1] + b"\x00")  # same size, other bytes
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0")
    assert (err.code, err.retryable) == ("hash_mismatch", False)
    assert whole_version(device) == "1.0.0" and not list(device.downloads_dir.iterdir())


def test_a_tampered_manifest_is_refused(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    doc = make_release(release_key, "2.0.0", NEW).to_dict()
    doc["manifest"]["security_version"] = 9
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0", manifest=doc)
    assert (err.code, err.retryable) == ("bad_signature", False)
    assert whole_version(device) == "1.0.0" and server.seen == []  # nothing downloaded


def test_a_manifest_signed_by_an_untrusted_key_is_refused(device: DeviceRoot, server: ArtifactServer, make_ctx: Any) -> None:
    # The hub's own key (or anyone's) is not a release key.
    publish(server, SigningKey.generate())
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0")
    assert (err.code, err.retryable) == ("unknown_release_key", False)
    err = failure(make_ctx("as-2", release_keys=[]), artifact_id="sensor-fw-2.0.0")
    assert err.code == "unknown_release_key"
    assert whole_version(device) == "1.0.0" and all(s.path.endswith("/manifest") for s in server.seen)


def test_wrong_hardware_is_refused(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key, hardware=("gateway-x",))
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0")
    assert (err.code, err.retryable) == ("wrong_hardware", False)


def test_downgrade_refused_unless_the_manifest_allows_it(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key, "0.9.0", security_version=1)
    err = failure(make_ctx(), artifact_id="sensor-fw-0.9.0")
    assert (err.code, err.retryable) == ("downgrade_refused", False)
    publish(server, release_key, "0.9.0", security_version=1, allow_downgrade=True)
    out = run(make_ctx("as-2"), artifact_id="sensor-fw-0.9.0")
    assert out["status"] == "installed" and whole_version(device) == "0.9.0"


def test_allowed_downgrade_still_respects_the_floor_which_survives_restarts(
    device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any,
) -> None:
    publish(server, release_key, "2.0.0", security_version=5)
    assert run(make_ctx(), artifact_id="sensor-fw-2.0.0")["rollback_floor"] == 5
    # "Restart": nothing in memory; the floor is read back from the device root.
    assert json.loads(device.ota_state_file.read_text())["rollback_floor"] == 5
    publish(server, release_key, "1.5.0", security_version=4, allow_downgrade=True)
    err = failure(make_ctx("as-2"), artifact_id="sensor-fw-1.5.0")
    assert (err.code, err.retryable) == ("rollback_refused", False)
    # A later update at the same counter keeps the floor; an allowed downgrade at it works.
    publish(server, release_key, "1.6.0", security_version=5, allow_downgrade=True)
    assert run(make_ctx("as-3"), artifact_id="sensor-fw-1.6.0")["rollback_floor"] == 5
    publish(server, release_key, "3.0.0", image=NEW[::-1], security_version=2)
    err = failure(make_ctx("as-4"), artifact_id="sensor-fw-3.0.0")
    assert err.code == "rollback_refused" and whole_version(device) == "1.6.0"


def test_failed_health_check_rolls_back_and_reports(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key, security_version=3)
    calls = device.path / "calls.log"
    add_hook(device, "switch-slot", f'echo "switch $1 $2" >> {calls}\n')
    add_hook(device, "health-check", f'echo "health $1 $2" >> {calls}\necho "sensor service down"\nexit 3\n')
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0", health_timeout=1.5)
    assert (err.code, err.retryable) == ("health_check_failed", False)
    assert "sensor service down" in str(err) and "rolled back to slot a (1.0.0)" in str(err)
    lines = calls.read_text().splitlines()
    assert lines[0] == "switch b trial" and lines[-1] == "switch a rollback"
    assert {line for line in lines[1:-1]} == {"health b 2.0.0"} and len(lines) >= 3  # retried within the timeout
    state = slots.load_state(device)
    assert whole_version(device) == "1.0.0" and state["pending"] is None and state["rollback_floor"] == 0
    assert state["last_failure"]["code"] == "health_check_failed"
    # Re-running the same assignment reports the same failure without trying again.
    again = failure(make_ctx(), artifact_id="sensor-fw-2.0.0")
    assert again.code == "health_check_failed" and calls.read_text().splitlines() == lines


def test_health_hook_that_passes_commits_and_calls_the_device_hooks(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key)
    calls = device.path / "calls.log"
    for name in ("switch-slot", "reboot", "commit-slot"):
        add_hook(device, name, f'echo "{name} $*" >> {calls}\n')
    add_hook(device, "health-check", f'echo "health $OUTPOST_SLOT $OUTPOST_VERSION" >> {calls}\n')
    assert run(make_ctx(), artifact_id="sensor-fw-2.0.0")["status"] == "installed"
    assert calls.read_text().splitlines() == ["switch-slot b trial", "reboot ", "health b 2.0.0", "commit-slot b"]


def test_a_trial_left_by_a_lost_job_is_rolled_back_by_the_next_update(
    device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any,
) -> None:
    publish(server, release_key, "2.0.0")
    publish(server, release_key, "2.1.0", image=NEW[::-1])
    state = slots.load_state(device)
    meta = slots.install(device, "b", _file(device, NEW), make_release(release_key, "2.0.0", NEW).manifest, 0.0)
    slots.begin_switch(device, state, "b", meta, "lost-1", 0.0)
    slots.set_phase(device, state, "trial")
    assert device.firmware_version() == "2.0.0"
    out = run(make_ctx("as-2"), artifact_id="sensor-fw-2.1.0")
    # 2.0.0 was never confirmed: back to 1.0.0 first, then 2.1.0 into slot b.
    assert out["previous_version"] == "1.0.0" and out["slot"] == "b" and whole_version(device) == "2.1.0"


def test_bad_params_and_missing_hub(device: DeviceRoot, make_ctx: Any) -> None:
    assert failure(make_ctx(), artifact_id="../etc").code == "invalid_params"
    assert failure(make_ctx(hub_url=None), artifact_id="sensor-fw-2.0.0").code == "no_hub_url"
    assert failure(make_ctx(), artifact_id="sensor-fw-9.9.9").code == "artifact_not_found"
    bad = failure(make_ctx(), artifact_id="sensor-fw-2.0.0", manifest={"manifest": {}, "signatures": []})
    assert (bad.code, bad.retryable) == ("bad_manifest", False)


def _file(device: DeviceRoot, data: bytes) -> Any:
    path = device.path / "staged.img"
    path.write_bytes(data)
    return path


def test_a_failing_switch_hook_leaves_the_device_on_the_old_slot(device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, make_ctx: Any) -> None:
    publish(server, release_key)
    add_hook(device, "switch-slot", '[ "$2" = rollback ] || { echo "bootloader env locked"; exit 1; }\n')
    err = failure(make_ctx(), artifact_id="sensor-fw-2.0.0")
    assert (err.code, err.retryable) == ("switch_failed", True) and "bootloader env locked" in str(err)
    assert whole_version(device) == "1.0.0" and slots.load_state(device)["pending"] is None
    add_hook(device, "switch-slot", "exit 0\n")
    assert run(make_ctx("as-2"), artifact_id="sensor-fw-2.0.0")["status"] == "installed"  # the hub's retry is a new assignment
