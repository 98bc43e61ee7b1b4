"""The hub keys this device trusts, and how they change.

Sources: ``<state_dir>/identity/hub-keys.json`` (``agent.identity``; written
by ``outpost-agent trust add``, enrolment and key announcements) and the
``hub_public_keys`` setting. Key ids the hub retired are listed in
``identity/hub-keys-retired.json`` and never trusted again, from either source.

A key announcement (``shared.keychain``) is applied when its chain adds or
retires keys starting from a key already trusted AND the frame as a whole is
signed by a key trusted after the walk; anything else is refused (reported
by the daemon as the security event ``bad_announcement``).

Firmware release keys are a separate set (``identity/release-keys.json``,
written by ``outpost-agent trust add --release``, plus the
``release_public_keys`` setting): they vouch for firmware images
(``shared/release.py``), never for hub messages, and the hub's keys never
vouch for firmware. The hub cannot change them.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from agent import identity
from agent.config import AgentSettings
from shared.envelope import decode
from shared.errors import ProtocolError
from shared.files import atomic_write
from shared.frames import HUB_TO_AGENT, split
from shared.keychain import walk
from shared.messages import KeyAnnouncement
from shared.signing import BadKey, PublicKey, SignatureError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    #: "updated", "unchanged" or "refused".
    status: str
    detail: str = ""


def release_keys_path(settings: AgentSettings) -> Path:
    return identity.identity_dir(settings) / "release-keys.json"


def stored_release_keys(settings: AgentSettings) -> dict[str, PublicKey]:
    """The release keys in ``identity/release-keys.json`` by key id; raises
    ``BadKey`` for a damaged file."""
    path = release_keys_path(settings)
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BadKey(f"cannot read trusted release keys {path}: {exc}") from None
    texts = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(texts, list):
        raise BadKey(f"trusted release keys {path} must be a JSON object with a 'keys' list")
    return {key.kid: key for key in (PublicKey.from_text(text) for text in texts)}


def add_release_key(settings: AgentSettings, key: PublicKey) -> bool:
    """Trust ``key`` for firmware releases; False if it already was."""
    stored = stored_release_keys(settings)
    if key.kid in stored:
        return False
    identity.identity_dir(settings).mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"keys": [k.to_text() for k in [*stored.values(), key]]}
    atomic_write(release_keys_path(settings), json.dumps(doc, indent=2).encode() + b"\n", mode=0o600)
    return True


def release_keys(settings: AgentSettings) -> list[str]:
    """Every trusted release key as ``ed25519:...`` text (setting and file),
    for the jobs' settings. A damaged file is logged and skipped: firmware
    then verifies against the configured keys only, and fails closed."""
    keys = {k.kid: k for k in (PublicKey.from_text(t) for t in settings.release_public_keys)}
    try:
        keys.update(stored_release_keys(settings))
    except BadKey as exc:
        log.error("%s", exc)
    return [key.to_text() for _, key in sorted(keys.items())]


class TrustStore:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._keys: dict[str, PublicKey] = {}
        self._retired: set[str] = set()
        self.reload()

    @property
    def retired_path(self) -> Path:
        return identity.identity_dir(self.settings) / "hub-keys-retired.json"

    def reload(self) -> None:
        """Read the files again (raises ``BadKey`` for a damaged one)."""
        stored = identity.trusted_hub_keys(self.settings)
        configured = {k.kid: k for k in (PublicKey.from_text(t) for t in self.settings.hub_public_keys)}
        retired = self._read_retired()
        with self._lock:
            self._retired = retired
            self._keys = {kid: key for kid, key in {**configured, **stored}.items() if kid not in retired}

    def retired(self) -> set[str]:
        return self._read_retired()

    def _read_retired(self) -> set[str]:
        try:
            doc = json.loads(self.retired_path.read_bytes())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            raise BadKey(f"cannot read {self.retired_path}: {exc}") from None
        kids = doc.get("kids") if isinstance(doc, dict) else None
        return {k for k in kids if isinstance(k, str)} if isinstance(kids, list) else set()

    def keys(self) -> dict[str, PublicKey]:
        with self._lock:
            return self._keys

    def add(self, key: PublicKey) -> bool:
        """Trust ``key`` (``outpost-agent trust add``); False if it already was."""
        stored = identity.trusted_hub_keys(self.settings)
        if key.kid in stored:
            return False
        identity.save_trusted_hub_keys(self.settings, [*stored.values(), key])
        self._forget_retired(key.kid)
        self.reload()
        return True

    def _forget_retired(self, kid: str) -> None:
        retired = self._read_retired()
        if kid in retired:  # an operator trusting it again by hand overrides an old retirement
            retired.discard(kid)
            self._save_retired(retired)

    def _save_retired(self, retired: set[str]) -> None:
        identity.identity_dir(self.settings).mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.retired_path, json.dumps({"kids": sorted(retired)}).encode() + b"\n", mode=0o600)

    def apply_announcement(self, frame: bytes) -> Outcome:
        """Walk a key announcement frame; never raises for bad input."""
        try:
            data, kid, signature = split(frame)
            envelope = decode(data, self.settings.max_message_bytes)
        except (SignatureError, ProtocolError) as exc:
            return Outcome("refused", f"key announcement unreadable: {exc}")
        body = envelope.body
        if not isinstance(body, KeyAnnouncement) or envelope.sender != "hub":
            return Outcome("refused", f"a {envelope.type!r} message from {envelope.sender!r} on the hub keys topic")
        with self._lock:
            trusted, retired = dict(self._keys), set(self._retired)
        result = walk(body.links, trusted, retired)
        outer = result.trusted.get(kid)
        try:
            if outer is None:
                raise SignatureError(f"signed with key {kid}, not trusted even after walking the chain", "unknown_key")
            outer.verify(HUB_TO_AGENT, data, signature)
        except SignatureError as exc:
            return Outcome("refused", f"key announcement not accepted: {exc}" + (f" ({'; '.join(result.problems[:3])})" if result.problems else ""))
        if result.problems:
            log.warning("key announcement: links ignored: %s", "; ".join(result.problems[:5]))
        if not result.changed:
            return Outcome("unchanged")
        stored = identity.trusted_hub_keys(self.settings)
        keep = {k: v for k, v in {**stored, **{kid: result.trusted[kid] for kid in result.added}}.items() if k not in result.retired}
        identity.save_trusted_hub_keys(self.settings, list(keep.values()))
        self._save_retired(result.retired)
        self.reload()
        log.info("hub keys updated: trusted now %s (added %s, retired %s)", ", ".join(sorted(self.keys())), result.added or "-", result.dropped or "-")
        return Outcome("updated", f"added {result.added}, retired {result.dropped}")
