"""Enrolment, pre-registration and revocation of devices.

* An admin creates a one-time *enrolment token* (``outpost-hub agents token
  create`` or ``POST /api/v1/enrolment-tokens``): a random secret shown once;
  the hub keeps its SHA-256, an expiry, and optionally the agent id the device
  must take and the labels it starts with.
* The device runs ``outpost-agent enroll``: it makes its Ed25519 key pair,
  keeps the private half, and posts the token, its agent id and its public key
  to ``POST /api/v1/enroll`` (:func:`enrol`). In one transaction the token is
  consumed, the public key registered and, when the hub manages broker
  credentials, the device's broker client created; the answer carries the
  broker credentials and the hub's public keys. A token is good for one
  enrolment, or for ``uses`` enrolments when created with more (a *fleet
  provisioning token*, like AWS IoT's claim certificates: one secret baked
  into a batch of devices, each of which then gets its own key and broker
  client); an unknown, expired or used-up token is refused (401) and the
  attempt recorded in the audit log.
* Pre-registration (``outpost-hub agents register``) records an id and a
  public key made on the device by other means (a factory, a TPM).
* Revocation (:func:`revoke`) marks the agent revoked (its messages and HTTP
  requests are refused from then on) and deletes its broker client, which
  disconnects it. :func:`reinstate` lifts it; the device then enrols again.

A token without an agent id lets the device choose one, but never one that
already has a key: that would let any token holder take over a device.
Re-enrolling a device (it lost its key) takes a token made for its id.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub.auth import ratelimit
from hub.auth.ratelimit import LoginLimits
from hub.brokeradmin import AgentCredentials, BrokerAdmin, BrokerAdminError
from hub.config import HubSettings
from hub.db import for_update, transaction
from hub.errors import Conflict, HubError, InvalidRequest, RateLimited
from hub.identity import HubKeyring, register_agent, reinstate_agent, revoke_agent
from hub.models import Agent, EnrolmentToken
from shared.signing import BadKey, PublicKey
from shared.topics import check_agent_id

log = logging.getLogger(__name__)

TOKEN_PREFIX = "opte_"
MAX_TOKEN_LIFETIME = timedelta(days=30)
#: Most enrolments one fleet provisioning token allows.
MAX_TOKEN_USES = 100_000
_DURATION = re.compile(r"^(\d{1,7})([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class EnrolmentRefused(HubError):
    """The enrolment token is unknown, expired, used, or not for this agent id."""

    status = 401
    code = "enrolment_refused"

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class BrokerProvisioningFailed(HubError):
    """The broker refused to create or delete an agent's credentials."""

    status = 502
    code = "broker_provisioning_failed"


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``; at most :data:`MAX_TOKEN_LIFETIME`."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InvalidRequest(f"duration {text!r} is not a number followed by s, m, h or d (e.g. 24h)")
    value = timedelta(seconds=int(match.group(1)) * _UNITS[match.group(2)])
    if not timedelta(0) < value <= MAX_TOKEN_LIFETIME:
        raise InvalidRequest(f"duration {text!r} must be more than 0 and at most {MAX_TOKEN_LIFETIME.days} days")
    return value


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def hub_key_folder(settings: HubSettings) -> Path:
    """Where the hub's assignment key ring lives: the ring the hub signs with
    (``keys_dir``, default ``<state_dir>/keys``)."""
    return settings.key_ring_dir


def hub_public_keys(settings: HubSettings) -> list[str]:
    return [key.to_text() for key in HubKeyring.load_or_create(hub_key_folder(settings)).public_keys()]


# --- tokens ----------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str
    id: int
    expires_at: datetime
    agent_id: str | None
    labels: dict[str, str]
    uses: int = 1


