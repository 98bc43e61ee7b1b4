"""Who the hub trusts and how it signs: device public keys and the hub's key ring.

Devices: each agent row may hold the public half of the device's Ed25519 key
(``agents.public_key``), set at enrolment or by pre-registration; a revoked
agent keeps its row (history, audit) with ``revoked_at`` set, and nothing it
sends is applied again.

The hub's *assignment key ring* lives in a folder (``<state_dir>/keys`` by
default, mode 0700): one PEM file per key (``assign-<kid>.key``, 0600) and
``current`` naming the key that signs. Every hub process that publishes to
devices, and the API (which hands the public keys out at enrolment), reads
the same folder. Older keys stay in the ring so devices that have not yet
heard of the newest key keep working during a rotation.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session

from hub.errors import AgentNotFound, Conflict
from hub.models import Agent
from shared.files import atomic_write
from shared.signing import BadKey, PublicKey, SigningKey
from shared.topics import check_agent_id

# --- devices --------------------------------------------------------------------


def register_agent(session: Session, agent_id: str, public_key: str | PublicKey, now: datetime, *, replace: bool = False) -> Agent:
    """Record ``agent_id``'s public key (pre-registration or enrolment).

    A different key for an already registered device is refused unless
    ``replace`` (re-enrolment of a device that lost its key); a revoked
    device stays revoked: ``reinstate`` it first, on purpose."""
    check_agent_id(agent_id)
    key = public_key if isinstance(public_key, PublicKey) else PublicKey.from_text(public_key)
    agent = session.get(Agent, agent_id)
    if agent is None:
        agent = Agent(agent_id=agent_id, first_seen=now, last_seen=now, state="offline", labels={}, job_types=[], last_heartbeat={}, status_hlc="")
        session.add(agent)
    if agent.revoked_at is not None:
        raise Conflict(f"agent {agent_id!r} was revoked on {agent.revoked_at:%Y-%m-%d %H:%M UTC}; reinstate it before registering a key")
    if agent.public_key and agent.public_key != key.to_text() and not replace:
        raise Conflict(f"agent {agent_id!r} already has a different public key ({PublicKey.from_text(agent.public_key).kid}); re-enrol with replace to change it")
    agent.public_key = key.to_text()
    agent.registered_at = now
    return agent


def revoke_agent(session: Session, agent_id: str, now: datetime) -> Agent:
    """Mark the device revoked (idempotent: the first revocation time stays)."""
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise AgentNotFound(f"no agent {agent_id!r}")
    if agent.revoked_at is None:
        agent.revoked_at = now
    return agent


def reinstate_agent(session: Session, agent_id: str) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise AgentNotFound(f"no agent {agent_id!r}")
    agent.revoked_at = None
    return agent


@dataclass(frozen=True, slots=True)
class DeviceKey:
    """What the hub knows of a device's identity: its key, or why it has none."""

    agent_id: str
    key: PublicKey | None
    #: "ok", "unknown" (no such agent or no key registered) or "revoked".
    standing: str


def device_key(session: Session, agent_id: str) -> DeviceKey:
    agent = session.get(Agent, agent_id)
    if agent is None or not agent.public_key:
        return DeviceKey(agent_id, None, "unknown")
    if agent.revoked_at is not None:
        return DeviceKey(agent_id, None, "revoked")
    return DeviceKey(agent_id, PublicKey.from_text(agent.public_key), "ok")


def next_send_seq(session: Session, agent_id: str) -> int:
    """Reserve the next per-device sequence number for a message to
    ``agent_id`` (atomic in the database, so hub processes never reuse one)."""
    result = session.execute(update(Agent).where(Agent.agent_id == agent_id).values(send_seq=Agent.send_seq + 1).returning(Agent.send_seq))
    seq = result.scalar_one_or_none()
    if seq is None:
        raise AgentNotFound(f"no agent {agent_id!r}")
    return int(seq)


# --- the hub's key ring ----------------------------------------------------------


class HubKeyring:
    """The hub's assignment keys in one folder; ``current`` signs."""

    def __init__(self, folder: Path, keys: dict[str, SigningKey], current: str) -> None:
        self.folder = folder
        self.keys = keys
        self.current_kid = current

    @property
    def current(self) -> SigningKey:
        return self.keys[self.current_kid]

    def public_keys(self) -> list[PublicKey]:
        """Every key of the ring, the current one first."""
        return [self.current.public] + [k.public for kid, k in sorted(self.keys.items()) if kid != self.current_kid]

    @classmethod
    def load(cls, folder: Path) -> HubKeyring:
        """Read the ring; raises ``BadKey`` if it is missing or damaged."""
        try:
            current = (folder / "current").read_text().strip()
        except OSError as exc:
            raise BadKey(f"no hub key ring in {folder} ({exc.strerror}); the hub makes one on first start") from None
        keys = {}
        for path in sorted(folder.glob("assign-*.key")):
            key = SigningKey.load(path)
            keys[key.kid] = key
        if current not in keys:
            raise BadKey(f"hub key ring {folder}: 'current' names key {current!r}, which is not in the folder")
        return cls(folder, keys, current)

    @classmethod
    def load_or_create(cls, folder: Path) -> HubKeyring:
        if (folder / "current").exists():
            return cls.load(folder)
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Hub processes started together (scheduler and API) must not each make
        # a first key: the loser's would sign messages no device trusts.
        with _locked(folder):
            if (folder / "current").exists():
                return cls.load(folder)
            key = SigningKey.generate()
            key.save(folder / f"assign-{key.kid}.key")
            atomic_write(folder / "current", key.kid.encode() + b"\n", mode=0o600)
            return cls(folder, {key.kid: key}, key.kid)

    def add(self, key: SigningKey, make_current: bool = True) -> None:
        """Put ``key`` in the ring (file first, then the pointer: a crash
        between the two leaves the old key signing, never a dangling name)."""
        key.save(self.folder / f"assign-{key.kid}.key")
        self.keys[key.kid] = key
        if make_current:
            atomic_write(self.folder / "current", key.kid.encode() + b"\n", mode=0o600)
            self.current_kid = key.kid


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the key ring folder, across processes."""
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
