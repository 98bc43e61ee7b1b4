"""Staged rollouts of fleet tasks (docs/fleet.md, "Rollouts"): list, detail,
devices, and pause / resume / abort (operator role, audited)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from hub import rollout_queries, rollouts
from hub.api.deps import By, CurrentUser, Events, HubClock, PageParams, ReadSession, Sessions
from hub.api.schemas import ErrorResponse, Page
from hub.auth import scope
from hub.errors import DagNotFound

router = APIRouter(tags=["rollouts"])
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such rollout (or not in your scope)."}}
RolloutState = Literal["running", "paused", "aborted", "failed", "completed"]
DeviceState = Literal["pending", "notified", "succeeded", "failed", "timed_out", "skipped"]


class RolloutOut(BaseModel):
    id: int
    dag_id: str
    run_pk: int
    run_id: str
    task_id: str
    job_type: str
    state: str = Field(description="running, paused, aborted, failed or completed.")
    phase: str = Field(description="canary, batches, finishing (aborted or failed, in-flight devices finish) or done.")
    batch: int = Field(description="The batch being filled or awaited; 0 is the canary when there is one.")
    batch_target: int = Field(description="How many devices the current batch takes.")
    total: int = Field(description="Devices the selector took when the rollout started.")
    counts: dict[str, int] = Field(description="Devices per state: pending, notified, succeeded, failed, timed_out, skipped.")
    failure_rate: float = Field(description="failed / (succeeded + failed).")
    failure_threshold: float = Field(description="The rollout aborts when failure_rate exceeds it.")
    success_threshold: float = Field(description="Fraction of a batch that must succeed before the next starts.")
    started_at: str
    deadline: str | None
    updated_at: str
    finished_at: str | None = Field(description="When every device was done.")
    reason: str | None = Field(description="Why it paused, aborted or failed.")
    actor: str = Field(description="Who made the last manual change (hub: automatic).")


class RolloutDetail(RolloutOut):
    policy: dict[str, Any] = Field(description="The Rollout(...) policy, as started.")
    selector: dict[str, Any] = Field(description="The target's selector: labels, groups, hardware, firmware.")
    seed: int | None = Field(description="The shuffle seed, when the device order is shuffled.")
    batches: list[dict[str, Any]] = Field(description="Per batch notified so far, its devices per state.")


class DeviceOut(BaseModel):
    agent_id: str
    state: str
    batch: int | None = Field(description="The batch it was notified in; null while pending.")
    seq: int = Field(description="Its place in the rollout order (the task instance's map index).")
    groups: list[str]
    ti_id: int
    run_pk: int
    map_index: int
    ti_state: str
    try_number: int
    error: str | None = Field(description="Error code of its last try, or why the rollout gave it up (rollout_aborted, rollout_timed_out, ...).")
    error_message: str | None
    notified_at: str | None
    finished_at: str | None


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reason: str = Field("", max_length=500, description="Why (kept in the rollout and the audit log).")


@router.get("/rollouts", response_model=Page[RolloutOut], responses={422: {"model": ErrorResponse, "description": "Unknown state."}})
def list_rollouts(
    session: ReadSession, page: PageParams, who: CurrentUser,
    state: Annotated[RolloutState | None, Query(description="Only rollouts in this state.")] = None,
    dag_id: Annotated[str | None, Query(description="Only rollouts of this DAG.")] = None,
) -> dict[str, Any]:
    """Rollouts (of DAGs in the user's scope), newest first."""
    return rollout_queries.list_rollouts(session, state=state, dag_id=dag_id, limit=page.limit, offset=page.offset, dag_ids=scope.visible_dag_ids(session, who))


def _checked(session: Any, who: Any, rollout_id: int) -> None:
    record = rollout_queries.get_record(session, rollout_id)
    try:
        scope.check_dag(session, who, record.dag_id)
    except DagNotFound:
        raise rollouts.RolloutNotFound(f"no rollout {rollout_id}; list rollouts with GET /api/v1/rollouts") from None


@router.get("/rollouts/{rollout_id}", response_model=RolloutDetail, responses=_NOT_FOUND)
def get_rollout(rollout_id: int, session: ReadSession, who: CurrentUser) -> dict[str, Any]:
    """One rollout: phase, batch, devices per state, failure rate against the threshold."""
    _checked(session, who, rollout_id)
    return rollout_queries.get_rollout(session, rollout_id)


@router.get("/rollouts/{rollout_id}/devices", response_model=Page[DeviceOut], responses=_NOT_FOUND)
def list_devices(
    rollout_id: int, session: ReadSession, page: PageParams, who: CurrentUser,
    state: Annotated[DeviceState | None, Query(description="Only devices in this state.")] = None,
) -> dict[str, Any]:
    """The rollout's devices in rollout order, with their task instance and last error."""
    _checked(session, who, rollout_id)
    return rollout_queries.list_devices(session, rollout_id, state=state, limit=page.limit, offset=page.offset)


def _action(action: str) -> Any:
    def endpoint(
        rollout_id: int, sessions: Sessions, session: ReadSession, events: Events, clock: HubClock, who: CurrentUser, by: By,
        body: ActionRequest | None = None,
    ) -> dict[str, Any]:
        _checked(session, who, rollout_id)
        rollouts.act(sessions, events, clock, rollout_id, action, by=by, reason=(body or ActionRequest()).reason)
        with sessions() as fresh:
            return rollout_queries.get_rollout(fresh, rollout_id)

    endpoint.__name__ = f"{action}_rollout"
    endpoint.__doc__ = {
        "pause": "Pause: no new device is notified; devices in flight finish. Operator role; audited.",
        "resume": "Resume a paused rollout (after a manual pause or pause_after_canary). Operator role; audited.",
        "abort": "Abort: no new device is notified, pending ones are skipped (rollout_aborted), in-flight ones finish; the run fails. Operator role; audited.",
    }[action]
    return endpoint


_CONFLICT = {409: {"model": ErrorResponse, "description": "The rollout's state does not allow it."}}
for _name in ("pause", "resume", "abort"):
    router.add_api_route(f"/rollouts/{{rollout_id}}/{_name}", _action(_name), methods=["POST"], response_model=RolloutDetail, responses={**_NOT_FOUND, **_CONFLICT})
