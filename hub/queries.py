"""Read models shared by the REST API and the dashboard.

Every function takes an open ``Session``, reads, and returns plain dicts
(datetimes stay aware ``datetime`` objects; callers format them). Nothing
here writes. Lists come back as a page: ``{"items", "total", "limit",
"offset"}``, newest first for runs, by id for everything named.

Names follow the API: a run's numeric primary key is ``id`` on the run and
``run_pk`` wherever another object refers to it; ``run_id`` is the
Airflow-style string (``manual__2026-01-01T00:00:00+00:00``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from hub import registry
from hub.errors import AgentNotFound, DagNotFound, InvalidRequest, NotFound, RunNotFound
from hub.masking import MASKER
from hub.models import Agent, Dag, DagImportError, DagRun, DagVersion, RejectedMessage, TaskInstance
from hub.registry import AgentFilter
from hub.targeting import Selector
from shared.signing import PublicKey

Page = dict[str, Any]


def list_dags(
    session: Session, *, is_paused: bool | None = None, is_active: bool | None = None, limit: int = 100, offset: int = 0, dag_ids: Collection[str] | None = None,
) -> Page:
    """DAGs by id; ``dag_ids`` (a user's scope) limits them."""
    stmt = select(Dag).order_by(Dag.dag_id)
    if dag_ids is not None:
        stmt = stmt.where(Dag.dag_id.in_(dag_ids))
    if is_paused is not None:
        stmt = stmt.where(Dag.is_paused.is_(is_paused))
    if is_active is not None:
        stmt = stmt.where(Dag.is_active.is_(is_active))
    dags, total = _page(session, stmt, limit, offset)
    last_runs = _last_runs(session, [d.dag_id for d in dags])
    items = [_dag_summary(d, last_runs.get(d.dag_id)) for d in dags]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def get_dag(session: Session, dag_id: str) -> dict[str, Any]:
    """One DAG with its serialized structure (tasks, upstreams, targets)."""
    dag = session.get(Dag, dag_id)
    if dag is None:
        raise DagNotFound(f"DAG {dag_id!r} not found; list DAGs with GET /api/v1/dags")
    latest = session.get(DagVersion, dag.latest_version_id) if dag.latest_version_id is not None else None
    return {
        **_dag_summary(dag, _last_runs(session, [dag_id]).get(dag_id)), "structure": dag.structure,
        "latest_version_number": latest.version_number if latest is not None else None,
    }


def list_dag_versions(session: Session, dag_id: str, *, limit: int = 100, offset: int = 0) -> Page:
    """A DAG's versions, newest first (each parse that changed its structure)."""
    dag = session.get(Dag, dag_id)
    if dag is None:
        raise DagNotFound(f"DAG {dag_id!r} not found; list DAGs with GET /api/v1/dags")
    stmt = select(DagVersion).where(DagVersion.dag_id == dag_id).order_by(DagVersion.version_number.desc())
    rows, total = _page(session, stmt, limit, offset)
    runs = dict(
        session.execute(select(DagRun.dag_version_id, func.count()).where(DagRun.dag_version_id.in_([v.id for v in rows])).group_by(DagRun.dag_version_id)).all()
    )
    items = [{**_version(v, dag.latest_version_id), "run_count": runs.get(v.id, 0)} for v in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def get_dag_version(session: Session, dag_id: str, version_number: int) -> dict[str, Any]:
    """One version of a DAG with the structure its runs follow."""
    dag = session.get(Dag, dag_id)
    if dag is None:
        raise DagNotFound(f"DAG {dag_id!r} not found; list DAGs with GET /api/v1/dags")
    version = session.scalar(select(DagVersion).where(DagVersion.dag_id == dag_id, DagVersion.version_number == version_number))
    if version is None:
        raise NotFound(f"DAG {dag_id!r} has no version {version_number}; list them with GET /api/v1/dags/{dag_id}/versions")
    runs = session.scalar(select(func.count()).select_from(DagRun).where(DagRun.dag_version_id == version.id)) or 0
    return {**_version(version, dag.latest_version_id), "run_count": runs, "structure": version.structure}


def list_import_errors(session: Session, *, limit: int = 100, offset: int = 0, filelocs: Collection[str] | None = None) -> Page:
    """DAG file import errors; ``filelocs`` (a user's scope) limits them to those files."""
    stmt = select(DagImportError).order_by(DagImportError.fileloc)
    if filelocs is not None:
        stmt = stmt.where(DagImportError.fileloc.in_(filelocs))
    rows, total = _page(session, stmt, limit, offset)
    items = [{"id": e.id, "fileloc": e.fileloc, "kind": e.kind, "error": e.error, "recorded_at": e.recorded_at} for e in rows]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def list_runs(
    session: Session, *, dag_id: str | None = None, state: str | None = None, limit: int = 100, offset: int = 0, dag_ids: Collection[str] | None = None,
) -> Page:
    """Runs, newest first. A ``dag_id`` that names no DAG is an error rather
    than an empty page, so a typo does not look like "no runs yet".
    ``dag_ids`` (a user's scope) limits them to those DAGs' runs."""
    stmt = select(DagRun).order_by(DagRun.id.desc())
    if dag_ids is not None:
        stmt = stmt.where(DagRun.dag_id.in_(dag_ids))
    if dag_id is not None:
        if session.get(Dag, dag_id) is None or (dag_ids is not None and dag_id not in dag_ids):
            raise InvalidRequest(f"unknown dag_id {dag_id!r}; list DAGs with GET /api/v1/dags")
        stmt = stmt.where(DagRun.dag_id == dag_id)
    if state is not None:
        stmt = stmt.where(DagRun.state == state)
    runs, total = _page(session, stmt, limit, offset)
    counts = _task_counts(session, [r.id for r in runs])
    numbers = _version_numbers(session, [r.dag_version_id for r in runs])
    items = [{**_run(r), "task_counts": counts.get(r.id, {}), "dag_version_number": numbers.get(r.dag_version_id)} for r in runs]
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def get_run(session: Session, run_pk: int) -> dict[str, Any]:
    """One run with all its task instances, upstream tasks first (the DAG's
    order), a fan-out's instances by map index."""
    run = _run_row(session, run_pk)
    tis = list(session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run_pk).order_by(TaskInstance.id)))
    # The order of the DAG version the run follows (runs from before versions: the DAG's).
    version = session.get(DagVersion, run.dag_version_id) if run.dag_version_id is not None else None
    structure = version.structure if version is not None else session.scalar(select(Dag.structure).where(Dag.dag_id == run.dag_id)) or {}
    position = {t["task_id"]: i for i, t in enumerate(structure.get("tasks", []))}
    tis.sort(key=lambda t: (position.get(t.task_id, len(position)), t.task_id, t.map_index))
    counts = _task_counts(session, [run_pk]).get(run_pk, {})
    number = version.version_number if version is not None else None
    return {**_run(run), "task_counts": counts, "dag_version_number": number, "task_instances": [_task_instance(t) for t in tis]}


