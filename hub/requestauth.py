"""Authentication of agent HTTP requests by their Ed25519 signature
(the scheme is in shared/requestsig.py).

Refusals: no or malformed header, a signature that does not verify, a
timestamp outside ``agent_request_window`` or a replayed signature: 401;
an unknown agent (or one without a registered key): 401; a revoked agent:
403. Each refusal names its code.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from hub.db import transaction
from hub.errors import HubError
from hub.identity import device_key
from hub.models import AgentRequestSignature
from shared.requestsig import HEADER, PURPOSE, canonical, parse_header
from shared.signing import PublicKey, SignatureError


class AgentUnauthorized(HubError):
    """The request is not signed by the agent it names."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class AgentRevoked(HubError):
    """The agent was revoked: nothing it sends is accepted."""

    status = 403
    code = "agent_revoked"


@dataclass(frozen=True)
class SignedRequest:
    """A request whose header names a known, unrevoked agent and a fresh
    timestamp: what is left is to check the signature over the body."""

    agent_id: str
    key: PublicKey
    timestamp: int
    nonce: str
    signature: bytes

    def verify(self, sessions: sessionmaker[Session], now: datetime, window: float, method: str, path: str, body: bytes) -> None:
        """Raise unless the signature covers this request and is new."""
        try:
            self.key.verify(PURPOSE, canonical(method, path, self.timestamp, self.nonce, body), self.signature)
        except SignatureError as exc:
            raise AgentUnauthorized(f"{HEADER}: {exc}", exc.code) from None
        _remember(sessions, now, window, self.agent_id, hashlib.sha256(self.signature).hexdigest())


def check_header(sessions: sessionmaker[Session], now: datetime, window: float, agent_id: str, header: str | None) -> SignedRequest:
    """Everything that can be checked before the body is read (so an
    unauthenticated client cannot make the hub read a large body)."""
    if not header:
        raise AgentUnauthorized(f"missing {HEADER} header: agent requests are signed with the device key (outpost-agent enroll)", "signature_missing")
    try:
        signer, timestamp, nonce, signature = parse_header(header)
    except SignatureError as exc:
        raise AgentUnauthorized(str(exc), exc.code) from None
    if signer != agent_id:
        raise AgentUnauthorized(f"the request is signed by agent {signer!r}, not by {agent_id!r}", "signer_mismatch")
    skew = timestamp - now.timestamp()
    if abs(skew) > window:
        raise AgentUnauthorized(f"the request's timestamp is {skew:+.0f}s from the hub's clock, outside the {window:.0f}s window (check the device's clock)", "stale_request")
    with sessions() as session:
        known = device_key(session, agent_id)
    if known.standing == "revoked":
        raise AgentRevoked(f"agent {agent_id!r} is revoked")
    if known.key is None:
        raise AgentUnauthorized(f"agent {agent_id!r} has no registered public key; enrol or pre-register it", "unknown_agent")
    return SignedRequest(agent_id, known.key, timestamp, nonce, signature)


def authenticate(
    sessions: sessionmaker[Session], now: datetime, window: float, agent_id: str, method: str, path: str, body: bytes, header: str | None,
) -> None:
    """Return when ``header`` is ``agent_id``'s valid, fresh, first-seen
    signature of this request; raise otherwise."""
    check_header(sessions, now, window, agent_id, header).verify(sessions, now, window, method, path, body)


def _remember(sessions: sessionmaker[Session], now: datetime, window: float, agent_id: str, digest: str) -> None:
    """Refuse a signature seen before; forget those older than twice the
    window (their timestamps are refused anyway)."""
    try:
        with transaction(sessions) as session:
            session.execute(delete(AgentRequestSignature).where(AgentRequestSignature.seen_at < now - timedelta(seconds=2 * window)))
            session.add(AgentRequestSignature(digest=digest, agent_id=agent_id, seen_at=now))
    except IntegrityError:
        raise AgentUnauthorized("this signed request was already received (replay); every request carries a fresh signature", "replayed_request") from None
