"""Operator actions on a run: clear task instances, mark them, rerun the run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from fastapi import APIRouter

from hub import actions, queries
from hub.api.deps import By, CurrentUser, Events, HubClock, ReadSession, Sessions
from hub.auth import scope
from hub.api.schemas import ErrorResponse, RunDetail

router = APIRouter(tags=["runs"])
_ERRORS = {404: {"model": ErrorResponse, "description": "No such run."}}


class ClearRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task_ids: list[str] | None = Field(None, description="Tasks to clear; null clears every task of the run.")
    map_indexes: list[int] | None = Field(None, description="Only these map indexes of the named tasks (fan-out or mapped instances).")
    include_downstream: bool = Field(False, description="Also clear every task downstream of the named ones.")
    include_upstream: bool = Field(False, description="Also clear every task upstream of the named ones.")
    only_failed: bool = Field(False, description="Only instances in state failed or upstream_failed.")
    dry_run: bool = Field(False, description="Answer what would be cleared; change nothing.")


class RerunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    only_failed: bool = Field(False, description="Only rerun failed and upstream_failed instances.")


class MarkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    task_ids: list[str] = Field(min_length=1, description="Tasks to mark.")
    state: Literal["success", "failed", "skipped"]
    map_indexes: list[int] | None = Field(None, description="Only these map indexes of the named tasks.")
    include_downstream: bool = False
    include_upstream: bool = False


class RunPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    state: Literal["success", "failed"] = Field(description="Mark the whole run: success (its unfinished instances succeed) or failed (running ones fail, the rest are skipped).")


class AffectedTaskInstance(BaseModel):
    id: int
    task_id: str
    map_index: int
    state: str = Field(description="Its state before the action.")
    try_number: int


class ActionResult(BaseModel):
    affected: list[AffectedTaskInstance] = Field(description="The task instances the action changed (or would change, dry_run).")
    run: RunDetail


@router.post("/runs/{run_pk}/clear", response_model=ActionResult, responses=_ERRORS)
def clear_task_instances(run_pk: int, body: ClearRequest, sessions: Sessions, session: ReadSession, events: Events, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Clear task instances so they run again with a new try number (their
    history stays); open work on agents is cancelled and the run runs again."""
    scope.check_run(session, who, run_pk)
    affected = actions.clear(
        sessions, events, clock, run_pk, task_ids=body.task_ids, map_indexes=body.map_indexes, include_downstream=body.include_downstream,
        include_upstream=body.include_upstream, only_failed=body.only_failed, dry_run=body.dry_run, by=by,
    )
    return {"affected": affected, "run": queries.get_run(session, run_pk)}


@router.post("/runs/{run_pk}/rerun", response_model=ActionResult, responses=_ERRORS)
def rerun(run_pk: int, sessions: Sessions, session: ReadSession, events: Events, clock: HubClock, who: CurrentUser, by: By, body: RerunRequest | None = None) -> dict[str, Any]:
    """Run the whole run again (every task instance cleared; the body may be omitted)."""
    scope.check_run(session, who, run_pk)
    affected = actions.clear(sessions, events, clock, run_pk, only_failed=(body or RerunRequest()).only_failed, by=by)
    return {"affected": affected, "run": queries.get_run(session, run_pk)}


@router.patch("/runs/{run_pk}", response_model=ActionResult, responses=_ERRORS)
def mark_run(run_pk: int, body: RunPatch, sessions: Sessions, session: ReadSession, events: Events, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Mark a whole run success or failed (Airflow's "mark DAG run as ...")."""
    scope.check_run(session, who, run_pk)
    affected = actions.set_run_state(sessions, events, clock, run_pk, body.state, by=by)
    return {"affected": affected, "run": queries.get_run(session, run_pk)}


@router.post("/runs/{run_pk}/mark", response_model=ActionResult, responses=_ERRORS)
def mark_task_instances(run_pk: int, body: MarkRequest, sessions: Sessions, session: ReadSession, events: Events, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Set task instances to success, failed or skipped without running them."""
    scope.check_run(session, who, run_pk)
    affected = actions.mark(
        sessions, events, clock, run_pk, body.state, task_ids=body.task_ids, map_indexes=body.map_indexes,
        include_downstream=body.include_downstream, include_upstream=body.include_upstream, by=by,
    )
    return {"affected": affected, "run": queries.get_run(session, run_pk)}