def list_task_instances(session: Session, run_pk: int, *, limit: int = 100, offset: int = 0) -> Page:
    _run_row(session, run_pk)
    stmt = select(TaskInstance).where(TaskInstance.run_pk == run_pk).order_by(TaskInstance.id)
    tis, total = _page(session, stmt, limit, offset)
    return {"items": [_task_instance(t) for t in tis], "total": total, "limit": limit, "offset": offset}


def list_agents(
    session: Session, *, state: str | None = None, labels: dict[str, str] | None = None, limit: int = 100, offset: int = 0,
    agent_ids: Collection[str] | None = None, where: AgentFilter | None = None,
) -> Page:
    """Agents by id that ``where`` selects (the device registry's filter), in
    ``state`` and with all of ``labels`` (string equality); ``agent_ids``
    (a user's scope) limits them."""
    flt = where or AgentFilter()
    if state is not None or labels:
        online = flt.online if state is None else state == "online"
        if flt.online is not None and online != flt.online:
            return {"items": [], "total": 0, "limit": limit, "offset": offset}
        flt = AgentFilter(Selector({**flt.selector.labels, **(labels or {})}, flt.selector.groups, flt.selector.hardware, flt.selector.firmware), online, flt.job_type, flt.text)
    agents, total = registry.find(session, flt, agent_ids=agent_ids, limit=limit, offset=offset)
    return {"items": [_agent(a) for a in agents], "total": total, "limit": limit, "offset": offset}


