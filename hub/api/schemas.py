"""API models: what the REST API accepts and answers, kept apart from the
tables in ``hub.models`` so the schema can change without breaking clients.

Names are the domain's: ``dag_id``, a run's numeric ``id`` (``run_pk`` where
another object points at a run), ``run_id`` (the Airflow-style string),
``task_id``, ``map_index``, ``try_number``, ``agent_id``, ``state``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. dag_not_found.")
    message: str = Field(description="What went wrong and what to do.")


class ErrorResponse(BaseModel):
    """The body of every error answer of the API."""

    error: ErrorDetail


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int = Field(description="Number of matching items over all pages.")
    limit: int
    offset: int


# --- requests -----------------------------------------------------------------


class DagPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    is_paused: bool = Field(description="True: the scheduler creates no scheduled runs of this DAG, starts none of its queued runs and no new task instances of its running runs.")


class TriggerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    conf: dict[str, Any] = Field(default_factory=dict, description="Run configuration, a JSON object the tasks can read.")


# --- DAGs -----------------------------------------------------------------------


class LastRun(BaseModel):
    id: int
    run_id: str
    state: str
    logical_date: datetime


class DagSummary(BaseModel):
    dag_id: str
    description: str | None
    fileloc: str = Field(description="The DAG file the hub parsed this DAG from.")
    schedule: str | None
    tags: list[str]
    is_paused: bool
    is_active: bool = Field(description="False once the DAG disappeared from the DAG folder.")
    task_count: int
    last_run: LastRun | None
    next_run_at: datetime | None
    next_data_interval_start: datetime | None = Field(None, description="Data interval of the next scheduled run: its logical date.")
    next_data_interval_end: datetime | None = Field(None, description="End of that interval; the run is created then (next_run_at).")
    last_parsed_at: datetime | None


class DagDetail(DagSummary):
    structure: dict[str, Any] = Field(description='Serialized DAG: {"tasks": [{"task_id", "kind", "upstream", ...}]}, upstream first.')
    latest_version_number: int | None = Field(None, description="The DAG's current version: new runs follow it.")


class DagVersionOut(BaseModel):
    id: int
    dag_id: str
    version_number: int = Field(description="1, 2, ...: a new one each time a parse changed the DAG's structure.")
    structure_hash: str = Field(description="sha256 of the structure's canonical JSON.")
    fileloc: str = Field(description="The DAG file this version was parsed from.")
    created_at: datetime
    task_count: int
    is_latest: bool = Field(description="True for the version new runs follow.")
    run_count: int = Field(description="Runs that follow this version.")


class DagVersionDetail(DagVersionOut):
    structure: dict[str, Any] = Field(description="The serialized DAG its runs follow (as in DagDetail).")


class ImportErrorOut(BaseModel):
    id: int
    fileloc: str
    kind: str = Field(description="syntax, cycle, ... : what kind of problem the DAG file has.")
    error: str
    recorded_at: datetime


# --- runs and task instances --------------------------------------------------


class TaskInstanceOut(BaseModel):
    id: int
    task_id: str
    map_index: int = Field(description="-1 for an unmapped task; 0..n-1 for each device of a fleet fan-out.")
    state: str
    try_number: int
    max_tries: int
    kind: str = Field(description='"hub" (Python callable on the hub) or "agent" (a job type on a device).')
    job_type: str | None
    agent_id: str | None
    output: Any | None
    error: dict[str, Any] | None
    queued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None
    progress: float | None = Field(None, description="A device task's last progress report for its current try, 0 to 1 (null: none yet).")
    progress_message: str | None = Field(None, description="The message of that progress report.")
    rendered_fields: dict[str, Any] | None = Field(None, description="The templated fields as rendered for the current try (an agent task's params, a hub task's op_args...), secrets as ***.")


class TaskTryLog(BaseModel):
    assignment_id: str
    agent_id: str
    complete: bool = Field(description="The last chunk arrived and none is missing.")
    chunks: int = Field(description="Chunks received.")
    text: str = Field(description="What the job logged (ctx.log lines, stdout, stderr), in order; a missing chunk shows as a marker line.")


class TaskLogOut(BaseModel):
    ti_id: int
    task_id: str
    map_index: int
    try_number: int
    logs: list[TaskTryLog] = Field(description="One entry per device the try ran on (normally one); empty when nothing was logged or nothing arrived yet.")


class TaskLogEntry(BaseModel):
    try_number: int
    assignment_id: str
    agent_id: str
    chunks: int = Field(description="Chunks received.")
    bytes: int = Field(description="Size of the stored text in bytes (UTF-8).")
    complete: bool = Field(description="The last chunk arrived and none is missing.")
    first_received_at: datetime = Field(description="When the hub stored the first chunk that arrived.")
    last_received_at: datetime = Field(description="When the hub stored the latest chunk; retention counts from each chunk's arrival.")


class TaskLogsOut(BaseModel):
    ti_id: int
    task_id: str
    map_index: int
    try_number: int = Field(description="The task instance's current try (it may have no log yet).")
    logs: list[TaskLogEntry] = Field(description="Tries with a stored log, oldest first: one entry per try and device (more than one when the try moved between devices).")


class RunSummary(BaseModel):
    id: int = Field(description="Numeric run id, used in /runs/{id}.")
    dag_id: str
    run_id: str
    run_type: str
    state: str
    logical_date: datetime
    conf: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    task_counts: dict[str, int] = Field(description="Task instances per state.")
    dag_version_number: int | None = Field(None, description="The DAG version the run follows (null for runs from before versions).")
    data_interval_start: datetime | None = Field(None, description="Start of the data the run covers (its logical date for a scheduled run).")
    data_interval_end: datetime | None = Field(None, description="End of the data the run covers; a scheduled run is created at this time.")
    backfill_id: int | None = Field(None, description="The backfill that created the run, if any.")
    triggered_by: dict[str, Any] | None = Field(None, description='What triggered it beyond its run_type, e.g. {"asset_event_ids": [...]} for an asset-triggered run.')


class RunDetail(RunSummary):
    task_instances: list[TaskInstanceOut]


# --- agents ---------------------------------------------------------------------


class AgentSummary(BaseModel):
    agent_id: str
    hostname: str
    version: str
    state: str = Field(description='"online" or "offline".')
    labels: dict[str, Any]
    job_types: list[Any] = Field(description='[{"name": ..., "version": ...}] as advertised by the agent.')
    first_seen: datetime
    last_seen: datetime
    clock_skew: float | None = Field(None, description="Seconds the device's clock was ahead (+) or behind (-) the hub's at its last fresh status or heartbeat; null until measured.")
    clock_skew_flagged_at: datetime | None = Field(None, description="Set while |clock_skew| exceeds the hub's max_clock_skew: since when the device's clock is not trusted.")
    clock_trusted: bool = Field(True, description="False while the clock is flagged: conflict resolution does not trust this device's times.")
    key_id: str | None = Field(None, description="Key id of the device's registered Ed25519 public key (its messages must verify with it); null: not registered, nothing it sends is applied.")
    registered_at: datetime | None = Field(None, description="When the device's public key was registered (enrolment or pre-registration).")
    revoked_at: datetime | None = Field(None, description="When an admin revoked the device; null: not revoked. A revoked device's messages, HTTP calls and broker access are refused.")
    groups: list[str] = Field(default_factory=list, description="Fleet groups operators put the device in (PUT /agents/{agent_id}/groups).")
    hardware_model: str = Field("", description="Hardware model from the device's last inventory (its device.json); empty until reported.")
    firmware_version: str = Field("", description="Firmware version (the active OTA slot's) from the device's last inventory; empty until reported.")
    disk_free_bytes: int | None = Field(None, description="Free bytes on the device root's file system at the last inventory.")
    mem_free_bytes: int | None = Field(None, description="Available memory in bytes at the last inventory (0: the device does not say).")
    mem_total_bytes: int | None = Field(None, description="Total memory in bytes (0: the device does not say).")


class GroupsIn(BaseModel):
    groups: list[str] = Field(description="The device's groups, replacing the current ones: 1-64 letters, digits, '.', '_', ':' or '-' each, at most 32.")


class AgentTaskInstance(TaskInstanceOut):
    dag_id: str
    run_pk: int
    run_id: str


class AgentDetail(AgentSummary):
    last_heartbeat: dict[str, Any] = Field(description="The last heartbeat body: queue depths, running jobs, counters.")
    inventory: dict[str, Any] = Field(default_factory=dict, description="The device's last reported inventory: hardware_model, firmware_version, agent_version, job_types {name: version}, disk_free_bytes, mem_free_bytes, mem_total_bytes, and any keys newer agents add.")
    recent_task_instances: list[AgentTaskInstance]


# --- rejected messages and health -----------------------------------------------


class RejectedOut(BaseModel):
    id: int
    source: str
    code: str
    topic: str
    agent_id: str | None
    detail: str
    excerpt: str
    received_at: datetime


class RejectedPage(Page[RejectedOut]):
    counts: dict[str, int] = Field(description="Rejections per code, over all rejected messages.")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str = Field(description='"ready" or "not_ready".')
    checks: dict[str, bool] = Field(description="Each check's result; database is always there.")
