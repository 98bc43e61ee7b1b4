"""Runs and their task instances."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from hub import queries, tasklogs
from hub.api.deps import CurrentUser, PageParams, ReadSession
from hub.auth import scope
from hub.api.schemas import ErrorResponse, Page, RunDetail, RunSummary, TaskInstanceOut, TaskLogOut, TaskLogsOut
from shared.states import RunState

router = APIRouter(tags=["runs"])
_404 = {404: {"model": ErrorResponse, "description": "No such run."}}


@router.get("/runs", response_model=Page[RunSummary], responses={422: {"model": ErrorResponse, "description": "Unknown dag_id or bad filter."}})
def list_runs(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    dag_id: Annotated[str | None, Query(description="Only runs of this DAG (it must exist).")] = None,
    state: Annotated[RunState | None, Query(description="Only runs in this state.")] = None,
) -> dict[str, Any]:
    """Runs of every DAG (in the user's scope), newest first."""
    return queries.list_runs(session, dag_id=dag_id, state=state, limit=page.limit, offset=page.offset, dag_ids=scope.visible_dag_ids(session, who))


@router.get("/runs/{run_pk}", response_model=RunDetail, responses=_404)
def get_run(run_pk: int, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One run with every task instance (fan-out instances have map_index >= 0)."""
    scope.check_run(session, who, run_pk)
    return queries.get_run(session, run_pk)


@router.get("/runs/{run_pk}/tasks", response_model=Page[TaskInstanceOut], responses=_404)
def list_run_tasks(run_pk: int, session: ReadSession, page: PageParams, who: CurrentUser) -> dict[str, Any]:
    """The task instances of one run, paginated (large fan-outs)."""
    scope.check_run(session, who, run_pk)
    return queries.list_task_instances(session, run_pk, limit=page.limit, offset=page.offset)


@router.get(
    "/runs/{run_pk}/tasks/{ti_id}/logs", response_model=TaskLogsOut,
    responses={404: {"model": ErrorResponse, "description": "No such run or task instance."}},
)
def list_task_logs(run_pk: int, ti_id: int, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """Which tries of a device task have a stored log (chunks, bytes, complete, when they arrived)."""
    scope.check_run(session, who, run_pk)
    return tasklogs.list_logs(session, run_pk, ti_id)


@router.get(
    "/runs/{run_pk}/tasks/{ti_id}/tries/{try_number}/log", response_model=TaskLogOut,
    responses={404: {"model": ErrorResponse, "description": "No such run, task instance or try."}},
)
def get_task_try_log(run_pk: int, ti_id: int, try_number: int, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """What one try of a device task logged (ctx.log lines, stdout, stderr), as shipped by the agent."""
    scope.check_run(session, who, run_pk)
    return tasklogs.read_log(session, run_pk, ti_id, try_number)
