"""Asset events in the metadata DB: recording them, and the runs they trigger.

An asset is updated when a task that lists it in ``outlets`` succeeds (hub
or agent task), when a device reports an agent event (``agent-event://NAME``)
or when an external producer posts one to the API. Each update is an
``AssetEvent`` row, and every active DAG scheduled on that asset gets an
``AssetDagRunQueue`` row (asset, DAG): "this DAG has seen an update of this
asset that no run of it consumed yet". The scheduler
(:func:`asset_triggered_runs`) runs a DAG once its condition holds over the
assets queued for it (all of them for a plain list, Airflow's rule), then
clears the DAG's queue. The run's ``triggered_by`` lists the events it
consumes: every event of its assets since its previous asset-triggered run.

Recording happens in the caller's transaction, so an event exists exactly
when the success (or the device's report) that caused it was committed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from hub import assets as asset_api
from hub.errors import InvalidDag
from hub.models import Asset, AssetDagRunQueue, AssetEvent, Dag, DagRun

log = logging.getLogger(__name__)

ASSET_TRIGGERED = "asset_triggered"


def get_or_create_asset(session: Session, uri: str, now: datetime) -> Asset:
    asset = session.scalar(select(Asset).where(Asset.uri == uri))
    if asset is None:
        # Its own savepoint: another process may create the same asset meanwhile.
        asset = Asset(uri=uri, extra={}, created_at=now)
        session.add(asset)
        session.flush()
    return asset


#: (database, dag_id) -> ((last_parsed_at, latest_version_id), asset URIs the DAG is scheduled on).
_uris_cache: dict[tuple[str, str], tuple[Any, frozenset[str]]] = {}
_uris_lock = threading.Lock()


def consumers(session: Session, uri: str) -> list[str]:
    """Active DAGs whose asset schedule includes ``uri``. Each DAG's
    structure is read once per parse, not on every event (a device may send
    hundreds in a batch)."""
    db = str(session.get_bind().engine.url)
    rows = session.execute(select(Dag.dag_id, Dag.last_parsed_at, Dag.latest_version_id).where(Dag.is_active.is_(True), Dag.schedule.is_not(None))).all()
    with _uris_lock:
        stale = [r.dag_id for r in rows if _uris_cache.get((db, r.dag_id), (None,))[0] != (r.last_parsed_at, r.latest_version_id)]
    if stale:
        for dag_id, parsed, version, structure in session.execute(
            select(Dag.dag_id, Dag.last_parsed_at, Dag.latest_version_id, Dag.structure).where(Dag.dag_id.in_(stale))
        ):
            timetable = (structure or {}).get("timetable") or {}
            uris = frozenset(timetable.get("uris") or []) if timetable.get("kind") == "assets" else frozenset()
            with _uris_lock:
                _uris_cache[(db, dag_id)] = ((parsed, version), uris)
    with _uris_lock:
        return sorted(r.dag_id for r in rows if uri in _uris_cache.get((db, r.dag_id), (None, frozenset()))[1])


def record_asset_event(
    session: Session,
    uri: str,
    now: datetime,
    *,
    extra: dict[str, Any] | None = None,
    source_dag_id: str | None = None,
    source_run_id: str | None = None,
    source_task_id: str | None = None,
    source_map_index: int = -1,
    source_agent_id: str | None = None,
    source_event_id: str | None = None,
) -> AssetEvent:
    """Record an update of ``uri`` and queue it for every DAG scheduled on
    it, in the caller's transaction. Raises ``InvalidDag`` for a bad URI."""
    asset_api.check_uri(uri)
    asset = get_or_create_asset(session, uri, now)
    event = AssetEvent(
        asset_id=asset.id, source_dag_id=source_dag_id, source_run_id=source_run_id, source_task_id=source_task_id,
        source_map_index=source_map_index, source_agent_id=source_agent_id, source_event_id=source_event_id, extra=dict(extra or {}), timestamp=now,
    )
    session.add(event)
    queued = {dag_id for (dag_id,) in session.execute(select(AssetDagRunQueue.target_dag_id).where(AssetDagRunQueue.asset_id == asset.id))}
    for dag_id in consumers(session, uri):
        if dag_id not in queued:
            session.add(AssetDagRunQueue(asset_id=asset.id, target_dag_id=dag_id, created_at=now))
    session.flush()
    return event


