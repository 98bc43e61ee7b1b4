"""Fixtures for the firmware.update tests: keys, a real artifact server, a device root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_jobs.devroot import DeviceRoot
from shared.signing import SigningKey
from tests.firmware_jobs.ota.harness import ArtifactServer, Context, make_device


@pytest.fixture(scope="module")
def release_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def agent_key() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def server(agent_key: SigningKey) -> Iterator[ArtifactServer]:
    srv = ArtifactServer(agent_key.public)
    yield srv
    srv.close()


@pytest.fixture
def device(tmp_path: Path) -> DeviceRoot:
    return make_device(tmp_path / "device")


@pytest.fixture
def make_ctx(tmp_path: Path, device: DeviceRoot, server: ArtifactServer, release_key: SigningKey, agent_key: SigningKey):  # type: ignore[no-untyped-def]
    def make(assignment_id: str = "as-1", **settings: object) -> Context:
        base = {"device_root": str(device.path), "hub_url": server.url, "release_keys": [release_key.public.to_text()]}
        return Context(assignment_id, tmp_path / "work" / assignment_id, {**base, **settings}, agent_key)
    return make
