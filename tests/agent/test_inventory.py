"""The inventory an agent reports: read from the device root, /proc/meminfo
and the job registry; sent in every heartbeat and the online status, over a
real broker; an OTA slot switch shows in the next heartbeat and republishes
the retained status."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from agent.config import load_settings
from agent.inventory import Inventory, memory
from firmware_jobs import registry as builtin
from shared.messages import INVENTORY_KEYS

from .conftest import wait_until

MEMINFO = "MemTotal:        2048000 kB\nMemFree:          100000 kB\nMemAvailable:     900000 kB\nBuffers:           12 kB\n"


def device_root(path: Path, model: str = "rpi4", version: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "device.json").write_text(json.dumps({"hardware_model": model, "serial": "s-1", "firmware_version": "1.0.0"}))
    if version is not None:
        set_active(path, version)
    return path


def set_active(root: Path, version: str) -> None:
    (root / "ota").mkdir(exist_ok=True)
    (root / "ota" / "state.json").write_text(json.dumps({"active": "b", "slots": {"a": {"version": "1.0.0"}, "b": {"version": version}}}))


def test_memory_prefers_available_then_free_and_is_zero_when_unknown(tmp_path: Path) -> None:
    info = tmp_path / "meminfo"
    info.write_text(MEMINFO)
    assert memory(info) == (900000 * 1024, 2048000 * 1024)
    info.write_text("MemTotal: 2048 kB\nMemFree: 1024 kB\n")  # an old kernel: no MemAvailable
    assert memory(info) == (1024 * 1024, 2048 * 1024)
    info.write_text("garbage\n\x00\xff: nope\nMemTotal: lots\n")
    assert memory(info) == (0, 0)
    assert memory(tmp_path / "missing") == (0, 0)


def test_collect_reads_the_device_root_and_the_catalog_once(tmp_path: Path) -> None:
    root = device_root(tmp_path / "dev", "gateway-x2")
    info = tmp_path / "meminfo"
    info.write_text(MEMINFO)
    catalog = [{"name": "noop", "version": "1"}, {"name": "firmware.update", "version": "2"}]
    inventory = Inventory(root, "9.9.9", catalog, meminfo=info)
    catalog.append({"name": "late", "version": "1"})  # read once, at start
    got = inventory.collect()
    assert set(got) == set(INVENTORY_KEYS)
    assert got["hardware_model"] == "gateway-x2" and got["firmware_version"] == "1.0.0"  # device.json's baseline
    assert got["agent_version"] == "9.9.9" and got["job_types"] == {"noop": "1", "firmware.update": "2"}
    assert got["disk_free_bytes"] > 0 and (got["mem_free_bytes"], got["mem_total_bytes"]) == (900000 * 1024, 2048000 * 1024)
    set_active(root, "1.3.0")
    assert inventory.collect()["firmware_version"] == "1.3.0"  # the active slot wins, read on every collect
    json.dumps(got)  # it travels as JSON


def test_a_missing_or_broken_device_root_reports_unknowns_not_errors(tmp_path: Path) -> None:
    got = Inventory(tmp_path / "no" / "such" / "root", "1", [], meminfo=tmp_path / "none").collect()
    assert got["hardware_model"] == (platform.machine() or "unknown") and got["firmware_version"] == "0.0.0"
    assert (got["disk_free_bytes"], got["mem_free_bytes"], got["mem_total_bytes"]) == (0, 0, 0)
    root = tmp_path / "broken"
    root.mkdir()
    (root / "device.json").write_text("{not json")
    (root / "ota").mkdir()
    (root / "ota" / "state.json").write_text('["a list"]')
    got = Inventory(root, "1", []).collect()
    assert got["firmware_version"] == "0.0.0" and got["disk_free_bytes"] > 0


def test_device_root_setting_defaults_under_state_dir_and_comes_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings(None, env={"OUTPOST_AGENT_AGENT_ID": "a", "OUTPOST_AGENT_STATE_DIR": str(tmp_path / "state")})
    assert settings.device_root == tmp_path / "state" / "device"
    settings = load_settings(None, env={"OUTPOST_AGENT_AGENT_ID": "a", "OUTPOST_AGENT_DEVICE_ROOT": str(tmp_path / "dev")})
    assert settings.device_root == tmp_path / "dev"
    toml = tmp_path / "agent.toml"
    toml.write_text(f'agent_id = "a"\ndevice_root = "{tmp_path / "dev2"}"\n')
    assert load_settings(toml, env={}).device_root == tmp_path / "dev2"


@pytest.mark.timeout(60)
def test_heartbeats_and_the_online_status_carry_the_inventory_and_follow_an_ota_switch(make_agent, hub, tmp_path: Path) -> None:
    root = device_root(tmp_path / "device", "rpi4", "1.2.0")
    agent = make_agent(device_root=root)
    assert agent.runner.job_settings["device_root"] == str(root)  # jobs (the OTA helper) find the device through it
    status = hub.wait_status("online").body
    assert status.inventory["hardware_model"] == "rpi4" and status.inventory["firmware_version"] == "1.2.0"
    assert status.inventory["job_types"] == {e["name"]: e["version"] for e in builtin.catalog()}
    assert {j.name for j in status.job_types} == set(status.inventory["job_types"])
    beat = hub.wait_for("heartbeat")[-1]
    assert set(beat.inventory) == set(INVENTORY_KEYS) and beat.inventory["firmware_version"] == "1.2.0"
    assert beat.inventory["disk_free_bytes"] > 0

    seen = len(hub.statuses)
    set_active(root, "1.3.0")  # what firmware.update does when it switches slots
    wait_until(lambda: any(b.inventory.get("firmware_version") == "1.3.0" for b in hub.of("heartbeat")), 10, "a heartbeat with the new firmware")
    republished = hub.wait_status("online", since=seen).body
    assert republished.inventory["firmware_version"] == "1.3.0"
    # Only a change of the stable part republishes: free disk and memory move all the time.
    count = len(hub.statuses)
    hub.wait_for("heartbeat", count=len(hub.of("heartbeat")) + 2)
    assert len(hub.statuses) == count
