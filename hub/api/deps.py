"""Request dependencies: sessions, the hub's parts, paging.

``create_app`` stores the parts on ``app.state``; routes ask for them here
instead of reading globals, so one process can serve several apps (tests).
Authentication and roles will be dependencies here too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from hub.encryption import SecretCipher
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
