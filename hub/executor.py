"""The local worker pool for hub tasks: Python callables from DAG files.

This is Airflow's LocalExecutor, kept for orchestration glue (summing fleet
results, calling an HTTP API). Callables run in threads of the hub process;
their return value, which must be JSON, becomes the task's output.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hub import events as ev
from hub.dag import PythonOperator
from hub.dagbag import DagBag
from hub.db import transaction
from hub.events import EventBus
from hub.lifecycle import finish_try
from hub.models import DagRun, TaskInstance
from shared.clock import Clock, utcnow
from shared.states import TaskState

log = logging.getLogger(__name__)

MAX_OUTPUT_BYTES = 1024 * 1024


class TaskContext:
    """What a hub task sees as ``ti``: its identity and its upstreams' outputs."""

    def __init__(self, sessions: sessionmaker[Session], ti: TaskInstance) -> None:
        self._sessions = sessions
        self.dag_id, self.run_id, self.task_id = ti.dag_id, ti.run_id, ti.task_id
        self.map_index, self.try_number = ti.map_index, ti.try_number
        self._run_pk = ti.run_pk

    def xcom_pull(self, task_ids: str | list[str]) -> Any:
        """The output of ``task_ids``. A fanned-out task gives the list of its
        instances' outputs in device order (``None`` where one did not succeed);
        a list of task ids gives a list of those."""
        if isinstance(task_ids, list):
            return [self.xcom_pull(t) for t in task_ids]
        with self._sessions() as session:
            rows = session.execute(
                select(TaskInstance.map_index, TaskInstance.state, TaskInstance.output)
                .where(TaskInstance.run_pk == self._run_pk, TaskInstance.task_id == task_ids)
                .order_by(TaskInstance.map_index)
            ).all()
        outputs = [r.output if r.state == TaskState.SUCCESS else None for r in rows]
        if len(rows) == 1 and rows[0].map_index < 0:
            return outputs[0]
        return outputs

    def xcom_pull_agents(self, task_id: str) -> dict[str, Any]:
        """Outputs of a fanned-out agent task keyed by agent id."""
        with self._sessions() as session:
            rows = session.execute(
                select(TaskInstance.agent_id, TaskInstance.state, TaskInstance.output).where(TaskInstance.run_pk == self._run_pk, TaskInstance.task_id == task_id)
            ).all()
        return {r.agent_id: r.output for r in rows if r.state == TaskState.SUCCESS and r.agent_id}


@dataclass
class LocalExecutor:
    sessions: sessionmaker[Session]
    dagbag: DagBag
    clock: Clock
    events: EventBus
    workers: int = 4
    _pool: ThreadPoolExecutor | None = None
    _running: set[int] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hub-task")

    def stop(self, wait: bool = True) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None

    def submit(self, ti_id: int) -> None:
        if self._pool is None:
            raise RuntimeError("executor is not started")
        with self._lock:
            if ti_id in self._running:
                return
            self._running.add(ti_id)
        self._pool.submit(self._execute, ti_id)

    def adopt_orphans(self) -> int:
        """Hub tasks left queued or running by a dead hub process go back to
        the scheduler, which starts them again as a new try."""
        with transaction(self.sessions) as session:
            result = session.execute(
                update(TaskInstance)
                .where(TaskInstance.kind == "hub", TaskInstance.state.in_([TaskState.QUEUED, TaskState.RUNNING]))
                .values(state=TaskState.SCHEDULED)
            )
            return result.rowcount or 0  # type: ignore[attr-defined]

    def _execute(self, ti_id: int) -> None:
        try:
            self._run_one(ti_id)
        except Exception as exc:
            log.exception("hub task %s: executor failure", ti_id)
            self._fail_after_crash(ti_id, exc)
        finally:
            with self._lock:
                self._running.discard(ti_id)
            self.events.emit(ev.HUB_TASK_FINISHED, ti_id=ti_id)

    def _run_one(self, ti_id: int) -> None:
        with transaction(self.sessions) as session:
            ti = session.get(TaskInstance, ti_id)
            if ti is None or ti.state != TaskState.QUEUED:
                return
            run = session.get(DagRun, ti.run_pk)
            assert run is not None
            ti.state, ti.started_at = TaskState.RUNNING, utcnow(self.clock)
            context = TaskContext(self.sessions, ti)
            kwargs = {"ti": context, "dag_run": {"run_id": run.run_id, "dag_id": run.dag_id, "conf": dict(run.conf)},
                      "conf": dict(run.conf), "params": dict(run.conf), "run_id": run.run_id, "dag_id": run.dag_id,
                      "logical_date": run.logical_date, "ds": run.logical_date.date().isoformat()}
        task = self.dagbag.dags.get(context.dag_id)
        operator = task.tasks.get(context.task_id) if task else None
        success, output, error = False, None, None
        if not isinstance(operator, PythonOperator):
            error = {"code": "task_not_loaded", "message": f"hub task {context.dag_id}.{context.task_id} is not in the loaded DAG files (see import errors)", "retryable": False}
        else:
            success, output, error = self._call(operator.python_callable, {**kwargs, **operator.op_kwargs})
        with transaction(self.sessions) as session:
            ti = session.get(TaskInstance, ti_id)
            if ti is None or ti.state != TaskState.RUNNING or ti.try_number != context.try_number:
                return  # cleared or marked meanwhile: the operator's decision stands
            finish_try(ti, success=success, now=utcnow(self.clock), output=output, error=error)

    def _fail_after_crash(self, ti_id: int, exc: Exception) -> None:
        """Never leave a try running: record the executor's own failure."""
        try:
            with transaction(self.sessions) as session:
                ti = session.get(TaskInstance, ti_id)
                if ti is not None and ti.state == TaskState.RUNNING:
                    error = {"code": "executor_error", "message": f"{type(exc).__name__}: {exc}", "retryable": True}
                    finish_try(ti, success=False, now=utcnow(self.clock), error=error)
        except Exception:
            log.exception("hub task %s: could not record the failure; it is adopted at the next start", ti_id)

    @staticmethod
    def _call(fn: Callable[..., Any], available: dict[str, Any]) -> tuple[bool, Any, dict[str, Any] | None]:
        try:
            signature = inspect.signature(fn)
            takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
            kwargs = available if takes_all else {k: v for k, v in available.items() if k in signature.parameters}
            output = fn(**kwargs)
        except (Exception, SystemExit) as exc:  # DAG code may even call sys.exit(); the task fails, the hub stays
            log.warning("hub task raised %s: %s", type(exc).__name__, exc)
            return False, None, {"code": "exception", "message": f"{type(exc).__name__}: {exc}", "retryable": True}
        try:
            size = len(json.dumps(output))
        except (TypeError, ValueError, RecursionError) as exc:
            return False, None, {"code": "output_not_json", "message": f"the return value is not JSON: {exc}", "retryable": False}
        if size > MAX_OUTPUT_BYTES:
            return False, None, {"code": "output_too_large", "message": f"the return value is {size} bytes, over {MAX_OUTPUT_BYTES}", "retryable": False}
        return True, output, None


