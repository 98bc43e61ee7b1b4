"""The device's identity on disk: its own Ed25519 key and the hub keys it trusts.

Both live in ``<state_dir>/identity/`` (mode 0700):

* ``device.key``: the device's private key (PEM, 0600). Made on the device at
  enrolment (or the first start of a pre-registered device) and never sent
  anywhere; the hub knows only its public half.
* ``hub-keys.json``: the public keys of the hub's assignment key ring the
  device accepts signatures from, as ``{"keys": ["ed25519:...", ...]}``
  (0600 so no other local user can plant a key). Written at enrolment and
  when the hub announces a new key signed by one already trusted.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from agent.config import AgentSettings
from shared.files import atomic_write
from shared.hlc import HLC
from shared.signing import BadKey, PublicKey, SigningKey


def identity_dir(settings: AgentSettings) -> Path:
    return settings.state_dir / "identity"


def device_key_path(settings: AgentSettings) -> Path:
    return identity_dir(settings) / "device.key"


def trust_path(settings: AgentSettings) -> Path:
    return identity_dir(settings) / "hub-keys.json"


def device_key(settings: AgentSettings, create: bool = True) -> SigningKey:
    """The device's key; made on first use when ``create``. Raises ``BadKey``."""
    path = device_key_path(settings)
    if create:
        return SigningKey.load_or_create(path)
    return SigningKey.load(path)


def trusted_hub_keys(settings: AgentSettings) -> dict[str, PublicKey]:
    """The hub keys this device trusts, by key id (empty when none are stored)."""
    path = trust_path(settings)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BadKey(f"cannot read trusted hub keys {path}: {exc}") from None
    texts = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(texts, list):
        raise BadKey(f"trusted hub keys {path} must be a JSON object with a 'keys' list")
    keys = [PublicKey.from_text(text) for text in texts]
    return {key.kid: key for key in keys}


def hlc_floor_path(settings: AgentSettings) -> Path:
    return settings.state_dir / "hlc"


def load_hlc_floor(settings: AgentSettings) -> HLC | None:
    """The last heartbeat or status stamp this device sent, or None (none
    yet, or an unreadable file: a power cut may leave it empty)."""
    try:
        return HLC.parse(hlc_floor_path(settings).read_text().strip())
    except (OSError, ValueError):
        return None


_floor_lock = threading.Lock()
#: The newest stamp written per floor file in this process.
_floor_written: dict[Path, HLC] = {}


def save_hlc_floor(path: Path, stamp: HLC) -> bool:
    """Best effort: False when it could not be written (a full disk must not
    stop heartbeats; the floor then lags, see load_hlc_floor)."""
    # The heartbeat and status threads both save: one lock, so they never
    # share the temp file, and an older stamp saved last never lowers the floor.
    with _floor_lock:
        written = _floor_written.get(path)
        if written is not None and (stamp.wall_ms, stamp.logical) <= (written.wall_ms, written.logical) and path.exists():
            return True
        # No fsync: this is written with every heartbeat (flash wear); after a
        # power cut an older or empty file costs at most a refused heartbeat.
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(str(stamp))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        _floor_written[path] = stamp
        return True


def save_trusted_hub_keys(settings: AgentSettings, keys: list[PublicKey]) -> None:
    identity_dir(settings).mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"keys": [key.to_text() for key in keys]}
    atomic_write(trust_path(settings), json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