def create_token(
    session: Session, now: datetime, lifetime: timedelta, actor: str, agent_id: str | None = None, labels: dict[str, str] | None = None, uses: int = 1,
) -> IssuedToken:
    """A new token good for ``uses`` enrolments (default one); the clear
    text is returned here and never again."""
    if isinstance(uses, bool) or not isinstance(uses, int) or not 1 <= uses <= MAX_TOKEN_USES:
        raise InvalidRequest(f"uses must be a whole number from 1 to {MAX_TOKEN_USES}")
    if uses > 1 and agent_id is not None:
        raise InvalidRequest("a token bound to one agent id enrols that one device: leave uses at 1, or leave out the agent id")
    if agent_id is not None:
        try:
            check_agent_id(agent_id)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
    if lifetime > MAX_TOKEN_LIFETIME or lifetime <= timedelta(0):
        raise InvalidRequest(f"a token lives more than 0 and at most {MAX_TOKEN_LIFETIME.days} days")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = EnrolmentToken(
        token_hash=hash_token(token), agent_id=agent_id, labels=dict(labels or {}), created_at=now, created_by=actor,
        expires_at=now + lifetime, used_at=None, used_by=None, uses=uses, use_count=0,
    )
    session.add(row)
    session.flush()
    audit.record(session, actor, "enrolment_token.create", agent_id or "", at=now, token_id=row.id, expires_at=row.expires_at.isoformat(), labels=row.labels, uses=uses)
    return IssuedToken(token, row.id, row.expires_at, agent_id, dict(row.labels), uses)


# --- enrolment -------------------------------------------------------------------


@dataclass
class Enrolment:
    agent_id: str
    labels: dict[str, str]
    credentials: AgentCredentials | None
    hub_public_keys: list[str] = field(default_factory=list)


