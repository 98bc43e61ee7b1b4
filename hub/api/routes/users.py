"""Users and API tokens (admin only), and ``whoami`` (anyone logged in)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hub import audit
from hub.api.deps import CurrentUser, HubClock, ReadSession, Sessions, client_address
from hub.api.schemas import ErrorResponse
from hub.auth import login, tokens, users
from hub.auth.ratelimit import LoginLimits
from hub.auth.roles import Role, requires
from hub.db import transaction
from shared.clock import utcnow

router = APIRouter(tags=["users"])
_404 = {404: {"model": ErrorResponse, "description": "No such user or token."}}


class UserOut(BaseModel):
    name: str
    role: str = Field(description="admin, operator or viewer.")
    scope_tags: list[str] | None = Field(description="DAG tags the user is limited to; null: every DAG.")
    scope_groups: list[str] | None = Field(description="Device groups (agent label 'group') the user is limited to; null: every agent.")
    created_at: datetime
    disabled: bool
    disabled_at: datetime | None
    password_changed_at: datetime


class UserList(BaseModel):
    items: list[UserOut]


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    password: str = Field(description=f"At least {users.MIN_PASSWORD_LENGTH} characters.")
    role: str = Field("viewer", description="admin, operator or viewer.")
    scope_tags: list[str] | None = None
    scope_groups: list[str] | None = None


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: str | None = None
    password: str | None = None
    disabled: bool | None = None
    scope_tags: list[str] | None = Field(None, description="Replaces the DAG tag scope; [] lifts it.")
    scope_groups: list[str] | None = Field(None, description="Replaces the device group scope; [] lifts it.")


class TokenOut(BaseModel):
    id: int
    user: str
    name: str
    prefix: str = Field(description="The token's first characters, to recognise it.")
    role: str = Field(description="The most the token may do; the user's current role caps it.")
    state: str = Field(description="active, expired or revoked.")
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenList(BaseModel):
    items: list[TokenOut]


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    user: str
    name: str
    role: str | None = Field(None, description="At most the user's role; default the user's role.")
    expires_in_days: float | None = Field(90, gt=0, description="Days until it expires; null: never.")


class TokenCreated(TokenOut):
    token: str = Field(description="The secret. Shown only in this answer: store it now.")


class WhoAmI(BaseModel):
    name: str
    role: str
    via: str = Field(description="token or session.")
    scope_tags: list[str] | None
    scope_groups: list[str] | None


@router.get("/whoami", response_model=WhoAmI)
def whoami(who: CurrentUser) -> dict[str, Any]:
    """Who the credentials act as (any role)."""
    return {
        "name": who.name, "role": who.role.value, "via": who.via,
        "scope_tags": sorted(who.scope_tags) if who.scope_tags is not None else None,
        "scope_groups": sorted(who.scope_groups) if who.scope_groups is not None else None,
    }


class PasswordChange(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    current_password: str = Field(max_length=1000, description="The password the user has now.")
    new_password: str = Field(max_length=1000, description=f"At least {users.MIN_PASSWORD_LENGTH} characters.")


@router.post(
    "/whoami/password",
    status_code=204,
    responses={
        422: {"model": ErrorResponse, "description": "The current password is wrong (code wrong_password; counted as a failed login), or the new one is too short (invalid_request)."},
        429: {"model": ErrorResponse, "description": "Too many failed logins or password checks for this user or address; see Retry-After."},
    },
)
@requires(Role.VIEWER)
def change_own_password(body: PasswordChange, who: CurrentUser, clock: HubClock, request: Request) -> Response:
    """Change your own password (any role). A wrong current password counts
    as a failed login (same limits, 429 past them). Your other dashboard
    sessions end; the session asking (if any) and API tokens stay."""
    s = request.app.state.settings
    limits = LoginLimits(s.login_max_failures, s.login_max_failures_per_address, s.login_failure_window)
    login.change_password(
        request.app.state.sessions, who.name, body.current_password, body.new_password, client_address(request), utcnow(clock), limits,
        keep_session=who.session_secret,
    )
    return Response(status_code=204)


@router.get("/users", response_model=UserList)
@requires(Role.ADMIN)
def list_users(session: ReadSession) -> dict[str, Any]:
    return {"items": [users.user_dict(u) for u in users.list_users(session)]}


@router.get("/users/{name}", response_model=UserOut, responses=_404)
@requires(Role.ADMIN)
def get_user(session: ReadSession, name: str) -> dict[str, Any]:
    return users.user_dict(users.get_user(session, name))


@router.post("/users", status_code=201, response_model=UserOut, responses={409: {"model": ErrorResponse, "description": "The name is taken."}})
@requires(Role.ADMIN)
def create_user(body: UserCreate, sessions: Sessions, clock: HubClock, who: CurrentUser, request: Request) -> dict[str, Any]:
    now = utcnow(clock)
    with transaction(sessions) as session:
        user = users.create_user(session, body.name, body.password, body.role, now, scope_tags=body.scope_tags, scope_groups=body.scope_groups)
        audit.record(session, f"user:{who.name}", "user.create", user.name, at=now, remote=client_address(request), role=user.role,
                     scope_tags=user.scope_tags, scope_groups=user.scope_groups)
        return users.user_dict(user)


@router.patch("/users/{name}", response_model=UserOut, responses=_404)
@requires(Role.ADMIN)
def patch_user(name: str, body: UserPatch, sessions: Sessions, clock: HubClock, who: CurrentUser, request: Request) -> dict[str, Any]:
    """Change a user's role, password, scope, or disable/enable them. A new
    password or disabling ends the user's dashboard sessions."""
    now = utcnow(clock)
    given = body.model_dump(exclude_unset=True)
    with transaction(sessions) as session:
        user = users.get_user(session, name)
        remote = client_address(request)
        actor = f"user:{who.name}"
        if body.role is not None and body.role != user.role:
            before = user.role
            users.set_role(session, user, body.role)
            audit.record(session, actor, "user.set_role", name, at=now, remote=remote, before=before, after=user.role)
        if "scope_tags" in given or "scope_groups" in given:
            tags = given.get("scope_tags", user.scope_tags)
            groups = given.get("scope_groups", user.scope_groups)
            users.set_scope(session, user, tags=tags or None, groups=groups or None)
            audit.record(session, actor, "user.set_scope", name, at=now, remote=remote, scope_tags=user.scope_tags, scope_groups=user.scope_groups)
        if body.password is not None:
            users.set_password(session, user, body.password, now)
            audit.record(session, actor, "user.set_password", name, at=now, remote=remote)
        if body.disabled is not None and body.disabled != (user.disabled_at is not None):
            users.set_disabled(session, user, body.disabled, now)
            audit.record(session, actor, "user.disable" if body.disabled else "user.enable", name, at=now, remote=remote)
        return users.user_dict(user)


