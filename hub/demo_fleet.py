"""The standalone demo's firmware release: a release key, a signed image in
the artifact store, and the device roots the demo's agents update.

In production the release key lives on a release machine, never on the hub
(docs/fleet.md): a hub that held it could install anything. The demo runs
everything on one machine, so it keeps a demo-only key in its state folder
(``release/release.key``, 0600) and says so; nothing else trusts that key.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from hub.artifacts import ArtifactNotFound, ArtifactStore
from hub.auth.roles import Actor
from shared.clock import Clock
from shared.release import Manifest, sign
from shared.signing import SigningKey

log = logging.getLogger(__name__)

#: What the bundled ``firmware_rollout`` example installs.
DEMO_RELEASE = ("demo-fw", "1.1.0")
DEMO_HARDWARE = "demo-board"
DEMO_BASE_VERSION = "1.0.0"
_ACTOR = Actor("hub:standalone")


def release_key(state_dir: Path) -> SigningKey:
    return SigningKey.load_or_create(state_dir / "release" / "release.key")


def publish_demo_release(store: ArtifactStore, key: SigningKey, state_dir: Path, clock: Clock) -> str:
    """Sign and store the demo image once (later runs find it ready); returns its artifact id."""
    name, version = DEMO_RELEASE
    image = state_dir / "release" / f"{name}-{version}.bin"
    if not image.exists():
        # Deterministic bytes: a restarted demo re-signs the same release, never a conflicting one.
        image.write_bytes(b"".join(hashlib.sha256(f"{name}-{version}-{i}".encode()).digest() for i in range(8192)))
    data = image.read_bytes()
    manifest = Manifest(
        name=name, version=version, size=len(data), sha256=hashlib.sha256(data).hexdigest(), security_version=1,
        hardware=(DEMO_HARDWARE,), created_at=clock.now(), notes="Outpost standalone demo release (demo-only key).",
    )
    try:
        existing = store.get(manifest.artifact_id)
    except ArtifactNotFound:
        existing = None
    if existing is not None and existing["state"] == "ready":
        return manifest.artifact_id
    if existing is None:
        store.register(sign(manifest, key).to_bytes(), _ACTOR)
    upload = store.begin_upload(manifest.artifact_id, len(data))
    upload.write(data)
    upload.finish(_ACTOR)
    log.info("demo release %s stored (%d bytes)", manifest.artifact_id, len(data))
    return manifest.artifact_id


def prepare_device_root(root: Path, *, healthy: bool = True) -> None:
    """A demo device: hardware ``demo-board`` on firmware 1.0.0; an unhealthy
    one gets a health-check hook that fails, so its update rolls back."""
    (root / "hooks").mkdir(parents=True, exist_ok=True)
    identity = root / "device.json"
    if not identity.exists():
        identity.write_text(json.dumps({"hardware_model": DEMO_HARDWARE, "firmware_version": DEMO_BASE_VERSION}) + "\n")
    hook = root / "hooks" / "health-check"
    if not healthy and not hook.exists():
        hook.write_text("#!/bin/sh\n# Demo: this device's new image never passes its health check.\necho 'demo: sensor bus does not answer' >&2\nexit 1\n")
        hook.chmod(0o755)