def enrol(
    sessions: sessionmaker[Session], settings: HubSettings, broker: BrokerAdmin | None, now: datetime,
    token: str, agent_id: str | None, public_key: str, remote: str = "", limits: LoginLimits | None = None,
) -> Enrolment:
    """Consume ``token``, register ``public_key`` for the agent, provision its
    broker client. All or nothing: when the broker refuses, the token stays
    unused and the key unregistered (the device may try again).

    With ``limits``, refused tokens are counted per client address like
    failed logins: past the limit every attempt from that address raises
    ``RateLimited`` (audited, token not even looked at) until the window
    passes, so tokens cannot be guessed at full speed."""
    if limits is not None:
        with sessions() as session:
            wait = ratelimit.address_retry_after(session, ratelimit.ENROL, remote, now, limits)
        if wait:
            with transaction(sessions) as session:
                audit.record(session, f"agent:{agent_id or '?'}", "agent.enrol", agent_id or "", at=now, success=False, remote=remote, code="rate_limited", reason=f"too many refused enrolments from {remote}")
            raise RateLimited(f"too many refused enrolments from this address; try again in {wait} s", retry_after=wait)
    try:
        key = PublicKey.from_text(public_key)
        if agent_id is not None:
            check_agent_id(agent_id)
    except (BadKey, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None
    try:
        with transaction(sessions) as session:
            row = session.scalars(for_update(select(EnrolmentToken).where(EnrolmentToken.token_hash == hash_token(token)), session)).first()
            chosen = _check_token(row, agent_id, now)
            existing = session.get(Agent, chosen)
            if row is not None and row.agent_id is None and existing is not None and existing.public_key:
                raise Conflict(f"agent id {chosen!r} is already enrolled; to re-enrol that device, create a token for it (--agent-id {chosen})")
            agent = register_agent(session, chosen, key, now, replace=True)
            assert row is not None
            # Counted under the row lock (for_update; SQLite serialises
            # writers), so concurrent devices never overrun ``uses``.
            row.used_at, row.used_by, row.use_count = now, chosen, row.use_count + 1
            if row.labels:
                agent.labels = {**(agent.labels or {}), **row.labels}
            session.flush()
            credentials = None
            if broker is not None:
                try:
                    credentials = broker.provision_agent(chosen)
                except BrokerAdminError as exc:
                    raise BrokerProvisioningFailed(f"enrolment of {chosen!r} not done: {exc}") from None
            audit.record(
                session, f"agent:{chosen}", "agent.enrol", chosen, at=now, remote=remote, token_id=row.id, key_id=key.kid, broker=credentials is not None,
                use=row.use_count, uses=row.uses,
            )
            labels = dict(row.labels)
    except EnrolmentRefused as exc:
        _record_refusal(sessions, now, remote, agent_id, exc.code, str(exc), limits)
        raise
    log.info("agent %s enrolled (key %s)", chosen, key.kid)
    return Enrolment(chosen, labels, credentials, hub_public_keys(settings))


def _check_token(row: EnrolmentToken | None, agent_id: str | None, now: datetime) -> str:
    if row is None:
        raise EnrolmentRefused("unknown enrolment token; ask an admin for a new one (outpost-hub agents token create)", "token_unknown")
    if row.use_count >= row.uses:
        when = f"{row.used_at:%Y-%m-%d %H:%M UTC}" if row.used_at is not None else "?"
        if row.uses == 1:
            raise EnrolmentRefused(f"this enrolment token was already used (by {row.used_by}, {when}); tokens work once", "token_used")
        raise EnrolmentRefused(f"this enrolment token was used up ({row.use_count} of {row.uses} enrolments, the last by {row.used_by}, {when}); ask for a new one", "token_used")
    if row.expires_at <= now:
        raise EnrolmentRefused(f"this enrolment token expired on {row.expires_at:%Y-%m-%d %H:%M UTC}; ask for a new one", "token_expired")
    if row.agent_id is not None and agent_id is not None and agent_id != row.agent_id:
        raise EnrolmentRefused(f"this enrolment token is for agent {row.agent_id!r}, not {agent_id!r}", "token_agent_mismatch")
    chosen = agent_id or row.agent_id
    if chosen is None:
        raise InvalidRequest("agent_id is required: this token is not bound to an agent id")
    return chosen


def _record_refusal(sessions: sessionmaker[Session], now: datetime, remote: str, agent_id: str | None, code: str, message: str, limits: LoginLimits | None = None) -> None:
    with transaction(sessions) as session:
        if limits is not None:
            ratelimit.record_failure(session, ratelimit.ENROL, remote, now, limits)
        audit.record(session, f"agent:{agent_id or '?'}", "agent.enrol", agent_id or "", at=now, success=False, remote=remote, code=code, reason=message)


# --- pre-registration and revocation ---------------------------------------------


def preregister(
    sessions: sessionmaker[Session], broker: BrokerAdmin | None, now: datetime, agent_id: str, public_key: str, actor: str, replace: bool = False,
) -> AgentCredentials | None:
    """Record a device's id and public key made outside Outpost; provisions
    its broker client when the hub manages them (the credentials are returned
    once, for the device's configuration). ``replace`` swaps a different
    key already registered (a device that lost its key)."""
    try:
        check_agent_id(agent_id)
        key = PublicKey.from_text(public_key)
    except (BadKey, ValueError) as exc:
        raise InvalidRequest(str(exc)) from None
    with transaction(sessions) as session:
        register_agent(session, agent_id, key, now, replace=replace)
        credentials = None
        if broker is not None:
            try:
                credentials = broker.provision_agent(agent_id)
            except BrokerAdminError as exc:
                raise BrokerProvisioningFailed(f"registration of {agent_id!r} not done: {exc}") from None
        audit.record(session, actor, "agent.register", agent_id, at=now, key_id=key.kid, broker=credentials is not None, replace=replace)
    return credentials


@dataclass(frozen=True)
class Revocation:
    agent_id: str
    revoked_at: datetime
    #: "removed" (client deleted, connection cut), "not_managed" (no broker admin configured).
    broker: str


def revoke(sessions: sessionmaker[Session], broker: BrokerAdmin | None, now: datetime, agent_id: str, actor: str, remote: str = "") -> Revocation:
    """Revoke first in the database (its messages and requests are refused at
    once, whatever the broker does), then cut its broker access. A broker
    error is raised after the revocation is committed: run it again."""
    with transaction(sessions) as session:
        agent = revoke_agent(session, agent_id, now)
        revoked_at = agent.revoked_at or now
        audit.record(session, actor, "agent.revoke", agent_id, at=now, remote=remote)
    if broker is None:
        return Revocation(agent_id, revoked_at, "not_managed")
    try:
        broker.remove_agent(agent_id)
    except BrokerAdminError as exc:
        with transaction(sessions) as session:
            audit.record(session, actor, "agent.revoke_broker", agent_id, at=now, success=False, reason=str(exc))
        raise BrokerProvisioningFailed(f"agent {agent_id!r} is revoked at the hub, but its broker client could not be removed: {exc}; run the revocation again") from None
    return Revocation(agent_id, revoked_at, "removed")


def reinstate(sessions: sessionmaker[Session], now: datetime, agent_id: str, actor: str) -> None:
    """Lift a revocation. The device has no broker client any more: it
    enrols again with a token made for its id (a new key, new credentials)."""
    with transaction(sessions) as session:
        reinstate_agent(session, agent_id)
        audit.record(session, actor, "agent.reinstate", agent_id, at=now)


def describe_token(row: EnrolmentToken) -> dict[str, Any]:
    return {
        "id": row.id, "agent_id": row.agent_id, "labels": row.labels, "created_at": row.created_at, "expires_at": row.expires_at, "used_at": row.used_at,
        "used_by": row.used_by, "uses": row.uses, "use_count": row.use_count,
    }
