"""DAGs: list, show, pause, trigger, their runs; DAG file import errors."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from hub import actions, queries
from hub.api.deps import By, CurrentUser, Events, HubClock, PageParams, ReadSession, Sessions
from hub.auth import scope
from hub.api.schemas import DagDetail, DagPatch, DagSummary, DagVersionDetail, DagVersionOut, ErrorResponse, ImportErrorOut, Page, RunDetail, RunSummary, TriggerRequest
from shared.states import RunState

router = APIRouter(tags=["dags"])
_404 = {404: {"model": ErrorResponse, "description": "No such DAG."}}


@router.get("/dags", response_model=Page[DagSummary])
def list_dags(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    is_paused: Annotated[bool | None, Query(description="Only paused (true) or unpaused (false) DAGs.")] = None,
    is_active: Annotated[bool | None, Query(description="Only DAGs still in (true) or gone from (false) the DAG folder.")] = None,
) -> dict[str, Any]:
    """DAGs by id, with their last run and next scheduled run (those in the user's scope)."""
    return queries.list_dags(session, is_paused=is_paused, is_active=is_active, limit=page.limit, offset=page.offset, dag_ids=scope.visible_dag_ids(session, who))


@router.get("/dags/{dag_id}", response_model=DagDetail, responses=_404)
def get_dag(dag_id: str, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One DAG with its structure: tasks, upstream task ids, targets."""
    scope.check_dag(session, who, dag_id)
    return queries.get_dag(session, dag_id)


@router.patch("/dags/{dag_id}", response_model=DagDetail, responses=_404)
def patch_dag(dag_id: str, body: DagPatch, sessions: Sessions, session: ReadSession, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Pause or unpause a DAG."""
    scope.check_dag(session, who, dag_id)
    actions.set_paused(sessions, dag_id, body.is_paused, by=by, clock=clock)
    return queries.get_dag(session, dag_id)


@router.post("/dags/{dag_id}/runs", status_code=201, response_model=RunDetail, responses=_404)
def trigger_dag(
    dag_id: str, sessions: Sessions, session: ReadSession, events: Events, clock: HubClock, who: CurrentUser, by: By, body: TriggerRequest | None = None,
) -> dict[str, Any]:
    """Trigger a manual run; the body may be omitted (``conf`` = {})."""
    scope.check_dag(session, who, dag_id)
    run_pk = actions.trigger(sessions, events, clock, dag_id, (body or TriggerRequest()).conf, by=by)
    return queries.get_run(session, run_pk)


@router.get("/dags/{dag_id}/runs", response_model=Page[RunSummary], responses=_404)
def list_dag_runs(
    dag_id: str, session: ReadSession, page: PageParams, who: CurrentUser, state: Annotated[RunState | None, Query(description="Only runs in this state.")] = None,
) -> dict[str, Any]:
    """Runs of one DAG, newest first."""
    scope.check_dag(session, who, dag_id)
    queries.get_dag(session, dag_id)  # 404 rather than an empty page
    return queries.list_runs(session, dag_id=dag_id, state=state, limit=page.limit, offset=page.offset)


@router.get("/dags/{dag_id}/versions", response_model=Page[DagVersionOut], responses=_404)
def list_dag_versions(dag_id: str, session: ReadSession, page: PageParams, who: CurrentUser) -> dict[str, Any]:
    """A DAG's versions, newest first: one per parse that changed its structure."""
    scope.check_dag(session, who, dag_id)
    return queries.list_dag_versions(session, dag_id, limit=page.limit, offset=page.offset)


@router.get("/dags/{dag_id}/versions/{version_number}", response_model=DagVersionDetail, responses={404: {"model": ErrorResponse, "description": "No such DAG or version."}})
def get_dag_version(dag_id: str, version_number: int, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One version of a DAG with the structure its runs follow."""
    scope.check_dag(session, who, dag_id)
    return queries.get_dag_version(session, dag_id, version_number)


@router.get("/import-errors", response_model=Page[ImportErrorOut])
def list_import_errors(session: ReadSession, page: PageParams, who: CurrentUser) -> dict[str, Any]:
    """DAG files the hub could not load, with the reason."""
    return queries.list_import_errors(session, limit=page.limit, offset=page.offset, filelocs=scope.visible_filelocs(session, who))
