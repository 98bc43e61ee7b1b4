"""Assets and their events: what event-driven DAGs are scheduled on."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, or_, select

from hub import asset_events
from hub import events as ev
from hub.api.deps import CurrentUser, Events, HubClock, PageParams, ReadSession, Sessions
from hub.auth import scope
from hub.auth.roles import Principal
from hub.api.schemas import ErrorResponse, Page
from hub.db import transaction
from hub.errors import InvalidDag, InvalidRequest
from hub.models import Asset, AssetDagRunQueue, AssetEvent, Dag
from shared.clock import utcnow

router = APIRouter(tags=["assets"])
#: An external event's extra is metadata, not a payload.
MAX_EXTRA_BYTES = 16 * 1024


class AssetOut(BaseModel):
    id: int
    uri: str
    created_at: datetime
    event_count: int
    last_event_at: datetime | None
    consuming_dags: list[str] = Field(description="Active DAGs scheduled on this asset.")
    queued_for: list[str] = Field(description="DAGs that saw an update of it not yet consumed by a run.")


class AssetEventOut(BaseModel):
    id: int
    uri: str
    timestamp: datetime
    extra: dict[str, Any]
    source_dag_id: str | None
    source_run_id: str | None
    source_task_id: str | None
    source_map_index: int
    source_agent_id: str | None = Field(description="The device whose agent event or task produced it.")


class AssetEventRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    uri: str = Field(description="The asset updated, e.g. s3://bucket/key; created if new.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Metadata of the update (JSON object, at most 16 KiB).")


@router.get("/assets", response_model=Page[AssetOut])
def list_assets(
    session: ReadSession, page: PageParams, who: CurrentUser, uri_prefix: Annotated[str | None, Query(description="Only assets whose URI starts with this.")] = None,
) -> dict[str, Any]:
    """Assets by URI, with their events and the DAGs they schedule. A user
    limited to DAG tags sees the assets their DAGs produce or are scheduled
    on, and only the DAGs and events of their scope."""
    dags = scope.visible_dag_ids(session, who)
    seen = _event_scope(session, who)
    stmt = select(Asset)
    if dags is not None:
        stmt = stmt.where(Asset.id.in_(_visible_asset_ids(session, dags)))
    if uri_prefix:
        stmt = stmt.where(Asset.uri.startswith(uri_prefix, autoescape=True))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = list(session.scalars(stmt.order_by(Asset.uri).limit(page.limit).offset(page.offset)))
    ids = [a.id for a in rows]
    stats = {a: (n, last) for a, n, last in session.execute(
        select(AssetEvent.asset_id, func.count(), func.max(AssetEvent.timestamp)).where(AssetEvent.asset_id.in_(ids), *seen).group_by(AssetEvent.asset_id))} if ids else {}
    queued: dict[int, list[str]] = {}
    for asset_id, dag_id in session.execute(select(AssetDagRunQueue.asset_id, AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.asset_id.in_(ids)).order_by(AssetDagRunQueue.target_dag_id)) if ids else []:
        if dags is None or dag_id in dags:
            queued.setdefault(asset_id, []).append(dag_id)
    items = [{
        "id": a.id, "uri": a.uri, "created_at": a.created_at, "event_count": stats.get(a.id, (0, None))[0], "last_event_at": stats.get(a.id, (0, None))[1],
        "consuming_dags": [d for d in asset_events.consumers(session, a.uri) if dags is None or d in dags], "queued_for": queued.get(a.id, []),
    } for a in rows]
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/assets/events", response_model=Page[AssetEventOut])
def list_asset_events(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    uri: Annotated[str | None, Query(description="Only events of this asset.")] = None,
    source_dag_id: Annotated[str | None, Query(description="Only events produced by tasks of this DAG.")] = None,
    source_agent_id: Annotated[str | None, Query(description="Only events from this device.")] = None,
) -> dict[str, Any]:
    """Asset events, newest first. An event made by a DAG's task follows that
    DAG's scope, one sent by a device that device's group; an external one
    (POST /assets/events) is seen by whoever sees its asset."""
    dags = scope.visible_dag_ids(session, who)
    stmt = select(AssetEvent, Asset.uri).join(Asset, Asset.id == AssetEvent.asset_id).where(*_event_scope(session, who))
    if dags is not None:
        stmt = stmt.where(AssetEvent.asset_id.in_(_visible_asset_ids(session, dags)))
    if uri is not None:
        stmt = stmt.where(Asset.uri == uri)
    if source_dag_id is not None:
        stmt = stmt.where(AssetEvent.source_dag_id == source_dag_id)
    if source_agent_id is not None:
        stmt = stmt.where(AssetEvent.source_agent_id == source_agent_id)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.execute(stmt.order_by(AssetEvent.id.desc()).limit(page.limit).offset(page.offset)).all()
    return {"items": [asset_events.event_dict(e, u) for e, u in rows], "total": total, "limit": page.limit, "offset": page.offset}


def _visible_asset_ids(session: Any, dags: set[str]) -> set[int]:
    """Assets a DAG in ``dags`` produced (an event of its tasks) or is scheduled on."""
    ids = set(session.scalars(select(AssetEvent.asset_id).where(AssetEvent.source_dag_id.in_(dags)).distinct()))
    uris: set[str] = set()
    for (structure,) in session.execute(select(Dag.structure).where(Dag.dag_id.in_(dags))):
        timetable = (structure or {}).get("timetable") or {}
        if timetable.get("kind") == "assets":
            uris.update(timetable.get("uris") or [])
    if uris:
        ids.update(session.scalars(select(Asset.id).where(Asset.uri.in_(uris))))
    return ids


def _event_scope(session: Any, who: Principal) -> list[Any]:
    """Conditions on AssetEvent: events of DAGs and devices outside the scope are left out."""
    conditions: list[Any] = []
    dags = scope.visible_dag_ids(session, who)
    if dags is not None:
        conditions.append(or_(AssetEvent.source_dag_id.is_(None), AssetEvent.source_dag_id.in_(dags)))
    agents = scope.visible_agent_ids(session, who)
    if agents is not None:
        conditions.append(or_(AssetEvent.source_agent_id.is_(None), AssetEvent.source_agent_id.in_(agents)))
    return conditions


@router.post("/assets/events", status_code=201, response_model=AssetEventOut, responses={422: {"model": ErrorResponse, "description": "Invalid URI or extra."}})
def create_asset_event(body: AssetEventRequest, sessions: Sessions, clock: HubClock, events: Events) -> dict[str, Any]:
    """Record an update of an asset by an external producer; DAGs scheduled on it run when their condition holds."""
    if len(json.dumps(body.extra)) > MAX_EXTRA_BYTES:
        raise InvalidRequest(f"extra is larger than {MAX_EXTRA_BYTES} bytes; pass a reference to the data, not the data")
    try:
        with transaction(sessions) as session:
            event = asset_events.record_asset_event(session, body.uri, utcnow(clock), extra=body.extra)
            out = asset_events.event_dict(event, body.uri)
    except InvalidDag as exc:  # the URI rules are the DAG file's; here they are a bad request
        raise InvalidRequest(str(exc)) from None
    events.emit(ev.ASSET_UPDATED, uri=body.uri, event_id=out["id"])
    return out
