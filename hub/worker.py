"""What runs inside a hub-task worker process: import DAG files, build the
task's context, run the operator, report the outcome.

``LocalExecutor`` (hub/executor.py) starts a few long-lived worker
processes and sends each one task (or callback) at a time over a pipe. The
worker imports the DAG file itself (cached by path and modification time),
so the hub process never needs DAG objects to run tasks, and task code that
crashes, hangs or leaks only costs a worker, which the executor replaces.

The worker reads the metadata DB and writes the values a task pushes
(``ti.xcom_push``); the outcome of the try goes back to the executor, which
records it (one place for "commit before emit" and for the rule that a try
cleared or marked meanwhile is not overwritten). The same functions run
in-process for the tick-by-tick test harness (``LocalExecutor.run_inline``).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from hub import asset_events, secretvars, xcom
from hub.dag import DAG, BaseSensorOperator, SensorTimeout, TaskFailedNoRetry, TaskRescheduled, TaskSkipped, import_dag_file
from hub.db import make_engine, make_sessionmaker, transaction
from hub.encryption import parse_keys
from hub.errors import ConfigError, InvalidDag
from hub.mapping import same_group_index, unmap
from hub.masking import MASKER, install_log_filter
from hub.models import CallbackRequest, Dag, DagRun, DagVersion, TaskInstance, XCom
from hub.templating import build_context as template_context
from shared.clock import Clock, SystemClock, utcnow
from shared.states import TaskState

log = logging.getLogger(__name__)

#: The largest return value (or pushed XCom) a hub task may produce, as JSON.
MAX_OUTPUT_BYTES = xcom.MAX_XCOM_BYTES
RETURN_KEY = xcom.RETURN_KEY
#: A callback that raises is tried this many times in all, then given up.
MAX_CALLBACK_ATTEMPTS = 3


class DagFileError(Exception):
    """A DAG file could not be imported in the worker."""


@dataclass
class DagFileCache:
    """DAG files imported by this process, re-imported when their mtime changes."""

    _files: dict[str, tuple[float, dict[str, DAG]]] = field(default_factory=dict)

    def dag(self, fileloc: str, dag_id: str) -> DAG:
        try:
            mtime = os.stat(fileloc).st_mtime
        except OSError as exc:
            raise DagFileError(f"cannot read DAG file {fileloc}: {exc.strerror}") from None
        cached = self._files.get(fileloc)
        if cached is None or cached[0] != mtime:
            cached = (mtime, self._import(fileloc))
            self._files[fileloc] = cached
        dag = cached[1].get(dag_id)
        if dag is None:
            raise DagFileError(f"DAG file {fileloc} no longer defines DAG {dag_id!r}")
        return dag

    @staticmethod
    def _import(fileloc: str) -> dict[str, DAG]:
        # As the DAG processor does (and Airflow): the DAG folder is on
        # sys.path, so a DAG file that imports a helper module of its folder
        # loads here too. DAG files are only ever top-level files of the folder.
        folder = os.path.dirname(fileloc)
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
        try:
            imported = import_dag_file(fileloc)
        except BaseException as exc:  # DAG file code may raise anything, even SystemExit
            last = "".join(traceback.format_exception_only(exc)).strip()
            raise DagFileError(f"DAG file {fileloc} failed to import in the worker: {last}") from None
        dags = {v.dag_id: v for v in imported}
        for dag in dags.values():
            dag.fileloc = fileloc
        return dags


@dataclass
class WorkerRuntime:
    """What a worker needs: its own DB sessions, its DAG file cache, a clock."""

    sessions: sessionmaker[Session]
    clock: Clock = field(default_factory=SystemClock)
    cache: DagFileCache = field(default_factory=DagFileCache)
    #: Variables and connections for DAG code (None: the hub has no fernet_keys).
    store: secretvars.SecretStore | None = None


# --- the context -------------------------------------------------------------


class TaskInstanceProxy:
    """``ti`` / ``task_instance`` in the context: the task instance's
    identity and XComs, read from and written to the metadata DB."""

    def __init__(self, runtime: WorkerRuntime, ti: TaskInstance, task: Any = None) -> None:
        self._runtime = runtime
        self._run_pk = ti.run_pk
        self.id = ti.id
        self.dag_id, self.run_id, self.task_id = ti.dag_id, ti.run_id, ti.task_id
        self.map_index, self.try_number, self.max_tries = ti.map_index, ti.try_number, ti.max_tries
        self.state = ti.state
        self.task = task

    def __repr__(self) -> str:
        return f"<TaskInstance {self.dag_id}.{self.task_id} {self.run_id} map_index={self.map_index} try={self.try_number}>"

    def xcom_pull(
        self,
        task_ids: str | Iterable[str] | None = None,
        key: str = RETURN_KEY,
        map_indexes: int | Iterable[int] | None = None,
        default: Any = None,
    ) -> Any:
        """An upstream task's XCom, as Airflow's ``xcom_pull``.

        ``task_ids`` defaults to this task. One task id gives one value; a
        list gives a list, in that order. Without ``map_indexes`` a mapped
        (or fleet fan-out) task gives the list of all its instances' values
        by map index, ``None`` where an instance has none (did not succeed);
        an unmapped task gives its value. ``default`` replaces a missing
        value of an unmapped task."""
        if task_ids is None:
            ids, single = [self.task_id], True
        elif isinstance(task_ids, str):
            ids, single = [task_ids], True
        else:
            ids, single = list(task_ids), False
        if map_indexes is not None and not isinstance(map_indexes, int):
            map_indexes = list(map_indexes)
        values = []
        with self._runtime.sessions() as session:
            for task_id in ids:
                same = same_group_index(self.task, task_id, self.map_index) if map_indexes is None else None
                # Inside a mapped task group, Airflow pulls the same index's value (MAP).
                values.append(xcom.pull(session, self._run_pk, task_id, key, same if same is not None else map_indexes, default))
        return values[0] if single else values

    def xcom_pull_agents(self, task_id: str) -> dict[str, Any]:
        """Outputs of a fanned-out agent task keyed by agent id (successes only)."""
        with self._runtime.sessions() as session:
            rows = session.execute(
                select(TaskInstance.agent_id, TaskInstance.state, TaskInstance.output).where(TaskInstance.run_pk == self._run_pk, TaskInstance.task_id == task_id)
            ).all()
        return {r.agent_id: r.output for r in rows if r.state == TaskState.SUCCESS and r.agent_id}

    def xcom_push(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON, at most 1 MiB) under ``key`` for this task
        instance; pushing a key again replaces its value."""
        with transaction(self._runtime.sessions) as session:
            xcom.push(session, run_pk=self._run_pk, task_id=self.task_id, map_index=self.map_index, key=key, value=value, now=utcnow(self._runtime.clock))


