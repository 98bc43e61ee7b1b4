"""Pools: list, show, create, change, delete; and recorded deadline misses."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from hub import actions, pools
from hub.api.deps import PageParams, ReadSession, Sessions
from hub.api.schemas import ErrorResponse, Page

router = APIRouter(tags=["pools"])
_404 = {404: {"model": ErrorResponse, "description": "No such pool."}}


class PoolOut(BaseModel):
    name: str
    slots: int = Field(description="Slots of the pool; -1 is unlimited.")
    description: str
    queued_slots: int = Field(description="Slots held by queued task instances.")
    running_slots: int = Field(description="Slots held by running task instances (delivered to or running on agents too).")
    scheduled_slots: int = Field(description="Slots wanted by task instances whose dependencies are met, waiting for room.")
    open_slots: int | None = Field(description="Slots free now; null for an unlimited pool.")


class PoolCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="Letters, digits, '_', '.', '-' (max 256).")
    slots: int = Field(ge=-1, description="How many slots; -1 is unlimited.")
    description: str = ""


class PoolPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    slots: int | None = Field(None, ge=-1, description="New number of slots; -1 is unlimited.")
    description: str | None = None


class DeadlineMissOut(BaseModel):
    id: int
    dag_id: str
    run_pk: int
    run_id: str
    task_id: str | None = Field(description="The task that missed its SLA; null for a run's dagrun_timeout.")
    kind: str = Field(description="task_sla or dagrun_timeout.")
    deadline: Any = Field(description="When it was due.")
    detected_at: Any
    description: str
    notified_at: Any | None = Field(description="When the event and the DAG's callback request went out.")


def _default_slots(request: Request) -> int:
    return int(getattr(request.app.state.settings, "default_pool_slots", 128))


@router.get("/pools", response_model=Page[PoolOut])
def list_pools(request: Request, session: ReadSession, page: PageParams) -> dict[str, Any]:
    """Pools by name with the slots in use; ``default_pool`` is always there."""
    return pools.list_pools(session, _default_slots(request), limit=page.limit, offset=page.offset)


@router.get("/pools/{name}", response_model=PoolOut, responses=_404)
def get_pool(name: str, request: Request, session: ReadSession) -> dict[str, Any]:
    """One pool with the slots in use."""
    return pools.get_pool(session, name, _default_slots(request))


@router.post("/pools", status_code=201, response_model=PoolOut, responses={409: {"model": ErrorResponse, "description": "The pool exists."}})
def create_pool(body: PoolCreate, request: Request, sessions: Sessions, session: ReadSession) -> dict[str, Any]:
    """Create a pool."""
    actions.set_pool(sessions, body.name, body.slots, body.description, create_only=True)
    return pools.get_pool(session, body.name, _default_slots(request))


@router.patch("/pools/{name}", response_model=PoolOut, responses=_404)
def patch_pool(name: str, body: PoolPatch, request: Request, sessions: Sessions, session: ReadSession) -> dict[str, Any]:
    """Change a pool's slots or description (``default_pool`` too)."""
    current = pools.get_pool(session, name, _default_slots(request))
    session.rollback()  # read again after the write, not from this snapshot
    actions.set_pool(sessions, name, current["slots"] if body.slots is None else body.slots, body.description)
    return pools.get_pool(session, name, _default_slots(request))


@router.delete("/pools/{name}", status_code=204, responses={**_404, 409: {"model": ErrorResponse, "description": "Task instances hold slots of it."}})
def delete_pool(name: str, sessions: Sessions) -> Response:
    """Delete a pool; not ``default_pool``, and not while task instances hold its slots."""
    actions.delete_pool(sessions, name)
    return Response(status_code=204)


@router.get("/deadline-misses", response_model=Page[DeadlineMissOut])
def list_deadline_misses(
    session: ReadSession,
    page: PageParams,
    dag_id: Annotated[str | None, Query(description="Only misses of this DAG.")] = None,
    run_pk: Annotated[int | None, Query(description="Only misses of this run.")] = None,
    kind: Annotated[str | None, Query(description="task_sla or dagrun_timeout.")] = None,
) -> dict[str, Any]:
    """SLA misses and run timeouts, newest first."""
    return pools.list_deadline_misses(session, dag_id=dag_id, run_pk=run_pk, kind=kind, limit=page.limit, offset=page.offset)
