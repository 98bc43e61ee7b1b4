"""Backfills: runs for past data intervals of a DAG (Airflow 3's backfill API)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from hub import audit
from hub import backfill as backfills
from hub import events as ev
from hub.api.deps import By, CurrentUser, Events, HubClock, PageParams, ReadSession, Sessions
from hub.auth import scope
from hub.auth.roles import Actor, Principal
from hub.api.schemas import ErrorResponse, Page
from hub.db import transaction
from hub.backfill import BackfillNotFound
from hub.errors import DagNotFound
from shared.clock import utcnow

router = APIRouter(tags=["backfills"])
_404 = {404: {"model": ErrorResponse, "description": "No such backfill."}}
_409 = {409: {"model": ErrorResponse, "description": "The backfill is already complete."}}


class BackfillRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dag_id: str = Field(description="The DAG to backfill; it needs a cron or timedelta schedule.")
    from_date: datetime = Field(description="Earliest logical date (data interval start) to run; without an offset it is UTC.")
    to_date: datetime = Field(description="Latest logical date to run; not in the future.")
    run_backwards: bool = Field(default=False, description="Start the newest interval first.")
    dag_run_conf: dict[str, Any] = Field(default_factory=dict, description="Run configuration of every run the backfill creates.")
    reprocess_behavior: Literal["none", "failed", "completed"] = Field(
        default="none", description="Intervals that already have a run: none skips them, failed reruns failed ones, completed reruns all.")
    max_active_runs: int = Field(default=backfills.DEFAULT_MAX_ACTIVE_RUNS, ge=1, le=1000, description="How many of its runs may run at once.")


class SkippedInterval(BaseModel):
    logical_date: datetime
    reason: str = Field(description="already_running, already_exists or already_succeeded.")


class BackfillOut(BaseModel):
    id: int
    dag_id: str
    from_date: datetime
    to_date: datetime
    run_backwards: bool
    max_active_runs: int
    reprocess_behavior: str
    dag_run_conf: dict[str, Any]
    is_paused: bool
    created_at: datetime
    completed_at: datetime | None = Field(description="When no run of it was left queued or running, or when it was cancelled.")
    run_counts: dict[str, int] = Field(description="Its runs per state.")


class BackfillCreated(BackfillOut):
    skipped: list[SkippedInterval] = Field(description="Intervals in the range that got no run, with the reason.")


@router.post("/backfills", status_code=201, response_model=BackfillCreated, responses={404: {"model": ErrorResponse, "description": "No such DAG."}, 409: {"model": ErrorResponse, "description": "The DAG already has a backfill running."}})
def create_backfill(body: BackfillRequest, sessions: Sessions, events: Events, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Create a run for every data interval of the DAG's schedule whose logical date is in [from_date, to_date]."""
    with transaction(sessions) as session:
        scope.check_dag(session, who, body.dag_id)
        backfill, skipped = backfills.create_backfill(
            session, body.dag_id, body.from_date, body.to_date, utcnow(clock), max_active_runs=body.max_active_runs,
            reprocess_behavior=body.reprocess_behavior, run_backwards=body.run_backwards, dag_run_conf=body.dag_run_conf,
        )
        out = backfills.to_dict(backfill, backfills.run_counts(session, [backfill.id])[backfill.id], skipped)
        run_pks = backfills.run_pks(session, backfill.id)
        audit.record(session, by.actor, "backfill.create", f"backfill:{backfill.id}", at=utcnow(clock), remote=by.remote, via=by.via, dag_id=body.dag_id,
                     from_date=body.from_date.isoformat(), to_date=body.to_date.isoformat(), runs=len(run_pks))
    for run_pk in run_pks:
        events.emit(ev.RUN_TRIGGERED, dag_id=body.dag_id, run_pk=run_pk)
    return out


class PlannedInterval(BaseModel):
    logical_date: datetime
    data_interval_start: datetime
    data_interval_end: datetime


