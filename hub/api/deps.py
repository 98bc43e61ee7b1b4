"""Request dependencies: sessions, the hub's parts, paging.

``create_app`` stores the parts on ``app.state``; routes ask for them here
instead of reading globals, so one process can serve several apps (tests).
``current_principal`` is who the request acts as (``hub.api.security``
authenticated it before the route ran).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from hub.encryption import SecretCipher
from hub.auth.roles import Actor, Principal
from hub.errors import Unauthorized
from hub.events import EventBus
from hub.secretvars import SecretsUnavailable
from shared.clock import Clock

#: Largest page any list returns.
MAX_LIMIT = 1000


def sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def read_session(request: Request) -> Iterator[Session]:
    """A session for reads; it is closed (its transaction rolled back)
    after the route returns. Writes go through ``hub.actions``."""
    with request.app.state.sessions() as session:
        yield session


def event_bus(request: Request) -> EventBus:
    return request.app.state.events


def clock(request: Request) -> Clock:
    return request.app.state.clock


def cipher(request: Request) -> SecretCipher:
    found = getattr(request.app.state, "cipher", None)
    if found is None:
        raise SecretsUnavailable("variables and connections are not available: the hub runs without fernet_keys")
    return found
def current_principal(request: Request) -> Principal:
    who = getattr(request.state, "principal", None)
    if who is None:  # only on public routes, which do not ask for it
        raise Unauthorized("authentication required")
    return who


def client_address(request: Request) -> str:
    return request.client.host if request.client else ""


def audit_actor(request: Request) -> Actor:
    """Who the audit log names for an action of this request."""
    return current_principal(request).actor(client_address(request))


@dataclass(frozen=True)
class Paging:
    limit: int
    offset: int


def paging(
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Page size, at most {MAX_LIMIT}.")] = 100,
    offset: Annotated[int, Query(ge=0, description="Items to skip.")] = 0,
) -> Paging:
    return Paging(limit, offset)


ReadSession = Annotated[Session, Depends(read_session)]
Sessions = Annotated[sessionmaker[Session], Depends(sessions)]
Events = Annotated[EventBus, Depends(event_bus)]
HubClock = Annotated[Clock, Depends(clock)]
PageParams = Annotated[Paging, Depends(paging)]
Cipher = Annotated[SecretCipher, Depends(cipher)]
CurrentUser = Annotated[Principal, Depends(current_principal)]
By = Annotated[Actor, Depends(audit_actor)]


async def read_bounded(request: Request, limit: int, refuse: Callable[[str | None], Exception]) -> bytes:
    """The request body, at most ``limit`` bytes, never buffered past it.
    Over the limit, raises ``refuse(declared)``: ``declared`` is the
    Content-Length that announced too much, None when the stream ran over."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise refuse(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise refuse(None)
        chunks.append(chunk)
    return b"".join(chunks)