class TaskFailure(Exception):
    """``context["exception"]`` in a callback: the try's error, rebuilt in
    the worker that runs the callback (the original exception object lived
    in another process). ``str()`` is the message; ``error`` the recorded
    dict (code, message, retryable)."""

    def __init__(self, message: str, error: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.error = error or {}
        self.code = self.error.get("code")

    @classmethod
    def from_error(cls, error: Any) -> TaskFailure:
        if isinstance(error, dict):
            return cls(str(error.get("message") or error.get("code") or "the task failed"), error)
        return cls(str(error))


def _params(dag: DAG, run: DagRun) -> dict[str, Any]:
    """The run's params: resolved and validated when the run was created
    (``dag_runs.params``), else the DAG's defaults with the conf over them."""
    resolved = getattr(run, "params", None)
    if resolved is not None:
        return dict(resolved)
    declared = getattr(dag, "params", None) or {}
    merged = {}
    for name, param in dict(declared).items():
        value = getattr(param, "value", param)
        if getattr(param, "has_value", True):
            merged[name] = value
    merged.update(run.conf or {})
    return merged


def build_context(runtime: WorkerRuntime, dag: DAG, task: Any, ti: TaskInstance, run: DagRun, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Airflow-style context a hub task (or callback) receives; the same
    builder as templates use (hub.templating), with a live ``ti``."""
    proxy = TaskInstanceProxy(runtime, ti, task)
    context = template_context(
        dag_id=run.dag_id, run_id=run.run_id, run_type=run.run_type, conf=dict(run.conf or {}), params=_params(dag, run),
        logical_date=run.logical_date, data_interval_start=run.data_interval_start, data_interval_end=run.data_interval_end,
        ti=proxy, map_index=ti.map_index, task=task, dag=dag, outlets=list(getattr(task, "outlets", None) or []),
        sensor_started_at=ti.sensor_started_at or ti.started_at, **secretvars.template_accessors(),
    )
    context.setdefault("try_number", ti.try_number)
    context.setdefault("clock", runtime.clock)  # sensors time their pokes with it
    context.setdefault("inlets", list(getattr(task, "inlets", None) or []))
    # Airflow's triggering_asset_events: the asset events an asset-triggered run consumed, by URI.
    if (run.triggered_by or {}).get("asset_event_ids"):
        with runtime.sessions() as session:
            context.setdefault("triggering_asset_events", asset_events.triggering_asset_events(session, run))
    else:
        context.setdefault("triggering_asset_events", {})
    context.update(extra or {})
    return context


# --- running a task ----------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# Built once: composing a statement costs more than running it, and a
# worker runs this for every task.
_LOAD = (
    select(
        TaskInstance,
        DagRun,
        func.coalesce(DagVersion.fileloc, Dag.fileloc),
        exists().where(XCom.run_pk == TaskInstance.run_pk, XCom.task_id == TaskInstance.task_id, XCom.map_index == TaskInstance.map_index),
    )
    .join(DagRun, DagRun.id == TaskInstance.run_pk)
    .outerjoin(DagVersion, DagVersion.id == DagRun.dag_version_id)
    .outerjoin(Dag, Dag.dag_id == TaskInstance.dag_id)
    .where(TaskInstance.id == bindparam("ti_id"))
)


def _load(runtime: WorkerRuntime, ti_id: int) -> tuple[TaskInstance, DagRun, str, bool] | None:
    """The instance, its run, the DAG file it runs from, and whether it has
    XComs already (pushed by an earlier try)."""
    with runtime.sessions() as session:
        row = session.execute(_LOAD, {"ti_id": ti_id}).one_or_none()
        if row is None:
            return None
        session.expunge_all()
        return row[0], row[1], row[2] or "", bool(row[3])


def execute_task(runtime: WorkerRuntime, ti_id: int, started_at: datetime, on_start: Callable[[int, float | None], None] | None = None) -> tuple[int | None, dict[str, Any]]:
    """Run the queued try of task instance ``ti_id`` (handed to this worker
    at ``started_at``) and return ``(try_number, outcome)``. ``on_start(
    try_number, execution_timeout)`` is called once the try is known, before
    any DAG code runs.

    Outcomes (see ``hub.executor.apply_outcome`` for how they are recorded):
    ``{"kind": "success", "output": ..., "multiple_outputs": bool}``,
    ``{"kind": "failed", "error": {...}}``, ``{"kind": "skipped"}``,
    ``{"kind": "reschedule", "reschedule_at": datetime, "sensor_started_at":
    ...}`` or ``{"kind": "stale"}`` (the instance is not queued any more:
    nothing ran). Any outcome may carry ``rendered_fields``."""
    loaded = _load(runtime, ti_id)
    if loaded is None:
        return None, {"kind": "stale"}
    ti, run, fileloc, has_xcoms = loaded
    if ti.state not in (TaskState.QUEUED, TaskState.RUNNING):
        return None, {"kind": "stale"}
    if on_start is not None:
        on_start(ti.try_number, ti.execution_timeout)
    ti.started_at = started_at
    if has_xcoms:
        # A try starts without the XComs an earlier try pushed (as in Airflow).
        with transaction(runtime.sessions) as session:
            xcom.clear(session, run_pk=ti.run_pk, task_id=ti.task_id, map_index=ti.map_index)
    return ti.try_number, _run(runtime, ti, run, fileloc)


def _run(runtime: WorkerRuntime, ti: TaskInstance, run: DagRun, fileloc: str) -> dict[str, Any]:
    """Run the try with the runtime's secret store; what the hub records for
    humans to see (errors, rendered fields) leaves with secrets masked. The
    output is data for downstream tasks and is masked where it is shown."""
    with secretvars.using(runtime.store):
        outcome = _run_task(runtime, ti, run, fileloc)
    for key in ("error", "rendered_fields"):
        if outcome.get(key) is not None:
            outcome[key] = MASKER.redact(outcome[key])
    return outcome


def _run_task(runtime: WorkerRuntime, ti: TaskInstance, run: DagRun, fileloc: str) -> dict[str, Any]:
    try:
        dag = runtime.cache.dag(fileloc, ti.dag_id)
    except DagFileError as exc:
        # The file may be mid-edit or fixed later: another try may succeed.
        return {"kind": "failed", "error": {"code": "dag_import_error", "message": str(exc), "retryable": True}}
    task = dag.tasks.get(ti.task_id)
    if task is None:
        message = f"hub task {ti.dag_id}.{ti.task_id} is not in DAG file {fileloc} any more"
        return {"kind": "failed", "error": {"code": "task_not_loaded", "message": message, "retryable": False}}
    if getattr(task, "mapping", None) is not None and ti.map_index >= 0:
        try:
            # A copy with this instance's mapped argument values (hub.mapping; MAP owns this block).
            task = unmap(task, ti.params or {})
        except InvalidDag as exc:
            return {"kind": "failed", "error": {"code": "unmappable_argument", "message": str(exc), "retryable": False}}
    context = build_context(runtime, dag, task, ti, run)
    outcome: dict[str, Any] = {}
    is_sensor = isinstance(task, BaseSensorOperator)
    try:
        # A rendered copy: the DAG's operators are shared by every task this
        # worker runs and are never changed.
        task = task.render_template_fields(context)
        context["task"] = context["ti"].task = task
        outcome["rendered_fields"] = getattr(task, "rendered_fields", None)
        _call_hooks(task, "on_execute_callback", context)
        pre_execute = getattr(task, "pre_execute", None)
        if callable(pre_execute):
            pre_execute(context)
        result = task.execute(context)
        post_execute = getattr(task, "post_execute", None)
        if callable(post_execute):
            post_execute(context, result)
        xcom.check_value(result)
    except xcom.XComValueError as exc:
        return {**outcome, "kind": "failed", "error": exc.as_error()}
    except BaseException as exc:  # task code may raise anything, even SystemExit; the worker stays
        found = _exception_outcome(exc, task)
        if found["kind"] == "skipped":
            _call_hooks(task, "on_skipped_callback", context)
        if is_sensor and found["kind"] == "reschedule":
            found["sensor_started_at"] = context["sensor_started_at"]
        return {**outcome, **found}
    return {**outcome, "kind": "success", "output": result, "multiple_outputs": bool(getattr(task, "multiple_outputs", False))}


def _call_hooks(task: Any, attribute: str, context: dict[str, Any]) -> None:
    """Airflow's in-process callbacks (``on_execute_callback`` before
    execute, ``on_skipped_callback`` when the task skips itself): one that
    raises is logged and does not change the task's outcome, as in Airflow."""
    hooks = getattr(task, attribute, None)
    for hook in hooks if isinstance(hooks, (list, tuple)) else [hooks] if hooks is not None else []:
        try:
            hook(context)
        except Exception as exc:
            log.warning("%s of %s raised %s", attribute, getattr(task, "task_id", "?"), _describe(exc))


def _exception_outcome(exc: BaseException, task: Any) -> dict[str, Any]:
    message = _describe(exc)
    if isinstance(exc, TaskRescheduled):
        when = exc.reschedule_at
        if isinstance(when, datetime) and when.tzinfo is not None:
            return {"kind": "reschedule", "reschedule_at": when}
        return {"kind": "failed", "error": {"code": "invalid_reschedule", "message": f"{message}: reschedule_at must be an aware datetime", "retryable": False}}
    if isinstance(exc, TaskSkipped):
        return {"kind": "skipped"}
    if isinstance(exc, SensorTimeout):
        return {"kind": "failed", "error": {"code": "sensor_timeout", "message": message, "retryable": False}}
    if isinstance(exc, TaskFailedNoRetry):
        return {"kind": "failed", "error": {"code": "failed_no_retry", "message": message, "retryable": False}}
    as_error = getattr(exc, "as_error", None)
    if callable(as_error):  # TemplateError and friends know their code
        return {"kind": "failed", "error": as_error()}
    log.warning("hub task %s raised %s", getattr(task, "task_id", "?"), message)
    tb = traceback.format_exception(exc)
    error = {"code": "exception", "message": message, "retryable": True, "traceback": "".join(tb[-6:])[-4000:]}
    outcome: dict[str, Any] = {"kind": "failed", "error": error}
    if isinstance(exc, MemoryError):
        outcome["recycle"] = True  # the worker's heap is suspect: replace it
    return outcome


# --- callbacks ---------------------------------------------------------------

_CALLBACK_ATTRS = {
    "success": "on_success_callback",
    "failure": "on_failure_callback",
    "retry": "on_retry_callback",
    "execute": "on_execute_callback",
    "skipped": "on_skipped_callback",
    "sla_miss": "sla_miss_callback",
}


def callback_attribute(kind: str) -> str:
    """The DAG or operator attribute a callback request's ``kind`` names:
    "task_failure" and "dag_failure" (hub.lifecycle's kinds),
    "on_failure_callback", "on_failure" and "failure" all name
    ``on_failure_callback``."""
    short = kind.removesuffix("_callback").removeprefix("on_").removeprefix("task_").removeprefix("dag_")
    if short not in _CALLBACK_ATTRS:
        raise ValueError(f"unknown callback kind {kind!r}; one of {', '.join(sorted(_CALLBACK_ATTRS))}")
    return _CALLBACK_ATTRS[short]


def run_callback(runtime: WorkerRuntime, callback_id: int) -> str | None:
    """Run callback request ``callback_id``; returns None on success or the
    error (secrets masked). Every callable is called even when an earlier one raised."""
    with secretvars.using(runtime.store):
        error = _run_callback(runtime, callback_id)
    return MASKER.mask_text(error) if error else error


def _run_callback(runtime: WorkerRuntime, callback_id: int) -> str | None:
    with runtime.sessions() as session:
        request = session.get(CallbackRequest, callback_id)
        if request is None:
            return "the callback request no longer exists"
        ti = session.get(TaskInstance, request.ti_id) if request.ti_id is not None else None
        run = session.get(DagRun, request.run_pk) if request.run_pk is not None else (session.get(DagRun, ti.run_pk) if ti is not None else None)
        fileloc = None
        if request.dag_version_id is not None:
            version = session.get(DagVersion, request.dag_version_id)
            fileloc = version.fileloc if version is not None else None
        if fileloc is None:
            dag_row = session.get(Dag, request.dag_id)
            fileloc = dag_row.fileloc if dag_row is not None else None
        session.expunge_all()
    if fileloc is None:
        return f"DAG {request.dag_id!r} is not known to the hub"
    try:
        attribute = callback_attribute(request.kind)
        dag = runtime.cache.dag(fileloc, request.dag_id)
    except (ValueError, DagFileError) as exc:
        return str(exc)
    task_id = request.task_id or (ti.task_id if ti is not None else None)
    owner: Any = dag
    task = None
    if task_id:
        task = dag.tasks.get(task_id)
        if task is None:
            return f"task {task_id!r} is not in DAG {request.dag_id!r} any more"
        owner = task
    callbacks = getattr(owner, attribute, None)
    if callbacks is None:
        return None  # removed from the DAG file since: nothing to call
    if not isinstance(callbacks, (list, tuple)):
        callbacks = [callbacks]
    payload = dict(request.payload or {})
    error = payload.get("exception") or (ti.error if ti is not None and ti.state != TaskState.SUCCESS else None)
    extra = {"reason": payload.get("reason", request.kind), "exception": TaskFailure.from_error(error) if error else None}
    extra.update({k: v for k, v in payload.items() if k not in extra})
    if run is not None and ti is not None:
        context = build_context(runtime, dag, task, ti, run, extra)
    elif run is not None:
        context = _dag_context(runtime, dag, run, extra)
    else:
        context = {"dag": dag, "dag_id": dag.dag_id, **extra}
    errors = []
    for fn in callbacks:
        try:
            fn(context)
        except BaseException as exc:  # callback code may raise anything; it never stops the hub
            log.warning("callback %s of %s raised %s", attribute, owner, _describe(exc))
            errors.append(f"{getattr(fn, '__qualname__', fn)}: {_describe(exc)}")
    return "; ".join(errors) or None


def _dag_context(runtime: WorkerRuntime, dag: DAG, run: DagRun, extra: dict[str, Any]) -> dict[str, Any]:
    context = template_context(
        dag_id=run.dag_id, run_id=run.run_id, run_type=run.run_type, conf=dict(run.conf or {}), params=_params(dag, run),
        logical_date=run.logical_date, data_interval_start=run.data_interval_start, data_interval_end=run.data_interval_end,
        ti=None, dag=dag, **secretvars.template_accessors(),
    )
    context.update(extra)
    return context


# --- the worker process ------------------------------------------------------


def worker_store(sessions: sessionmaker[Session], fernet_keys: str) -> secretvars.SecretStore | None:
    """The secret store of a process running DAG code (None without keys:
    DAG code then gets ``SecretsUnavailable`` when it reads a variable)."""
    if not fernet_keys:
        return None
    try:
        return secretvars.open_store(sessions, parse_keys(fernet_keys))
    except ConfigError as exc:
        log.error("hub worker: %s", exc)
        return None


def _die_with_hub(lifeline: Any) -> None:
    """Exit the moment the hub is gone, even in the middle of a task: the
    hub holds the other end of ``lifeline`` and never writes to it, so a
    read returns only when the hub closed it or died. A task must not keep
    running after its hub died: the next hub adopts it and runs it again."""

    def watch() -> None:
        try:
            lifeline.recv()
        except (EOFError, OSError):
            pass
        os._exit(70)

    threading.Thread(target=watch, name="hub-lifeline", daemon=True).start()


def worker_main(conn: Any, lifeline: Any, db_url: str, sqlite_synchronous: str, fernet_keys: str = "") -> None:
    """A worker's loop: one request at a time until told to stop or the
    executor's end of the pipe closes.

    Requests: ``("task", ti_id, started_at)`` answered by ``("started",
    ti_id, try_number, execution_timeout)`` (unless the instance is no longer
    queued) and then ``("task", ti_id, try_number, outcome)``; ``("callback", id)`` answered by ``("callback",
    id, error_or_None)``; ``None`` to stop. ``fernet_keys`` (the hub's
    setting) lets task code read variables and connections."""
    _die_with_hub(lifeline)
    install_log_filter()
    # Ctrl-C in a terminal reaches the whole process group; the hub decides
    # when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # One task at a time: two connections cover a task's reads and its XCom writes.
    engine = make_engine(db_url, sqlite_synchronous=sqlite_synchronous, pool_size=2, max_overflow=2)
    sessions = make_sessionmaker(engine)
    runtime = WorkerRuntime(sessions, store=worker_store(sessions, fernet_keys))
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if request is None:
                return
            if request[0] == "task":
                _, ti_id, started_at = request
                try_number: int | None = None
                try:
                    try_number, outcome = execute_task(runtime, ti_id, started_at, lambda t, timeout: conn.send(("started", ti_id, t, timeout)))
                except Exception as exc:  # the worker's own failure (DB gone...): report it, keep serving
                    outcome = {"kind": "failed", "error": {"code": "worker_error", "message": _describe(exc), "retryable": True}}
                conn.send(("task", ti_id, try_number, outcome))
                if outcome.get("recycle"):
                    return
            elif request[0] == "callback":
                _, callback_id = request
                try:
                    error = run_callback(runtime, callback_id)
                except Exception as exc:
                    error = f"worker error: {_describe(exc)}"
                conn.send(("callback", callback_id, error))
    finally:
        engine.dispose()


__all__ = ["MAX_OUTPUT_BYTES", "DagFileCache", "TaskInstanceProxy", "WorkerRuntime", "execute_task", "run_callback", "worker_main"]
