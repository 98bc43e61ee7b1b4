"""Roles, what they rank, and the principal a request acts as."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from hub.errors import InvalidRequest


class Role(StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"


#: Each role can do everything the roles below it can.
_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}
ROLES = tuple(r.value for r in Role)

#: The attribute ``requires`` puts on a route's endpoint; ``hub.api.security`` reads it.
ROLE_ATTRIBUTE = "__outpost_role__"

F = TypeVar("F", bound=Callable[..., Any])


def parse_role(text: str) -> Role:
    try:
        return Role(text)
    except ValueError:
        raise InvalidRequest(f"unknown role {text!r}; one of {', '.join(ROLES)}") from None


def at_least(have: str, need: str) -> bool:
    return _RANK[Role(have)] >= _RANK[Role(need)]


def lowest(a: str, b: str) -> Role:
    return Role(a) if _RANK[Role(a)] <= _RANK[Role(b)] else Role(b)


def requires(role: Role) -> Callable[[F], F]:
    """Mark a route's endpoint as needing ``role`` instead of the default
    (viewer for GET/HEAD, operator for other methods). Put it under the
    ``@router.get(...)`` line, so the route is registered with the mark::

        @router.get("/users")
        @requires(Role.ADMIN)
        def list_users(...): ...
    """

    def mark(endpoint: F) -> F:
        setattr(endpoint, ROLE_ATTRIBUTE, role)
        return endpoint

    return mark


@dataclass(frozen=True)
class Actor:
    """Who an action is recorded as in the audit log."""

    #: ``user:<name>`` (hub.audit's form).
    actor: str
    #: Client address, for actions made over HTTP.
    remote: str = ""
    #: How they authenticated: ``token:<id>`` or ``session``.
    via: str = ""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the user, the effective role (a token's role
    capped by the user's current one) and the user's scope."""

    user_id: int
    name: str
    role: Role
    #: DAG tags the user is limited to; None: every DAG.
    scope_tags: frozenset[str] | None = None
    #: Device groups (agent label ``group``) the user is limited to; None: every agent.
    scope_groups: frozenset[str] | None = None
    #: "token" or "session".
    via: str = "token"
    token_id: int | None = None
    #: The raw session id (only for sessions; the CSRF value is derived from it).
    session_secret: str | None = None

    def can(self, need: str) -> bool:
        return at_least(self.role, need)

    def actor(self, remote: str = "") -> Actor:
        return Actor(f"user:{self.name}", remote, f"token:{self.token_id}" if self.via == "token" else self.via)

    @property
    def scoped(self) -> bool:
        return self.scope_tags is not None or self.scope_groups is not None