def get_agent(session: Session, agent_id: str, *, recent: int = 20, dag_ids: Collection[str] | None = None) -> dict[str, Any]:
    """One agent with its ``recent`` latest task instances (of ``dag_ids`` only, if given)."""
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise AgentNotFound(f"agent {agent_id!r} not found; list agents with GET /api/v1/agents")
    stmt = select(TaskInstance).where(TaskInstance.agent_id == agent_id).order_by(TaskInstance.id.desc()).limit(recent)
    if dag_ids is not None:
        stmt = stmt.where(TaskInstance.dag_id.in_(dag_ids))
    tis = [{"dag_id": t.dag_id, "run_pk": t.run_pk, "run_id": t.run_id, **_task_instance(t)} for t in session.scalars(stmt)]
    return {**_agent(agent), "last_heartbeat": agent.last_heartbeat, "inventory": agent.inventory or {}, "recent_task_instances": tis}


def list_rejected(
    session: Session, *, code: str | None = None, agent_id: str | None = None, limit: int = 100, offset: int = 0, agent_ids: Collection[str] | None = None,
) -> Page:
    """Rejected wire messages, newest first, plus ``counts``: the number
    of rejections per code over all of them (filters do not apply).
    ``agent_ids`` (a user's scope) limits both to messages from those agents."""
    visible = [RejectedMessage.agent_id.in_(agent_ids)] if agent_ids is not None else []
    stmt = select(RejectedMessage).where(*visible).order_by(RejectedMessage.id.desc())
    if code is not None:
        stmt = stmt.where(RejectedMessage.code == code)
    if agent_id is not None:
        stmt = stmt.where(RejectedMessage.agent_id == agent_id)
    rows, total = _page(session, stmt, limit, offset)
    items = [
        {"id": r.id, "source": r.source, "code": r.code, "topic": r.topic, "agent_id": r.agent_id, "detail": r.detail, "excerpt": r.excerpt, "received_at": r.received_at}
        for r in rows
    ]
    counts = dict(session.execute(select(RejectedMessage.code, func.count()).where(*visible).group_by(RejectedMessage.code).order_by(RejectedMessage.code)).all())
    return {"items": items, "total": total, "limit": limit, "offset": offset, "counts": counts}


# --- rows to dicts ------------------------------------------------------------


def _dag_summary(dag: Dag, last_run: DagRun | None) -> dict[str, Any]:
    return {
        "dag_id": dag.dag_id,
        "description": dag.description,
        "fileloc": dag.fileloc,
        "schedule": dag.schedule,
        "tags": list(dag.tags or []),
        "is_paused": dag.is_paused,
        "is_active": dag.is_active,
        "task_count": len((dag.structure or {}).get("tasks", [])),
        "last_run": None if last_run is None else {"id": last_run.id, "run_id": last_run.run_id, "state": last_run.state, "logical_date": last_run.logical_date},
        "next_run_at": dag.next_run_at,
        "next_data_interval_start": dag.next_data_interval_start,
        "next_data_interval_end": dag.next_data_interval_end,
        "last_parsed_at": dag.last_parsed_at,
    }


def _version(version: DagVersion, latest_id: int | None) -> dict[str, Any]:
    return {
        "id": version.id,
        "dag_id": version.dag_id,
        "version_number": version.version_number,
        "structure_hash": version.structure_hash,
        "fileloc": version.fileloc,
        "created_at": version.created_at,
        "task_count": len((version.structure or {}).get("tasks", [])),
        "is_latest": version.id == latest_id,
    }


def _version_numbers(session: Session, version_ids: list[int | None]) -> dict[int | None, int]:
    wanted = {v for v in version_ids if v is not None}
    if not wanted:
        return {}
    return dict(session.execute(select(DagVersion.id, DagVersion.version_number).where(DagVersion.id.in_(wanted))).all())  # type: ignore[arg-type]


