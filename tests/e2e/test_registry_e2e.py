"""End to end, real processes: an agent's inventory (hardware model from the
device.json in its device root, firmware from its OTA state) reaches the
hub's registry, where the API filters by it and operators group it."""

from __future__ import annotations

import json
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_a_real_agents_inventory_arrives_in_the_hub_registry(fleet: Any) -> None:
    f = fleet()
    f.start_hub()
    device = f.root / "agents" / "edge-rpi" / "device"  # the default device root: <state_dir>/device
    (device / "ota").mkdir(parents=True)
    (device / "device.json").write_text(json.dumps({"hardware_model": "rpi4-e2e", "serial": "SN-1"}))
    (device / "ota" / "state.json").write_text(json.dumps({"active": "a", "slots": {"a": {"version": "1.4.2"}, "b": None}}))
    f.start_agent("edge-rpi", site="lab")
    f.start_agent("edge-plain", site="lab")  # no device.json: the machine type, firmware 0.0.0
    f.wait_agents_online(2)

    def registry(**params: Any) -> list[str]:
        return [a["agent_id"] for a in f.api("GET", "/agents", params=params)["items"]]

    f.wait(lambda: registry(hardware="rpi4-e2e") == ["edge-rpi"], 30, "edge-rpi's inventory in the registry")
    agent = f.api("GET", "/agents/edge-rpi")
    inventory = agent["inventory"]
    assert (agent["hardware_model"], agent["firmware_version"]) == ("rpi4-e2e", "1.4.2")
    assert inventory["firmware_version"] == "1.4.2" and inventory["job_types"]["noop"]
    assert inventory["disk_free_bytes"] > 0 and inventory["mem_total_bytes"] > 0  # this is Linux: /proc/meminfo exists
    assert inventory["agent_version"] == agent["version"]

    f.wait(lambda: f.api("GET", "/agents/edge-plain")["firmware_version"] == "0.0.0", 30, "edge-plain's inventory")
    assert registry(firmware=">=1.4,<2") == ["edge-rpi"]
    assert registry(firmware="<1", online="true") == ["edge-plain"]
    assert registry(job_type="noop") == ["edge-plain", "edge-rpi"]
    assert f.api("PUT", "/agents/edge-plain/groups", json={"groups": ["canary"]})["groups"] == ["canary"]
    assert registry(group="canary") == ["edge-plain"]
    # A heartbeat from the device changes the inventory, never the operators' groups.
    seen = f.api("GET", "/agents/edge-plain")["last_seen"]
    f.wait(lambda: f.api("GET", "/agents/edge-plain")["last_seen"] != seen, 30, "another heartbeat")
    assert f.api("GET", "/agents/edge-plain")["groups"] == ["canary"]
