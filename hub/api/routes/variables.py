"""Variables: the named values DAGs read. Write-only: no answer carries a value."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hub import vault
from hub.api.deps import Cipher, HubClock, PageParams, ReadSession, Sessions
from hub.api.schemas import ErrorResponse, Page
from hub.auth.roles import Role, requires
from shared.clock import utcnow

router = APIRouter(tags=["variables"])
_404 = {404: {"model": ErrorResponse, "description": "No such variable."}}
_503 = {503: {"model": ErrorResponse, "description": "The hub has no fernet_keys (secrets_unavailable)."}}
_422 = {422: {"model": ErrorResponse, "description": "Bad key or value too large."}}


class VariableOut(BaseModel):
    key: str
    description: str
    is_set: bool = Field(description="A value is stored (values are never returned).")
    sensitive: bool = Field(description="The key looks secret (password, token, key...): its value is masked as *** in logs and API output.")
    created_at: datetime
    updated_at: datetime


class VariableCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(description="Letters, digits, '_', '.', '-' (max 250).")
    value: str = Field(description="The value, stored encrypted; JSON text if DAGs read it with var.json.")
    description: str = ""


class VariableSet(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    value: str = Field(description="The new value, stored encrypted.")
    description: str | None = Field(None, description="New description; omitted keeps the current one.")


def actor(request: Request) -> str:
    """Who acts, for the audit log (the auth layer sets ``request.state.actor``)."""
    return str(getattr(request.state, "actor", None) or "api")


@router.get("/variables", response_model=Page[VariableOut])
def list_variables(session: ReadSession, page: PageParams) -> dict[str, Any]:
    """Variables by key, without their values."""
    return vault.list_variables(session, limit=page.limit, offset=page.offset)


@router.get("/variables/{key}", response_model=VariableOut, responses=_404)
def get_variable(key: str, session: ReadSession) -> dict[str, Any]:
    """One variable, without its value."""
    return vault.variable_view(vault.get_variable(session, key))


@router.post("/variables", status_code=201, response_model=VariableOut, responses={**_422, **_503, 409: {"model": ErrorResponse, "description": "The variable exists."}})
@requires(Role.ADMIN)
def create_variable(body: VariableCreate, request: Request, sessions: Sessions, session: ReadSession, cipher: Cipher, clock: HubClock) -> dict[str, Any]:
    """Create a variable; its value is encrypted before it is stored."""
    vault.set_variable(sessions, cipher, body.key, body.value, utcnow(clock), description=body.description, create_only=True, actor=actor(request))
    return vault.variable_view(vault.get_variable(session, body.key))


@router.put("/variables/{key}", response_model=VariableOut, responses={**_422, **_503})
@requires(Role.ADMIN)
def set_variable(key: str, body: VariableSet, request: Request, sessions: Sessions, session: ReadSession, cipher: Cipher, clock: HubClock) -> dict[str, Any]:
    """Create or replace a variable's value (and description, when given)."""
    vault.set_variable(sessions, cipher, key, body.value, utcnow(clock), description=body.description, actor=actor(request))
    return vault.variable_view(vault.get_variable(session, key))


@router.delete("/variables/{key}", status_code=204, responses=_404)
@requires(Role.ADMIN)
def delete_variable(key: str, request: Request, sessions: Sessions, clock: HubClock) -> Response:
    """Delete a variable."""
    vault.delete_variable(sessions, key, utcnow(clock), actor=actor(request))
    return Response(status_code=204)
