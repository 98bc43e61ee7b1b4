"""XComs in the metadata DB: what hub workers and the scheduler read and write.

A task's return value is its XCom ``return_value`` and lives in
``task_instances.output``; values pushed under another key
(``ti.xcom_push(key, value)``, or each key of a ``multiple_outputs`` dict)
live in the ``xcoms`` table. Every value is JSON and at most
``MAX_XCOM_BYTES``: anything else fails the task with ``output_not_json`` or
``output_too_large``, never the hub.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from hub import secretvars, templating
from hub.models import DagRun, TaskInstance, XCom
from shared.states import TaskState

MAX_XCOM_BYTES = 1024 * 1024
RETURN_KEY = "return_value"


class XComValueError(Exception):
    """A value that cannot be an XCom; ``code`` is ``output_not_json`` or
    ``output_too_large`` (not retried: the same code returns the same value)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "retryable": False}


def check_value(value: Any, what: str = "the return value") -> None:
    """Raise ``XComValueError`` unless ``value`` is JSON of at most 1 MiB."""
    try:
        size = len(json.dumps(value, allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise XComValueError("output_not_json", f"{what} is not JSON: {exc}") from None
    if size > MAX_XCOM_BYTES:
        raise XComValueError("output_too_large", f"{what} is {size} bytes, over the {MAX_XCOM_BYTES}-byte XCom limit; store the data elsewhere and return a reference")


def push(session: Session, *, run_pk: int, task_id: str, map_index: int, key: str, value: Any, now: datetime) -> None:
    """Store (or replace) the XCom ``key`` of one task instance."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"an XCom key is a non-empty string, not {key!r}")
    if key == RETURN_KEY:
        raise ValueError("the 'return_value' XCom is the task's return value: return it instead of pushing it")
    check_value(value, f"XCom {key!r}")
    row = session.scalar(select(XCom).where(XCom.run_pk == run_pk, XCom.task_id == task_id, XCom.map_index == map_index, XCom.key == key))
    if row is None:
        session.add(XCom(run_pk=run_pk, task_id=task_id, map_index=map_index, key=key, value=value, created_at=now))
    else:
        row.value, row.created_at = value, now


def clear(session: Session, *, run_pk: int, task_id: str, map_index: int) -> None:
    """Forget what a task instance pushed (a new try starts clean, as in Airflow)."""
    session.execute(delete(XCom).where(XCom.run_pk == run_pk, XCom.task_id == task_id, XCom.map_index == map_index))


def record_return(session: Session, ti: TaskInstance, value: Any, *, multiple_outputs: bool, now: datetime) -> Any:
    """Check a hub task's return value and push the XComs it implies; returns
    the value to store as ``ti.output`` (the caller finishes the try).
    ``multiple_outputs`` pushes each key of the returned dict as its own XCom.
    Raises ``XComValueError``."""
    check_value(value)
    if multiple_outputs and value is not None:
        if not isinstance(value, dict):
            raise XComValueError("output_not_json", f"multiple_outputs=True needs a dict return value, got {type(value).__name__}")
        for key, item in value.items():
            if key == RETURN_KEY:
                raise XComValueError("output_not_json", "with multiple_outputs=True a returned dict cannot use the key 'return_value'")
            push(session, run_pk=ti.run_pk, task_id=ti.task_id, map_index=ti.map_index, key=key, value=item, now=now)
    return value


def pull(session: Session, run_pk: int, task_ids: str | list[str] | tuple[str, ...] | None = None, key: str = RETURN_KEY, map_indexes: int | list[int] | None = None, default: Any = None) -> Any:
    """Airflow's ``xcom_pull`` over one run. One task id gives its value; a
    task with mapped instances (or fan-out devices) gives the list of their
    values by map index (``None`` where an instance left none) unless
    ``map_indexes`` picks some; a list of task ids gives a list. ``None``
    task ids: the latest value of ``key`` from any task of the run."""
    # Checked before any query: a template may pass anything, and a type
    # error inside the database would abort the caller's transaction.
    if not isinstance(key, str):
        raise TypeError(f"xcom_pull: key must be a string, not {key!r}")
    if map_indexes is not None and not (isinstance(map_indexes, int) or (isinstance(map_indexes, (list, tuple)) and all(isinstance(i, int) for i in map_indexes))):
        raise TypeError(f"xcom_pull: map_indexes must be an int or a list of ints, not {map_indexes!r}")
    if isinstance(task_ids, (list, tuple)):
        return [pull(session, run_pk, t, key, map_indexes, default) for t in task_ids]
    if task_ids is not None and not isinstance(task_ids, str):
        raise TypeError(f"xcom_pull: task_ids must be a task id or a list of them, not {task_ids!r}")
    if task_ids is None:
        return _latest(session, run_pk, key, default)
    if key == RETURN_KEY:
        rows = session.execute(
            select(TaskInstance.map_index, TaskInstance.state, TaskInstance.output)
            .where(TaskInstance.run_pk == run_pk, TaskInstance.task_id == task_ids)
            .order_by(TaskInstance.map_index)
        ).all()
        # A removed instance (a mapped task that expanded to fewer values when cleared) holds no place.
        values = {r.map_index: (r.output if r.state == TaskState.SUCCESS else None) for r in rows if r.state != TaskState.REMOVED}
    else:
        values = dict(
            session.execute(
                select(XCom.map_index, XCom.value).where(XCom.run_pk == run_pk, XCom.task_id == task_ids, XCom.key == key).order_by(XCom.map_index)
            ).all()
        )
        # Instances that pushed nothing still hold their place in a mapped list.
        for index in session.scalars(
            select(TaskInstance.map_index).where(TaskInstance.run_pk == run_pk, TaskInstance.task_id == task_ids, TaskInstance.state != TaskState.REMOVED)
        ):
            values.setdefault(index, None)
    if isinstance(map_indexes, int):
        value = values.get(map_indexes)
        return default if value is None else value
    if map_indexes is not None:
        return [values.get(i) for i in map_indexes]
    if not values or set(values) == {-1}:
        value = values.get(-1)
        return default if value is None else value
    return [values[i] for i in sorted(values) if i >= 0]


def _latest(session: Session, run_pk: int, key: str, default: Any) -> Any:
    if key == RETURN_KEY:
        value = session.scalar(
            select(TaskInstance.output)
            .where(TaskInstance.run_pk == run_pk, TaskInstance.state == TaskState.SUCCESS, TaskInstance.output.is_not(None))
            .order_by(TaskInstance.ended_at.desc(), TaskInstance.id.desc())
            .limit(1)
        )
    else:
        value = session.scalar(select(XCom.value).where(XCom.run_pk == run_pk, XCom.key == key).order_by(XCom.created_at.desc(), XCom.id.desc()).limit(1))
    return default if value is None else value


SessionScope = Callable[[], AbstractContextManager[Session]]


class TaskInstanceRef:
    """``ti`` / ``task_instance`` in a task's context and in templates: the
    instance's identity and its run's XComs. ``session_scope()`` gives a
    session for one read or one write (a worker passes its sessionmaker's
    ``transaction``; the scheduler the session of its step, read-only)."""

    def __init__(
        self,
        session_scope: SessionScope,
        *,
        run_pk: int,
        dag_id: str,
        run_id: str,
        task_id: str,
        map_index: int = -1,
        try_number: int = 0,
        clock_now: Callable[[], datetime] | None = None,
        read_only: bool = False,
    ) -> None:
        self._scope = session_scope
        self._now = clock_now
        self._read_only = read_only
        self.run_pk = run_pk
        self.dag_id, self.run_id, self.task_id = dag_id, run_id, task_id
        self.map_index, self.try_number = map_index, try_number

    @classmethod
    def of(cls, session_scope: SessionScope, ti: TaskInstance, **kwargs: Any) -> TaskInstanceRef:
        return cls(session_scope, run_pk=ti.run_pk, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=ti.map_index, try_number=ti.try_number, **kwargs)

    def xcom_pull(self, task_ids: str | list[str] | None = None, key: str = RETURN_KEY, map_indexes: int | list[int] | None = None, default: Any = None, **_ignored: Any) -> Any:
        with self._scope() as session:
            # Airflow 3 (and the hub workers): no task ids means this task's own XComs.
            return pull(session, self.run_pk, self.task_id if task_ids is None else task_ids, key, map_indexes, default)

    def xcom_push(self, key: str, value: Any) -> None:
        if self._read_only or self._now is None:
            raise RuntimeError("xcom_push is not available here (templates only read XComs)")
        with self._scope() as session:
            push(session, run_pk=self.run_pk, task_id=self.task_id, map_index=self.map_index, key=key, value=value, now=self._now())

    def xcom_pull_agents(self, task_id: str) -> dict[str, Any]:
        """Outputs of a fanned-out agent task keyed by agent id (Outpost's addition)."""
        with self._scope() as session:
            rows = session.execute(
                select(TaskInstance.agent_id, TaskInstance.state, TaskInstance.output).where(TaskInstance.run_pk == self.run_pk, TaskInstance.task_id == task_id)
            ).all()
        return {r.agent_id: r.output for r in rows if r.state == TaskState.SUCCESS and r.agent_id}

    def __repr__(self) -> str:
        return f"<TaskInstance {self.dag_id}/{self.run_id}/{self.task_id}[{self.map_index}] try {self.try_number}>"


def run_context(session_scope: SessionScope, ti: TaskInstance, run: DagRun, *, read_only: bool = False, clock_now: Callable[[], datetime] | None = None, **extra: Any) -> dict[str, Any]:
    """The task context of ``ti`` in ``run`` (see ``templating.build_context``);
    ``extra`` adds or overrides entries (``task``, ``dag``, ``clock``...)."""
    ref = TaskInstanceRef.of(session_scope, ti, read_only=read_only, clock_now=clock_now)
    params = run_params(run)
    return templating.build_context(
        dag_id=run.dag_id,
        run_id=run.run_id,
        run_type=run.run_type,
        conf=dict(run.conf or {}),
        params=params,
        logical_date=run.logical_date,
        data_interval_start=run.data_interval_start,
        data_interval_end=run.data_interval_end,
        ti=ref,
        map_index=ti.map_index,
        sensor_started_at=ti.sensor_started_at,
        try_number=ti.try_number,
        **{**secretvars.template_accessors(), **extra},
    )


def run_params(run: DagRun) -> dict[str, Any]:
    """The run's validated params (stored at trigger time); a run created
    before params were stored falls back to its conf."""
    stored = getattr(run, "params", None)
    return dict(stored) if isinstance(stored, Mapping) else dict(run.conf or {})


def render_agent_task(session: Session, ti: TaskInstance, task: Mapping[str, Any], *, native: bool = False) -> dict[str, Any]:
    """The job parameters of agent task ``ti`` for this try: its templated
    ``params`` rendered on the hub (XComArgs resolved from the run's XComs,
    Jinja with the run's context) and checked against the job type's schema
    when the hub knows the job type. Raises ``templating.TemplateError``."""
    run = session.get(DagRun, ti.run_pk)
    if run is None:
        raise templating.TemplateError(f"run of {ti.key} not found")

    @contextmanager
    def same_session() -> Iterator[Session]:
        yield session

    context = run_context(same_session, ti, run, read_only=True)
    try:
        return templating.render_agent_params(task, context, native=native, validate=_validate_job_params)
    except templating.TemplateError:
        raise
    except Exception as exc:  # e.g. a bad XCom reference: the task fails, the scheduler goes on
        raise templating.TemplateError(f"rendering the params of {ti.task_id!r}: {type(exc).__name__}: {exc}") from None


def _validate_job_params(job_type: str, params: dict[str, Any]) -> None:
    from firmware_jobs import registry as job_registry
    from shared.errors import UnknownJobType

    try:
        job = job_registry.get(job_type)
    except UnknownJobType:
        return  # devices may have job types the hub does not know; they check
    job.validate(params)
