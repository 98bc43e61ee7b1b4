"""The hub's signing keys in use: signing for a device, rotation, retirement,
and the announcement chain devices learn new keys from.

The ring (``hub.identity.HubKeyring``, ``<state_dir>/keys``) holds the keys;
``announcements.json`` beside them holds the chain of ``add`` and ``retire``
links (``shared.keychain``). ``outpost-hub keys rotate`` and ``retire`` change
both on disk; running hub processes notice (:class:`LiveRing` looks at the
folder at most once a second), sign with the new current key and publish the
chain again, retained, on ``outpost/v1/hub/keys``.

Every message to a device is signed by :func:`sign_for`: recipient, issue
time and expiry (``message_ttl``) in the envelope, the signature over the
exact bytes (``shared.frames``, purpose ``hub-to-agent``).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from hub.errors import AgentNotFound
from hub.identity import HubKeyring
from hub.models import Agent
from shared.envelope import MAX_ENVELOPE_BYTES, Envelope
from shared.files import atomic_write
from shared.frames import HUB_TO_AGENT, sign_envelope
from shared.hlc import HLC
from shared.keychain import make_add, make_retire
from shared.messages import KeyAnnouncement, KeyLink, Message
from shared.signing import BadKey, SigningKey

CHAIN_FILE = "announcements.json"
#: Default lifetime of a signed message to a device: as long as the broker
#: keeps an offline device's queued messages (its session expiry, 7 days).
DEFAULT_TTL = 7 * 86400.0


class LiveRing:
    """A key ring that follows changes made on disk by another process."""

    def __init__(self, folder: Path, check_every: float = 1.0) -> None:
        self.folder = folder
        self.check_every = check_every
        self._lock = threading.Lock()
        self._ring = HubKeyring.load_or_create(folder)
        self._stamp = self._disk_stamp()
        self._checked = time.monotonic()
        #: Bumped whenever the ring was reloaded (the publisher re-announces).
        self.generation = 0

    def _disk_stamp(self) -> tuple[float, float]:
        def mtime(path: Path) -> float:
            try:
                return path.stat().st_mtime
            except OSError:
                return 0.0

        return mtime(self.folder / "current"), mtime(self.folder / CHAIN_FILE)

    def ring(self) -> HubKeyring:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self.check_every:
                self._checked = now
                stamp = self._disk_stamp()
                if stamp != self._stamp:
                    try:
                        self._ring = HubKeyring.load(self.folder)
                        self._stamp = stamp
                        self.generation += 1
                    except BadKey:
                        pass  # half-written by a rotation in progress: keep the old ring, look again next time
            return self._ring

    @property
    def current(self) -> SigningKey:
        return self.ring().current


def sign_for(
    ring: LiveRing | HubKeyring, body: Message, agent_id: str, hlc: HLC, now: float, *, ttl: float = DEFAULT_TTL,
    seq: int | None = None, limit: int = MAX_ENVELOPE_BYTES,
) -> bytes:
    """A signed frame of ``body`` for ``agent_id``, issued ``now``."""
    envelope = Envelope(body, sender="hub", hlc=hlc, recipient=agent_id, seq=seq, issued_at=round(now, 3), expires_at=round(now + ttl, 3))
    return sign_envelope(envelope, ring.current, HUB_TO_AGENT, limit)


def resign(ring: LiveRing | HubKeyring, envelope: Envelope, agent_id: str, now: float, *, ttl: float, seq: int | None, limit: int) -> bytes:
    """``envelope`` (as written to the outbox, unsigned) stamped for sending and signed."""
    stamped = replace(envelope, recipient=agent_id, seq=seq, issued_at=round(now, 3), expires_at=round(now + ttl, 3))
    return sign_envelope(stamped, ring.current, HUB_TO_AGENT, limit)


def reserve_send_seqs(session: Session, agent_id: str, n: int) -> int:
    """Reserve ``n`` consecutive sequence numbers for messages to
    ``agent_id`` (atomic in the database, like ``hub.identity.next_send_seq``);
    returns the last one. Raises ``AgentNotFound``."""
    result = session.execute(update(Agent).where(Agent.agent_id == agent_id).values(send_seq=Agent.send_seq + n).returning(Agent.send_seq))
    last = result.scalar_one_or_none()
    if last is None:
        raise AgentNotFound(f"no agent {agent_id!r}")
    return int(last)


# --- the chain ------------------------------------------------------------------


def load_chain(folder: Path) -> list[KeyLink]:
    try:
        doc = json.loads((folder / CHAIN_FILE).read_bytes())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise BadKey(f"cannot read {folder / CHAIN_FILE}: {exc}") from None
    links = doc.get("links") if isinstance(doc, dict) else None
    if not isinstance(links, list):
        raise BadKey(f"{folder / CHAIN_FILE} must be a JSON object with a 'links' list")
    return [KeyLink.from_dict(link) for link in links]


def _save_chain(folder: Path, links: list[KeyLink]) -> None:
    atomic_write(folder / CHAIN_FILE, json.dumps({"links": [link.to_dict() for link in links]}, indent=1).encode() + b"\n", mode=0o600)


def retired(folder: Path) -> set[str]:
    return {link.kid for link in load_chain(folder) if link.action == "retire"}


def rotate(folder: Path, now: float) -> tuple[SigningKey, KeyLink]:
    """Add a new key, announced by (signed with) the current one, and make it current."""
    ring = HubKeyring.load(folder)
    previous = ring.current
    new = SigningKey.generate()
    link = make_add(new.public, previous, now)
    # The chain first: a key that signs must already be announced.
    _save_chain(folder, [*load_chain(folder), link])
    ring.add(new, make_current=True)
    return new, link


def retire(folder: Path, kid: str, now: float) -> KeyLink:
    """Retire ``kid``: announced by the current key; its private key file is
    deleted so it can never sign again. Raises ``ValueError`` for the
    current key or a key not in the ring."""
    ring = HubKeyring.load(folder)
    if kid == ring.current_kid:
        raise ValueError(f"key {kid} is the current signing key; rotate first (outpost-hub keys rotate), then retire it")
    if kid not in ring.keys:
        raise ValueError(f"no key {kid} in {folder}; see outpost-hub keys list")
    link = make_retire(kid, ring.current, now)
    _save_chain(folder, [*load_chain(folder), link])
    (folder / f"assign-{kid}.key").unlink()
    return link


def announcement(ring: LiveRing | HubKeyring, folder: Path, hlc: HLC, now: float, limit: int = MAX_ENVELOPE_BYTES) -> bytes:
    """The retained frame for ``outpost/v1/hub/keys``: the whole chain, signed by the current key."""
    key = ring.current
    envelope = Envelope(KeyAnnouncement(key.kid, tuple(load_chain(folder))), sender="hub", hlc=hlc, issued_at=round(now, 3))
    return sign_envelope(envelope, key, HUB_TO_AGENT, limit)