class DryRunOut(BaseModel):
    intervals: list[PlannedInterval] = Field(description="The runs the backfill would create, in the order it would start them.")
    skipped: list[SkippedInterval] = Field(description="Intervals in the range that would get no run, with the reason.")


@router.post("/backfills/dry_run", response_model=DryRunOut, responses={404: {"model": ErrorResponse, "description": "No such DAG."}})
def dry_run_backfill(body: BackfillRequest, session: ReadSession, clock: HubClock, who: CurrentUser) -> dict[str, Any]:
    """What POST /backfills would create and skip right now; creates nothing."""
    scope.check_dag(session, who, body.dag_id)
    todo, skipped = backfills.dry_run(
        session, body.dag_id, body.from_date, body.to_date, utcnow(clock), max_active_runs=body.max_active_runs,
        reprocess_behavior=body.reprocess_behavior, run_backwards=body.run_backwards, dag_run_conf=body.dag_run_conf,
    )
    return {
        "intervals": [{"logical_date": i.start, "data_interval_start": i.start, "data_interval_end": i.end} for i in todo],
        "skipped": [{"logical_date": s.logical_date, "reason": s.reason} for s in skipped],
    }


@router.get("/backfills", response_model=Page[BackfillOut])
def list_backfills(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    dag_id: Annotated[str | None, Query(description="Only backfills of this DAG.")] = None,
    active: Annotated[bool | None, Query(description="Only running (true) or complete (false) backfills.")] = None,
) -> dict[str, Any]:
    """Backfills, newest first (of the DAGs in the user's scope)."""
    return backfills.list_backfills(session, dag_id=dag_id, active=active, limit=page.limit, offset=page.offset, dag_ids=scope.visible_dag_ids(session, who))


@router.get("/backfills/{backfill_id}", response_model=BackfillOut, responses=_404)
def get_backfill(backfill_id: int, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One backfill with its runs per state (404 when its DAG is outside the user's scope)."""
    _check_backfill(session, who, backfill_id)
    return backfills.describe(session, backfill_id)


def _check_backfill(session: Any, who: Principal, backfill_id: int) -> None:
    try:
        scope.check_dag(session, who, backfills.get_backfill(session, backfill_id).dag_id)
    except DagNotFound:
        raise BackfillNotFound(f"backfill {backfill_id} not found; list backfills with 'outpost backfills list'") from None


def _change(sessions: Any, clock: Any, backfill_id: int, action: str, who: Principal, by: Actor) -> dict[str, Any]:
    # No event: the scheduler starts unpaused runs on its next pass.
    with transaction(sessions) as session:
        _check_backfill(session, who, backfill_id)
        audit.record(session, by.actor, f"backfill.{action}", f"backfill:{backfill_id}", at=utcnow(clock), remote=by.remote, via=by.via)
        if action == "cancel":
            backfills.cancel(session, backfill_id, utcnow(clock))
        else:
            backfills.set_paused(session, backfill_id, action == "pause")
        return backfills.describe(session, backfill_id)


@router.put("/backfills/{backfill_id}/pause", response_model=BackfillOut, responses={**_404, **_409})
def pause_backfill(backfill_id: int, sessions: Sessions, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Start no more runs of this backfill; running ones go on."""
    return _change(sessions, clock, backfill_id, "pause", who, by)


@router.put("/backfills/{backfill_id}/unpause", response_model=BackfillOut, responses={**_404, **_409})
def unpause_backfill(backfill_id: int, sessions: Sessions, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Start its queued runs again."""
    return _change(sessions, clock, backfill_id, "unpause", who, by)


@router.put("/backfills/{backfill_id}/cancel", response_model=BackfillOut, responses={**_404, **_409})
def cancel_backfill(backfill_id: int, sessions: Sessions, clock: HubClock, who: CurrentUser, by: By) -> dict[str, Any]:
    """Fail its runs that have not started (running ones finish) and complete it."""
    return _change(sessions, clock, backfill_id, "cancel", who, by)
