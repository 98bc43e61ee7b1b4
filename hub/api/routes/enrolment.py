"""Device enrolment (agent-facing) and the admin routes around it: enrolment
tokens, pre-registration, revocation. The rules are in ``hub.enrolment``.

``POST /enroll`` is called by devices that have no account: it authenticates
with the enrolment token in its body and nothing else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from hub import enrolment
from hub.api.schemas import ErrorResponse
from hub.auth.ratelimit import LoginLimits
from hub.auth.roles import Role, requires
from hub.brokeradmin import BrokerAdmin
from hub.config import HubSettings
from hub.db import transaction
from shared.clock import utcnow

router = APIRouter(tags=["enrolment"])

#: Who the audit log names for admin actions made over the API (the auth
#: layer, where present, puts the signed-in user on request.state.actor).
_API_ACTOR = "api"


class EnrolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(min_length=1, max_length=200, description="The enrolment token (one-time, or a fleet provisioning token with uses left).")
    agent_id: str | None = Field(None, max_length=128, description="The id the device takes; may be left out when the token names one.")
    public_key: str = Field(min_length=1, max_length=100, description="The device's Ed25519 public key, 'ed25519:<base64url>'. The private key never leaves the device.")


class BrokerCredentials(BaseModel):
    host: str
    port: int
    tls: bool
    username: str
    password: str = Field(description="Shown in this answer only.")


class EnrolResponse(BaseModel):
    agent_id: str
    broker: BrokerCredentials | None = Field(description="The device's own broker client; null when the hub does not manage broker credentials (broker_admin_username is empty).")
    hub_public_keys: list[str] = Field(description="The hub's signing public keys, current first: the device accepts work signed by these.")
    labels: dict[str, str] = Field(description="Labels the token gave the device.")


class TokenRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    expires: str = Field("24h", description="Lifetime: a number and s, m, h or d (at most 30d).")
    agent_id: str | None = Field(None, max_length=128, description="The agent id the device must enrol as; none: the device chooses a new id.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels the enrolled agent starts with.")
    uses: int = Field(1, ge=1, le=enrolment.MAX_TOKEN_USES, strict=True, description="How many devices may enrol with it (1: a one-time token; more: a fleet provisioning token for a batch of devices, each choosing its own new id). Not with agent_id.")


class TokenResponse(BaseModel):
    token: str = Field(description="The token. Shown once: the hub keeps only its hash.")
    id: int
    expires_at: datetime
    agent_id: str | None
    labels: dict[str, str]
    uses: int


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    public_key: str = Field(min_length=1, max_length=100, description="The device's Ed25519 public key, 'ed25519:<base64url>'.")


class RegisterResponse(BaseModel):
    agent_id: str
    broker: BrokerCredentials | None


class RevokeResponse(BaseModel):
    agent_id: str
    revoked_at: datetime
    broker: str = Field(description="removed: the broker client was deleted (the device is disconnected); not_managed: broker credentials are managed outside Outpost.")


def _parts(request: Request) -> tuple[HubSettings, Any, datetime, str]:
    state = request.app.state
    remote = request.client.host if request.client else ""
    return state.settings, state.sessions, utcnow(state.clock), remote


def _broker_answer(settings: HubSettings, credentials: Any) -> dict[str, Any] | None:
    if credentials is None:
        return None
    return {
        "host": settings.agent_broker_host or settings.broker_host,
        "port": settings.agent_broker_port or settings.broker_port,
        "tls": settings.agent_broker_tls,
        "username": credentials.username,
        "password": credentials.password,
    }


@router.post(
    "/enroll",
    response_model=EnrolResponse,
    responses={
        401: {"model": ErrorResponse, "description": "Unknown, expired or used-up token, or a token for another agent id (codes token_unknown, token_expired, token_used, token_agent_mismatch)."},
        409: {"model": ErrorResponse, "description": "The agent id is enrolled already (re-enrolment needs a token made for that id), or revoked."},
        429: {"model": ErrorResponse, "description": "Too many refused enrolments from this client address within login_failure_window (more than login_max_failures_per_address); the header Retry-After says when to try again."},
        502: {"model": ErrorResponse, "description": "The broker refused to create the device's credentials; nothing was changed (code broker_provisioning_failed)."},
    },
)
def enroll(request: Request, body: EnrolRequest) -> dict[str, Any]:
    """Enrol a device: consume the one-time token, register the device's
    public key, and create its broker credentials. Authenticated by the token
    only; every attempt, refused or not, is in the audit log. Refused tokens
    count per client address like failed logins (429 past the limit)."""
    settings, sessions, now, remote = _parts(request)
    limits = LoginLimits(settings.login_max_failures, settings.login_max_failures_per_address, settings.login_failure_window)
    done = enrolment.enrol(sessions, settings, BrokerAdmin.from_settings(settings), now, body.token, body.agent_id, body.public_key, remote, limits)
    return {"agent_id": done.agent_id, "broker": _broker_answer(settings, done.credentials), "hub_public_keys": done.hub_public_keys, "labels": done.labels}


@router.post("/enrolment-tokens", response_model=TokenResponse, status_code=201, responses={422: {"model": ErrorResponse, "description": "Bad lifetime, agent id or uses (or uses above 1 with an agent id)."}})
@requires(Role.ADMIN)
def create_enrolment_token(request: Request, body: TokenRequest) -> dict[str, Any]:
    """An expiring enrolment token: one-time for one device, or good for
    ``uses`` devices (a fleet provisioning token) (admin)."""
    settings, sessions, now, _remote = _parts(request)
    lifetime = enrolment.parse_duration(body.expires)
    actor = getattr(request.state, "actor", _API_ACTOR)
    with transaction(sessions) as session:
        issued = enrolment.create_token(session, now, lifetime, actor, body.agent_id, body.labels, body.uses)
    return {"token": issued.token, "id": issued.id, "expires_at": issued.expires_at, "agent_id": issued.agent_id, "labels": issued.labels, "uses": issued.uses}


@router.put(
    "/agents/{agent_id}/public-key",
    response_model=RegisterResponse,
    responses={409: {"model": ErrorResponse, "description": "The agent has a different key, or is revoked."}, 502: {"model": ErrorResponse, "description": "The broker refused."}},
)
@requires(Role.ADMIN)
def register_agent_key(request: Request, agent_id: Annotated[str, Path(max_length=128)], body: RegisterRequest) -> dict[str, Any]:
    """Pre-register a device: its id and a public key made on the device.
    Returns its broker credentials (once) when the hub manages them (admin)."""
    settings, sessions, now, _remote = _parts(request)
    actor = getattr(request.state, "actor", _API_ACTOR)
    credentials = enrolment.preregister(sessions, BrokerAdmin.from_settings(settings), now, agent_id, body.public_key, actor)
    return {"agent_id": agent_id, "broker": _broker_answer(settings, credentials)}


@router.post(
    "/agents/{agent_id}/revoke",
    response_model=RevokeResponse,
    responses={404: {"model": ErrorResponse, "description": "No such agent."}, 502: {"model": ErrorResponse, "description": "Revoked at the hub, but the broker refused to remove the client: call again."}},
)
@requires(Role.ADMIN)
def revoke_agent(request: Request, agent_id: Annotated[str, Path(max_length=128)]) -> dict[str, Any]:
    """Revoke a device: its messages and API requests are refused from now
    on and its broker client is deleted, which disconnects it (admin)."""
    settings, sessions, now, remote = _parts(request)
    actor = getattr(request.state, "actor", _API_ACTOR)
    done = enrolment.revoke(sessions, BrokerAdmin.from_settings(settings), now, agent_id, actor, remote)
    return {"agent_id": done.agent_id, "revoked_at": done.revoked_at, "broker": done.broker}