@router.get("/tokens", response_model=TokenList, responses=_404)
@requires(Role.ADMIN)
def list_tokens(session: ReadSession, clock: HubClock, user: str | None = None) -> dict[str, Any]:
    """API tokens, newest first (never their secrets); ``user`` filters."""
    user_id = users.get_user(session, user).id if user else None
    now = utcnow(clock)
    return {"items": [tokens.token_dict(t, n, now) for t, n in tokens.list_tokens(session, user_id)]}


@router.post("/tokens", status_code=201, response_model=TokenCreated, responses=_404)
@requires(Role.ADMIN)
def create_token(body: TokenCreate, sessions: Sessions, clock: HubClock, who: CurrentUser, request: Request) -> dict[str, Any]:
    """A new API token for a user; its secret is in this answer only."""
    now = utcnow(clock)
    expires = now + timedelta(days=body.expires_in_days) if body.expires_in_days is not None else None
    with transaction(sessions) as session:
        user = users.get_user(session, body.user)
        secret, row = tokens.create_token(session, user, body.name, now, role=body.role, expires_at=expires)
        audit.record(session, f"user:{who.name}", "token.create", f"token:{row.id}", at=now, remote=client_address(request), user=user.name,
                     name=row.name, role=row.role, expires_at=expires.isoformat() if expires else None)
        return {**tokens.token_dict(row, user.name, now), "token": secret}


@router.delete("/tokens/{token_id}", status_code=204, responses=_404)
@requires(Role.ADMIN)
def revoke_token(token_id: int, sessions: Sessions, clock: HubClock, who: CurrentUser, request: Request) -> Response:
    now = utcnow(clock)
    with transaction(sessions) as session:
        tokens.revoke(session, token_id, now)
        audit.record(session, f"user:{who.name}", "token.revoke", f"token:{token_id}", at=now, remote=client_address(request))
    return Response(status_code=204)
