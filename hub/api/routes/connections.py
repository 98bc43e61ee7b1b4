"""Connections: where and how tasks reach other systems. Write-only: the
password is never returned (``***`` when set), nor extra values with
secret-looking names."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hub import vault
from hub.api.deps import Cipher, HubClock, PageParams, ReadSession, Sessions
from hub.api.routes.variables import actor
from hub.api.schemas import ErrorResponse, Page
from hub.auth.roles import Role, requires
from shared.clock import utcnow

router = APIRouter(tags=["connections"])
_404 = {404: {"model": ErrorResponse, "description": "No such connection."}}
_503 = {503: {"model": ErrorResponse, "description": "The hub has no fernet_keys (secrets_unavailable)."}}
_422 = {422: {"model": ErrorResponse, "description": "Bad id or field."}}


class ConnectionOut(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    conn_id: str
    conn_type: str
    description: str
    host: str | None
    login: str | None
    port: int | None
    schema_: str | None = Field(alias="schema")
    password: str | None = Field(description='"***" when a password is stored, else null; never the password.')
    extra: dict[str, Any] | None = Field(description="The extra JSON object, values with secret-looking names (or holding known secrets) as ***.")
    created_at: datetime
    updated_at: datetime


class _ConnectionFields(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    conn_type: str | None = Field(None, max_length=100, description="http, postgres, mqtt, ... (free text).")
    description: str | None = None
    host: str | None = Field(None, max_length=500)
    login: str | None = Field(None, max_length=500)
    port: int | None = Field(None, ge=1, le=65535)
    schema_: str | None = Field(None, alias="schema", max_length=500)
    password: str | None = Field(None, description="Stored encrypted; null or empty clears it.")
    extra: dict[str, Any] | None = Field(None, description="A JSON object, stored encrypted.")

    def given(self) -> dict[str, Any]:
        """The fields the request named (a PATCH changes only those)."""
        names = {"schema" if n == "schema_" else n for n in self.model_fields_set}
        values = self.model_dump(by_alias=True)
        return {n: values[n] for n in names if n != "conn_id"}


class ConnectionCreate(_ConnectionFields):
    conn_id: str = Field(description="Letters, digits, '_', '.', '-' (max 250).")


class ConnectionPatch(_ConnectionFields):
    pass


@router.get("/connections", response_model=Page[ConnectionOut])
def list_connections(request: Request, session: ReadSession, page: PageParams) -> dict[str, Any]:
    """Connections by id, without passwords."""
    return vault.list_connections(session, request.app.state.cipher, limit=page.limit, offset=page.offset)


@router.get("/connections/{conn_id}", response_model=ConnectionOut, responses=_404)
def get_connection(conn_id: str, request: Request, session: ReadSession) -> dict[str, Any]:
    """One connection, without its password."""
    return vault.connection_view(vault.get_connection(session, conn_id), request.app.state.cipher)


@router.post("/connections", status_code=201, response_model=ConnectionOut, responses={**_422, **_503, 409: {"model": ErrorResponse, "description": "The connection exists."}})
@requires(Role.ADMIN)
def create_connection(body: ConnectionCreate, request: Request, sessions: Sessions, session: ReadSession, cipher: Cipher, clock: HubClock) -> dict[str, Any]:
    """Create a connection; password and extra are encrypted before they are stored."""
    vault.save_connection(sessions, cipher, body.conn_id, body.given(), utcnow(clock), create=True, actor=actor(request))
    return vault.connection_view(vault.get_connection(session, body.conn_id), cipher)


@router.patch("/connections/{conn_id}", response_model=ConnectionOut, responses={**_404, **_422, **_503})
@requires(Role.ADMIN)
def patch_connection(conn_id: str, body: ConnectionPatch, request: Request, sessions: Sessions, session: ReadSession, cipher: Cipher, clock: HubClock) -> dict[str, Any]:
    """Change the fields given; the others stay (a password is kept unless given)."""
    vault.save_connection(sessions, cipher, conn_id, body.given(), utcnow(clock), create=False, actor=actor(request))
    return vault.connection_view(vault.get_connection(session, conn_id), cipher)


@router.delete("/connections/{conn_id}", status_code=204, responses=_404)
@requires(Role.ADMIN)
def delete_connection(conn_id: str, request: Request, sessions: Sessions, clock: HubClock) -> Response:
    """Delete a connection."""
    vault.delete_connection(sessions, conn_id, utcnow(clock), actor=actor(request))
    return Response(status_code=204)
