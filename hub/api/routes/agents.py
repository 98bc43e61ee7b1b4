"""Agents (edge devices) and the wire messages the hub rejected."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select

from hub import audit, fleet, queries
from hub.api.deps import By, CurrentUser, HubClock, PageParams, ReadSession, Sessions
from hub.auth import scope
from hub.api.schemas import AgentDetail, AgentSummary, ErrorResponse, GroupsIn, Page, RejectedPage
from hub.db import for_update, transaction
from hub.errors import AgentNotFound, InvalidRequest
from hub.models import Agent
from hub.registry import AgentFilter
from shared.clock import to_datetime

router = APIRouter(tags=["agents"])


@router.get("/agents", response_model=Page[AgentSummary])
def list_agents(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    state: Annotated[Literal["online", "offline"] | None, Query(description="Only online or offline agents.")] = None,
    label: Annotated[list[str] | None, Query(description="key=value; repeat to require several labels.")] = None,
    group: Annotated[list[str] | None, Query(description="Only agents in this group; repeat for any of several.")] = None,
    hardware: Annotated[list[str] | None, Query(description="Only this hardware model; repeat for any of several.")] = None,
    firmware: Annotated[str | None, Query(description="Only firmware versions in this range, e.g. >=1.2,<2.0 (clauses ==, !=, >=, <=, >, <; all must hold).")] = None,
    online: Annotated[bool | None, Query(description="true: only online agents; false: only offline ones.")] = None,
    job_type: Annotated[str | None, Query(description="Only agents that advertise this job type.")] = None,
    q: Annotated[str | None, Query(description="Substring of the agent id or hostname (case-insensitive).")] = None,
) -> dict[str, Any]:
    """Agents by id (those in the user's device groups), filtered by the device registry's fields; a page at a time
    (``limit``, ``offset``; ``total`` counts every match). Labels, groups, hardware and firmware select as a rollout's selector does."""
    where = AgentFilter.parse(labels=label or [], groups=group or [], hardware=hardware or [], firmware=firmware, online=online, job_type=job_type, text=q)
    return queries.list_agents(session, state=state, limit=page.limit, offset=page.offset, agent_ids=scope.visible_agent_ids(session, who), where=where)


@router.get("/agents/{agent_id}", response_model=AgentDetail, responses={404: {"model": ErrorResponse, "description": "No such agent."}})
def get_agent(agent_id: str, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One agent: labels, job types, last heartbeat, recent task instances (of DAGs in the user's scope)."""
    scope.check_agent(session, who, agent_id)
    return queries.get_agent(session, agent_id, dag_ids=scope.visible_dag_ids(session, who))


@router.put(
    "/agents/{agent_id}/groups", response_model=AgentDetail,
    responses={404: {"model": ErrorResponse, "description": "No such agent."}, 422: {"model": ErrorResponse, "description": "Bad group names (invalid_request)."}},
)
def set_groups(agent_id: str, body: GroupsIn, sessions: Sessions, session: ReadSession, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Replace the agent's fleet groups (operator or admin; audited as ``agent.groups``). Groups are the hub's:
    devices never set them. Rollouts and the registry filter select by them."""
    scope.check_agent(session, who, agent_id)
    now = to_datetime(clock.now())
    with transaction(sessions) as s:
        agent = s.scalar(for_update(select(Agent).where(Agent.agent_id == agent_id), s))
        if agent is None:
            raise AgentNotFound(f"agent {agent_id!r} not found; list agents with GET /api/v1/agents")
        try:
            before, after = fleet.set_groups(agent, body.groups)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        audit.record(s, by.actor, "agent.groups", agent_id, at=now, remote=by.remote, **({"via": by.via} if by.via else {}), before=before, after=after)
    session.expire_all()
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

