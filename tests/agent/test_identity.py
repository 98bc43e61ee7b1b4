"""The device's key and its trusted hub keys on disk (agent/identity.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.config import AgentSettings
from agent.identity import device_key, device_key_path, save_trusted_hub_keys, trust_path, trusted_hub_keys
from shared.signing import BadKey, SigningKey


def test_device_key_is_made_once_and_private(tmp_path: Path) -> None:
    settings = AgentSettings(agent_id="edge-1", state_dir=tmp_path)
    with pytest.raises(BadKey):
        device_key(settings, create=False)
    key = device_key(settings)
    assert device_key(settings).kid == key.kid
    assert stat.S_IMODE(os.stat(device_key_path(settings)).st_mode) == 0o600


def test_trusted_hub_keys_round_trip_and_damage(tmp_path: Path) -> None:
    settings = AgentSettings(agent_id="edge-1", state_dir=tmp_path)
    assert trusted_hub_keys(settings) == {}
    keys = [SigningKey.generate().public for _ in range(2)]
    save_trusted_hub_keys(settings, keys)
    assert stat.S_IMODE(os.stat(trust_path(settings)).st_mode) == 0o600
    assert set(trusted_hub_keys(settings)) == {k.kid for k in keys}
    trust_path(settings).write_text('{"keys": "nope"}')
    with pytest.raises(BadKey, match="'keys' list"):
        trusted_hub_keys(settings)
    trust_path(settings).write_text("{")
    with pytest.raises(BadKey):
        trusted_hub_keys(settings)


def test_the_hlc_floor_outlives_a_restart_with_the_clock_behind(tmp_path: Path) -> None:
    """A device without a real-time clock may restart decades behind; its next
    heartbeat must still stamp after the last one it sent, or the hub takes it
    for a replay."""
    from agent.identity import hlc_floor_path, load_hlc_floor, save_hlc_floor
    from shared.hlc import HybridClock

    settings = AgentSettings(agent_id="edge-1", state_dir=tmp_path)
    assert load_hlc_floor(settings) is None
    before = HybridClock("edge-1", lambda: 1_796_000_000_000)
    sent = before.now()
    save_hlc_floor(hlc_floor_path(settings), sent)
    after_restart = HybridClock("edge-1", lambda: 1_000)  # the clock reset to 1970
    floor = load_hlc_floor(settings)
    assert floor == sent
    after_restart.update(floor)
    assert after_restart.now() > sent
    hlc_floor_path(settings).write_text("")  # a power cut mid-write
    assert load_hlc_floor(settings) is None
    # A full or broken disk must not stop heartbeats: saving is best effort.
    assert save_hlc_floor(tmp_path / "missing" / "hlc", sent) is False


def test_concurrent_floor_saves_keep_the_newest_stamp(tmp_path: Path) -> None:
    """The heartbeat and status threads both save the floor; they must not
    trip over one temp file, and an older stamp saved last must not lower it."""
    import threading

    from agent.identity import save_hlc_floor
    from shared.hlc import HLC

    path = tmp_path / "hlc"
    stamps = [HLC(1_796_000_000_000 + i, 0, "edge-1") for i in range(400)]
    failures: list[HLC] = []

    def save(part: list[HLC]) -> None:
        failures.extend(s for s in part if not save_hlc_floor(path, s))

    threads = [threading.Thread(target=save, args=(stamps[i::2][:: -1 if i else 1],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert failures == []
    assert HLC.parse(path.read_text()) == stamps[-1]
    assert not (tmp_path / "hlc.tmp").exists()