def _run(run: DagRun) -> dict[str, Any]:
    return {
        "id": run.id,
        "dag_id": run.dag_id,
        "run_id": run.run_id,
        "run_type": run.run_type,
        "state": run.state,
        "logical_date": run.logical_date,
        "conf": MASKER.redact(run.conf),
        "created_at": run.created_at,
        "started_at": run.started_at,
        "ended_at": run.ended_at,
        "data_interval_start": run.data_interval_start,
        "data_interval_end": run.data_interval_end,
        "backfill_id": run.backfill_id,
        "triggered_by": run.triggered_by,
    }


def _task_instance(ti: TaskInstance) -> dict[str, Any]:
    return {
        "id": ti.id,
        "task_id": ti.task_id,
        "map_index": ti.map_index,
        "state": ti.state,
        "try_number": ti.try_number,
        "max_tries": ti.max_tries,
        "kind": ti.kind,
        "job_type": ti.job_type,
        "agent_id": ti.agent_id,
        # What humans see: secrets masked (hub.masking); tasks read the stored values.
        "output": MASKER.redact(ti.output),
        "error": MASKER.redact(ti.error),
        "rendered_fields": MASKER.redact(ti.rendered_fields),
        "queued_at": ti.queued_at,
        "started_at": ti.started_at,
        "ended_at": ti.ended_at,
        "progress": ti.progress,
        "progress_message": ti.progress_message,
    }


def _agent(agent: Agent) -> dict[str, Any]:
    inventory = agent.inventory or {}
    return {
        "agent_id": agent.agent_id,
        "hostname": agent.hostname,
        "version": agent.agent_version,
        "state": agent.state,
        "labels": agent.labels,
        "job_types": agent.job_types,
        "first_seen": agent.first_seen,
        "last_seen": agent.last_seen,
        "clock_skew": agent.clock_skew,
        "clock_skew_flagged_at": agent.clock_skew_flagged_at,
        "clock_trusted": agent.clock_skew_flagged_at is None,
        "key_id": PublicKey.from_text(agent.public_key).kid if agent.public_key else None,
        "registered_at": agent.registered_at,
        "revoked_at": agent.revoked_at,
        "groups": list(agent.groups or []),
        "hardware_model": agent.hardware_model or "",
        "firmware_version": agent.firmware_version or "",
        **{key: _count(inventory.get(key)) for key in ("disk_free_bytes", "mem_free_bytes", "mem_total_bytes")},
    }


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


# --- helpers ------------------------------------------------------------------


def _page(session: Session, stmt: Select[Any], limit: int, offset: int) -> tuple[list[Any], int]:
    total = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    rows = list(session.scalars(stmt.limit(limit).offset(offset)))
    return rows, total


def _run_row(session: Session, run_pk: int) -> DagRun:
    run = session.get(DagRun, run_pk)
    if run is None:
        raise RunNotFound(f"run {run_pk} not found; list runs with GET /api/v1/runs")
    return run


def _last_runs(session: Session, dag_ids: list[str]) -> dict[str, DagRun]:
    if not dag_ids:
        return {}
    newest = select(func.max(DagRun.id)).where(DagRun.dag_id.in_(dag_ids)).group_by(DagRun.dag_id)
    return {run.dag_id: run for run in session.scalars(select(DagRun).where(DagRun.id.in_(newest)))}


def _task_counts(session: Session, run_pks: list[int]) -> dict[int, dict[str, int]]:
    """Task instances per state, per run."""
    counts: dict[int, dict[str, int]] = {}
    if not run_pks:
        return counts
    stmt = (
        select(TaskInstance.run_pk, TaskInstance.state, func.count())
        .where(TaskInstance.run_pk.in_(run_pks))
        .group_by(TaskInstance.run_pk, TaskInstance.state)
        .order_by(TaskInstance.run_pk, TaskInstance.state)
    )
    for run_pk, state, n in session.execute(stmt):
        counts.setdefault(run_pk, {})[state] = n
    return counts
