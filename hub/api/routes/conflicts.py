"""Conflict records: where a device's late report and a hub or operator
decision disagreed, the rule that settled it, both sides (docs/conflicts.md)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from hub import reconcile
from hub.api.deps import CurrentUser, PageParams, ReadSession
from hub.auth import scope
from hub.api.schemas import ErrorResponse, Page

router = APIRouter(tags=["conflicts"])


class ConflictOut(BaseModel):
    id: int
    dag_id: str
    run_pk: int
    run_id: str
    task_id: str
    map_index: int
    ti_id: int
    agent_id: str | None = Field(description="The device whose result is one side of the conflict.")
    rule: str = Field(description="operator_wins, device_success_wins or duplicate_success (docs/conflicts.md).")
    kept: dict[str, Any] = Field(description='The side that decided: a result ("type": "result"), a hub decision ("hub_decision") or an operator action ("operator_action").')
    overridden: dict[str, Any] = Field(description="The side that was overridden, same shape.")
    resolution: str = Field(description="What the rule did and why, in words.")
    created_at: Any


class ConflictPage(Page[ConflictOut]):
    counts: dict[str, int] = Field(description="Records per rule, over all records.")


@router.get("/conflicts", response_model=ConflictPage, responses={422: {"model": ErrorResponse, "description": "Unknown rule or bad filter."}})
def list_conflicts(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    dag_id: Annotated[str | None, Query(description="Only conflicts of this DAG.")] = None,
    run: Annotated[int | None, Query(description="Only conflicts of this run (its numeric id, run_pk).")] = None,
    task_id: Annotated[str | None, Query(description="Only conflicts of this task.")] = None,
    map_index: Annotated[int | None, Query(description="Only this map index of the task.")] = None,
    agent_id: Annotated[str | None, Query(description="Only conflicts involving this device's result.")] = None,
    rule: Annotated[str | None, Query(description="operator_wins, device_success_wins or duplicate_success.")] = None,
) -> dict[str, Any]:
    """Conflict records (of DAGs in the user's scope), newest first, with counts per rule."""
    return reconcile.list_conflicts(
        session, dag_id=dag_id, run_pk=run, task_id=task_id, map_index=map_index, agent_id=agent_id, rule=rule, limit=page.limit, offset=page.offset,
        dag_ids=scope.visible_dag_ids(session, who),
    )


@router.get("/runs/{run_pk}/tasks/{task_id}/conflicts", response_model=ConflictPage)
def list_task_conflicts(
    run_pk: int,
    task_id: str,
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    map_index: Annotated[int | None, Query(description="Only this map index (a fan-out or mapped instance).")] = None,
) -> dict[str, Any]:
    """The conflict records of one task instance (or of every instance of a mapped task), newest first."""
    scope.check_run(session, who, run_pk)
    return reconcile.list_conflicts(session, run_pk=run_pk, task_id=task_id, map_index=map_index, limit=page.limit, offset=page.offset)
