"""The DAG authoring API, in Airflow's words.

A DAG file is ordinary Python that builds ``DAG`` objects::

    from hub.dag import DAG, AgentOperator, PythonOperator, every_agent

    with DAG("fleet_health", schedule="@daily") as dag:
        collect = AgentOperator(task_id="collect", job_type="diagnostics.collect",
                                target=every_agent())
        summary = PythonOperator(task_id="summarise", python_callable=summarise)
        collect >> summary

Hub tasks (``PythonOperator``) run Python on the hub. Agent tasks
(``AgentOperator``) name a job type installed on devices, with JSON
parameters: devices never receive code.
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hub.errors import InvalidDag

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
_current_dag: contextvars.ContextVar[DAG | None] = contextvars.ContextVar("outpost_current_dag", default=None)

TRIGGER_RULES = frozenset(
    {
        "all_success", "all_failed", "all_done", "all_skipped", "one_success", "one_failed", "one_done",
        "none_failed", "none_failed_min_one_success", "none_skipped", "always",
    }
)


@dataclass(frozen=True)
class Target:
    """Where an agent task runs: ``agent`` (one named device), ``any`` (one
    healthy device matching the labels, least loaded first) or ``all`` (one
    task instance per matching device: a fleet fan-out)."""

    mode: str
    agent_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "agent_id": self.agent_id, "labels": dict(self.labels)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        return cls(data["mode"], data.get("agent_id"), dict(data.get("labels") or {}))


def on_agent(agent_id: str) -> Target:
    return Target("agent", agent_id=agent_id)


def any_agent(**labels: str) -> Target:
    return Target("any", labels=labels)


def every_agent(**labels: str) -> Target:
    return Target("all", labels=labels)


class BaseOperator:
    kind = "base"

    def __init__(
        self,
        task_id: str,
        *,
        dag: DAG | None = None,
        trigger_rule: str = "all_success",
        retries: int | None = None,
        retry_delay: timedelta | float | None = None,
        execution_timeout: timedelta | float | None = None,
        doc_md: str | None = None,
    ) -> None:
        if not isinstance(task_id, str) or not _ID_RE.fullmatch(task_id):
            raise InvalidDag(f"invalid task_id {task_id!r}: use letters, digits, '_', '.', '-' (max 250)")
        if trigger_rule not in TRIGGER_RULES:
            raise InvalidDag(f"task {task_id!r}: unknown trigger_rule {trigger_rule!r}; one of {', '.join(sorted(TRIGGER_RULES))}")
        self.task_id = task_id
        self.trigger_rule = trigger_rule
        self.doc_md = doc_md
        self.upstream_task_ids: set[str] = set()
        self.downstream_task_ids: set[str] = set()
        self.dag = dag or _current_dag.get()
        if self.dag is None:
            raise InvalidDag(f"task {task_id!r} is not in a DAG: create it inside 'with DAG(...)' or pass dag=")
        defaults = self.dag.default_args
        self.retries = int(retries if retries is not None else defaults.get("retries", 0))
        self.retry_delay = _seconds(retry_delay if retry_delay is not None else defaults.get("retry_delay", 10.0))
        timeout = execution_timeout if execution_timeout is not None else defaults.get("execution_timeout")
        self.execution_timeout = None if timeout is None else _seconds(timeout)
        self.dag.add_task(self)

    # --- dependencies ------------------------------------------------------

    def set_downstream(self, other: BaseOperator | Sequence[BaseOperator]) -> None:
        for task in _as_list(other):
            if task.dag is not self.dag:
                raise InvalidDag(f"cannot link {self.task_id!r} to {task.task_id!r}: they are in different DAGs")
            self.downstream_task_ids.add(task.task_id)
            task.upstream_task_ids.add(self.task_id)

    def set_upstream(self, other: BaseOperator | Sequence[BaseOperator]) -> None:
        for task in _as_list(other):
            task.set_downstream(self)

    def __rshift__(self, other: Any) -> Any:
        self.set_downstream(other)
        return other

    def __lshift__(self, other: Any) -> Any:
        self.set_upstream(other)
        return other

    def __rrshift__(self, other: Any) -> BaseOperator:
        self.set_upstream(other)
        return self

    def __rlshift__(self, other: Any) -> BaseOperator:
        self.set_downstream(other)
        return self

    def serialize(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "kind": self.kind,
            "upstream": sorted(self.upstream_task_ids),
            "trigger_rule": self.trigger_rule,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "execution_timeout": self.execution_timeout,
            "doc_md": self.doc_md,
        }


class PythonOperator(BaseOperator):
    """Runs ``python_callable`` on the hub. It receives, by parameter name,
    any of ``ti``, ``dag_run``, ``params``, ``conf``, ``run_id``, ``dag_id``,
    ``logical_date``, ``ds`` and its ``op_kwargs``; its return value (JSON)
    becomes the task's output, which downstream tasks read with
    ``ti.xcom_pull(task_ids=...)``."""

    kind = "hub"

    def __init__(self, task_id: str, *, python_callable: Callable[..., Any], op_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not callable(python_callable):
            raise InvalidDag(f"task {task_id!r}: python_callable is not callable")
        self.python_callable = python_callable
        self.op_kwargs = dict(op_kwargs or {})
        super().__init__(task_id, **kwargs)

    def serialize(self) -> dict[str, Any]:
        return {**super().serialize(), "callable": getattr(self.python_callable, "__qualname__", repr(self.python_callable))}


class AgentOperator(BaseOperator):
    """Runs the registered job type ``job_type`` with JSON ``params`` on the
    device(s) chosen by ``target`` (default: any agent that has the job type)."""

    kind = "agent"

    def __init__(self, task_id: str, *, job_type: str, params: dict[str, Any] | None = None, target: Target | None = None, **kwargs: Any) -> None:
        if not isinstance(job_type, str) or not job_type:
            raise InvalidDag(f"task {task_id!r}: job_type must be a non-empty string")
        try:
            json.dumps(params or {})
        except (TypeError, ValueError) as exc:
            raise InvalidDag(f"task {task_id!r}: params must be JSON-serialisable: {exc}") from None
        self.job_type = job_type
        self.params = dict(params or {})
        self.target = target or any_agent()
        if self.target.mode not in ("agent", "any", "all") or (self.target.mode == "agent" and not self.target.agent_id):
            raise InvalidDag(f"task {task_id!r}: invalid target {self.target!r}")
        super().__init__(task_id, **kwargs)

    def serialize(self) -> dict[str, Any]:
        return {**super().serialize(), "job_type": self.job_type, "params": self.params, "target": self.target.to_dict()}


class DAG:
    def __init__(
        self,
        dag_id: str,
        *,
        schedule: str | None = None,
        start_date: datetime | None = None,
        description: str | None = None,
        tags: Iterable[str] = (),
        default_args: dict[str, Any] | None = None,
        catchup: bool = False,
        is_paused_upon_creation: bool = False,
        doc_md: str | None = None,
    ) -> None:
        if not isinstance(dag_id, str) or not _ID_RE.fullmatch(dag_id):
            raise InvalidDag(f"invalid dag_id {dag_id!r}: use letters, digits, '_', '.', '-' (max 250)")
        if start_date is not None and start_date.tzinfo is None:
            raise InvalidDag(f"DAG {dag_id!r}: start_date must be timezone-aware")
        self.dag_id = dag_id
        self.schedule = schedule
        self.start_date = start_date
        self.description = description
        self.tags = list(tags)
        self.default_args = dict(default_args or {})
        self.catchup = catchup
        self.is_paused_upon_creation = is_paused_upon_creation
        self.doc_md = doc_md
        self.tasks: dict[str, BaseOperator] = {}
        self.fileloc = ""
        self._token: contextvars.Token[DAG | None] | None = None

    def __enter__(self) -> DAG:
        self._token = _current_dag.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current_dag.reset(self._token)
            self._token = None

    def add_task(self, task: BaseOperator) -> None:
        if task.task_id in self.tasks:
            raise InvalidDag(f"DAG {self.dag_id!r} has two tasks named {task.task_id!r}")
        self.tasks[task.task_id] = task

    def topological_order(self) -> list[str]:
        """Task ids, upstream first. Raises ``InvalidDag`` naming a cycle."""
        order: list[str] = []
        state: dict[str, int] = {}  # 1 visiting, 2 done

        def visit(task_id: str, path: list[str]) -> None:
            if state.get(task_id) == 2:
                return
            if state.get(task_id) == 1:
                cycle = path[path.index(task_id):] + [task_id]
                raise InvalidDag(f"DAG {self.dag_id!r} has a cycle: {' >> '.join(reversed(cycle))}")
            state[task_id] = 1
            for upstream in sorted(self.tasks[task_id].upstream_task_ids):
                visit(upstream, [*path, task_id])
            state[task_id] = 2
            order.append(task_id)

        for task_id in sorted(self.tasks):
            visit(task_id, [])
        return order

    def validate(self) -> None:
        if not self.tasks:
            raise InvalidDag(f"DAG {self.dag_id!r} has no tasks")
        self.topological_order()

    def serialize(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            "schedule": self.schedule,
            "start_date": self.start_date.isoformat() if self.start_date else None,
            "catchup": self.catchup,
            "doc_md": self.doc_md,
            "tasks": [self.tasks[t].serialize() for t in self.topological_order()],
        }


def chain(*tasks: BaseOperator | Sequence[BaseOperator]) -> None:
    """``chain(a, b, c)`` is ``a >> b >> c``; lists fan out and in."""
    for left, right in zip(tasks, tasks[1:]):
        for task in _as_list(left):
            task.set_downstream(right)


def _as_list(value: BaseOperator | Sequence[BaseOperator]) -> list[BaseOperator]:
    return [value] if isinstance(value, BaseOperator) else list(value)


def _seconds(value: timedelta | float | int) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
