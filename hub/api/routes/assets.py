"""Assets and their events: what event-driven DAGs are scheduled on."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from hub import asset_events
from hub import events as ev
from hub.api.deps import Events, HubClock, PageParams, ReadSession, Sessions
from hub.api.schemas import ErrorResponse, Page
from hub.db import transaction
from hub.errors import InvalidDag, InvalidRequest
from hub.models import Asset, AssetDagRunQueue, AssetEvent
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
def list_assets(session: ReadSession, page: PageParams, uri_prefix: Annotated[str | None, Query(description="Only assets whose URI starts with this.")] = None) -> dict[str, Any]:
    """Assets by URI, with their events and the DAGs they schedule."""
    stmt = select(Asset)
    if uri_prefix:
        stmt = stmt.where(Asset.uri.startswith(uri_prefix, autoescape=True))
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = list(session.scalars(stmt.order_by(Asset.uri).limit(page.limit).offset(page.offset)))
    ids = [a.id for a in rows]
    stats = {a: (n, last) for a, n, last in session.execute(
        select(AssetEvent.asset_id, func.count(), func.max(AssetEvent.timestamp)).where(AssetEvent.asset_id.in_(ids)).group_by(AssetEvent.asset_id))} if ids else {}
    queued: dict[int, list[str]] = {}
    for asset_id, dag_id in session.execute(select(AssetDagRunQueue.asset_id, AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.asset_id.in_(ids)).order_by(AssetDagRunQueue.target_dag_id)) if ids else []:
        queued.setdefault(asset_id, []).append(dag_id)
    items = [{
        "id": a.id, "uri": a.uri, "created_at": a.created_at, "event_count": stats.get(a.id, (0, None))[0], "last_event_at": stats.get(a.id, (0, None))[1],
        "consuming_dags": asset_events.consumers(session, a.uri), "queued_for": queued.get(a.id, []),
    } for a in rows]
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/assets/events", response_model=Page[AssetEventOut])
def list_asset_events(
    session: ReadSession,
    page: PageParams,
    uri: Annotated[str | None, Query(description="Only events of this asset.")] = None,
    source_dag_id: Annotated[str | None, Query(description="Only events produced by tasks of this DAG.")] = None,
    source_agent_id: Annotated[str | None, Query(description="Only events from this device.")] = None,
) -> dict[str, Any]:
    """Asset events, newest first."""
    stmt = select(AssetEvent, Asset.uri).join(Asset, Asset.id == AssetEvent.asset_id)
    if uri is not None:
        stmt = stmt.where(Asset.uri == uri)
    if source_dag_id is not None:
        stmt = stmt.where(AssetEvent.source_dag_id == source_dag_id)
    if source_agent_id is not None:
        stmt = stmt.where(AssetEvent.source_agent_id == source_agent_id)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.execute(stmt.order_by(AssetEvent.id.desc()).limit(page.limit).offset(page.offset)).all()
    return {"items": [asset_events.event_dict(e, u) for e, u in rows], "total": total, "limit": page.limit, "offset": page.offset}


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
