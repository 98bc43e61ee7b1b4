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