def record_outlets(session: Session, ti: Any, uris: list[str], now: datetime, extra: dict[str, Any] | None = None) -> list[AssetEvent]:
    """The asset events of a task instance that succeeded with ``outlets``."""
    events: list[AssetEvent] = []
    for uri in uris:
        try:
            events.append(record_asset_event(
                session, uri, now, extra=extra, source_dag_id=ti.dag_id, source_run_id=ti.run_id, source_task_id=ti.task_id,
                source_map_index=ti.map_index, source_agent_id=getattr(ti, "agent_id", None),
            ))
        except InvalidDag as exc:  # a structure from an older parse: the task's success stands
            log.warning("task %s: outlet %r not recorded: %s", ti.key, uri, exc)
    return events


@dataclass(frozen=True)
class AssetTrigger:
    """A DAG whose asset condition holds: the events its run consumes."""

    dag_id: str
    event_ids: list[int]
    first: datetime
    last: datetime


def due_asset_triggers(session: Session) -> list[AssetTrigger]:
    """DAGs whose asset condition holds over their queued assets. Each
    comes with the events of its assets newer than those its previous
    asset-triggered run consumed."""
    queued: dict[str, set[int]] = {}
    for asset_id, dag_id in session.execute(select(AssetDagRunQueue.asset_id, AssetDagRunQueue.target_dag_id)):
        queued.setdefault(dag_id, set()).add(asset_id)
    if not queued:
        return []
    uris = dict(session.execute(select(Asset.id, Asset.uri).where(Asset.id.in_({a for ids in queued.values() for a in ids}))).all())
    due: list[AssetTrigger] = []
    for dag in session.scalars(select(Dag).where(Dag.dag_id.in_(queued)).order_by(Dag.dag_id)):
        timetable = (dag.structure or {}).get("timetable") or {}
        if not dag.is_active or dag.is_paused or timetable.get("kind") != "assets":
            continue
        try:
            condition = asset_api.from_dict(timetable["condition"])
        except (InvalidDag, KeyError, TypeError):
            log.warning("DAG %s: unreadable asset schedule %r", dag.dag_id, timetable)
            continue
        if not condition.evaluate({uris[a] for a in queued[dag.dag_id] if a in uris}):
            continue
        own = list(session.scalars(select(Asset.id).where(Asset.uri.in_(set(condition.iter_uris())))))
        stmt = select(AssetEvent.id, AssetEvent.timestamp).where(AssetEvent.asset_id.in_(own)).order_by(AssetEvent.id)
        after = _last_consumed_event(session, dag.dag_id)
        if after is not None:
            stmt = stmt.where(AssetEvent.id > after)
        else:
            # Its first run consumes what happened since it started listening.
            since = session.scalar(select(func.min(AssetDagRunQueue.created_at)).where(AssetDagRunQueue.target_dag_id == dag.dag_id))
            stmt = stmt.where(AssetEvent.timestamp >= since)
        events = session.execute(stmt).all()
        if not events:
            continue
        due.append(AssetTrigger(dag.dag_id, [e.id for e in events], min(e.timestamp for e in events), max(e.timestamp for e in events)))
    return due


def consumed(session: Session, dag_id: str) -> None:
    """The DAG's run for its queued assets was created: its queue starts over."""
    session.execute(delete(AssetDagRunQueue).where(AssetDagRunQueue.target_dag_id == dag_id))


def _last_consumed_event(session: Session, dag_id: str) -> int | None:
    last = session.scalar(
        select(DagRun.triggered_by).where(DagRun.dag_id == dag_id, DagRun.run_type == ASSET_TRIGGERED).order_by(DagRun.id.desc()).limit(1)
    )
    ids = (last or {}).get("asset_event_ids") or []
    return max(ids) if ids else None


def triggering_asset_events(session: Session, run: DagRun) -> dict[str, list[dict[str, Any]]]:
    """Airflow's ``triggering_asset_events`` for a run: the events that
    triggered it, by asset URI, oldest first."""
    ids = ((run.triggered_by or {}).get("asset_event_ids")) or []
    if not ids:
        return {}
    out: dict[str, list[dict[str, Any]]] = {}
    rows = session.execute(select(AssetEvent, Asset.uri).join(Asset, Asset.id == AssetEvent.asset_id).where(AssetEvent.id.in_(ids)).order_by(AssetEvent.id))
    for event, uri in rows:
        out.setdefault(uri, []).append(event_dict(event, uri))
    return out


def event_dict(event: AssetEvent, uri: str) -> dict[str, Any]:
    return {
        "id": event.id, "uri": uri, "timestamp": event.timestamp, "extra": dict(event.extra or {}),
        "source_dag_id": event.source_dag_id, "source_run_id": event.source_run_id, "source_task_id": event.source_task_id,
        "source_map_index": event.source_map_index, "source_agent_id": event.source_agent_id,
    }


def agent_event_key(agent_id: str, event_id: str) -> str:
    """``AssetEvent.source_event_id`` of a device's event: unique per device."""
    return f"{agent_id}/{event_id}"
