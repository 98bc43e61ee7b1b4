"""Agents (edge devices) and the wire messages the hub rejected."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query

from hub import queries
from hub.api.deps import CurrentUser, PageParams, ReadSession
from hub.auth import scope
from hub.api.schemas import AgentDetail, AgentSummary, ErrorResponse, Page, RejectedPage
from hub.errors import InvalidRequest

router = APIRouter(tags=["agents"])


@router.get("/agents", response_model=Page[AgentSummary])
def list_agents(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    state: Annotated[Literal["online", "offline"] | None, Query(description="Only online or offline agents.")] = None,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to require several labels.")] = None,
) -> dict[str, Any]:
    """Agents by id (those in the user's device groups)."""
    return queries.list_agents(session, state=state, labels=_labels(label or []), limit=page.limit, offset=page.offset, agent_ids=scope.visible_agent_ids(session, who))


@router.get("/agents/{agent_id}", response_model=AgentDetail, responses={404: {"model": ErrorResponse, "description": "No such agent."}})
def get_agent(agent_id: str, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One agent: labels, job types, last heartbeat, recent task instances (of DAGs in the user's scope)."""
    scope.check_agent(session, who, agent_id)
    return queries.get_agent(session, agent_id, dag_ids=scope.visible_dag_ids(session, who))


@router.get("/rejected", response_model=RejectedPage)
def list_rejected(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    code: Annotated[str | None, Query(description="Only rejections with this code.")] = None,
    agent_id: Annotated[str | None, Query(description="Only rejections attributed to this agent.")] = None,
) -> dict[str, Any]:
    """Messages from the wire the hub refused (bad signature, bad envelope, ...), newest first, with counts per code
    (a user limited to device groups sees only those of agents in their groups)."""
    return queries.list_rejected(session, code=code, agent_id=agent_id, limit=page.limit, offset=page.offset, agent_ids=scope.visible_agent_ids(session, who))


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"label filter {pair!r} is not key=value, e.g. label=site=berlin")
        labels[key] = value
    return labels
