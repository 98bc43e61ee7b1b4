"""The DAG authoring API, in Airflow's words.

A DAG file is ordinary Python that builds ``DAG`` objects::

    from hub.dag import DAG, AgentOperator, PythonOperator, every_agent

    with DAG("fleet_health", schedule="@daily") as dag:
        collect = AgentOperator(task_id="collect", job_type="diagnostics.collect",
                                target=every_agent())
        summary = PythonOperator(task_id="summarise", python_callable=summarise)
        collect >> summary

or, in the TaskFlow style, with ``@dag`` and ``@task`` from ``hub.taskflow``.

Hub tasks (``PythonOperator``, sensors, branches, any ``BaseOperator``
subclass with an ``execute``) run Python in the hub's workers. Agent tasks
(``AgentOperator``) name a job type installed on devices, with JSON
parameters: devices never receive code.

Everything the scheduler needs is in ``DAG.serialize()``: the hub process
never imports DAG files, so every behaviour that matters for scheduling
(branching, short-circuits, sensors, templates of agent tasks) is data there.
"""

from __future__ import annotations

import contextvars
import copy
from contextlib import contextmanager
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from hub import templating
from hub.errors import InvalidDag
from hub.rollout_policy import Rollout
from hub.targeting import Selector
from hub.params import Param, ParamsDict
from hub.assets import check_uri
from hub.timetables import dag_schedule_options, serialize_dag_schedule
from hub.scheduling_options import dag_options, serialize_dag_options, serialize_task_options, task_options
from shared.clock import SystemClock, utcnow

_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
_current_dag: contextvars.ContextVar[DAG | None] = contextvars.ContextVar("outpost_current_dag", default=None)
_current_group: contextvars.ContextVar[TaskGroup | None] = contextvars.ContextVar("outpost_current_group", default=None)
_captured: contextvars.ContextVar[list[DAG] | None] = contextvars.ContextVar("outpost_captured_dags", default=None)

TRIGGER_RULES = frozenset(
    {
        "all_success", "all_failed", "all_done", "all_skipped", "one_success", "one_failed", "one_done",
        "none_failed", "none_failed_min_one_success", "none_skipped", "always",
    }
)

__all__ = [
    "DAG", "BaseOperator", "PythonOperator", "AgentOperator", "EmptyOperator", "BaseBranchOperator", "BranchPythonOperator",
    "ShortCircuitOperator", "BaseSensorOperator", "PythonSensor", "PokeReturnValue", "TaskGroup", "XComArg", "Param",
    "Target", "Rollout", "on_agent", "any_agent", "every_agent", "chain", "cross_downstream",
    "TaskSkipped", "TaskRescheduled", "TaskFailedNoRetry", "SensorTimeout",
    "AirflowSkipException", "AirflowFailException", "AirflowSensorTimeout",
]


# --- control flow raised by hub tasks (the executor maps them to states) ------


class TaskSkipped(Exception):
    """The task ends SKIPPED (Airflow's ``AirflowSkipException``)."""


class TaskFailedNoRetry(Exception):
    """The task ends FAILED, whatever retries are left (``AirflowFailException``)."""


class SensorTimeout(TaskFailedNoRetry):
    """A sensor waited longer than its ``timeout`` (``AirflowSensorTimeout``):
    FAILED without retry. With ``soft_fail`` the sensor raises
    ``TaskSkipped`` instead."""


class TaskRescheduled(Exception):
    """A sensor in reschedule mode gives its worker slot back: the task
    becomes UP_FOR_RESCHEDULE until ``reschedule_at``, and runs again in
    the same try (the try number is not consumed)."""

    def __init__(self, reschedule_at: datetime) -> None:
        super().__init__(f"reschedule at {reschedule_at.isoformat()}")
        self.reschedule_at = reschedule_at


# Airflow's names, so a ported DAG file changes its imports only.
AirflowSkipException = TaskSkipped
AirflowFailException = TaskFailedNoRetry
AirflowSensorTimeout = SensorTimeout


# --- agent targets --------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where an agent task runs: ``agent`` (one named device), ``any`` (one
    healthy device matching the labels, least loaded first) or ``all`` (one
    task instance per matching device: a fleet fan-out). A fan-out may
    also select by ``groups`` (any of), ``hardware`` models (any of) and a
    ``firmware`` version range (``">=1.0,<2.0"``): ``hub.targeting.Selector``."""

    mode: str
    agent_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    groups: tuple[str, ...] = ()
    hardware: tuple[str, ...] = ()
    firmware: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"mode": self.mode, "agent_id": self.agent_id, "labels": dict(self.labels)}
        # Only when set, so a plain target serializes as before (same DAG version hash).
        if self.groups or self.hardware or self.firmware:
            data.update(groups=list(self.groups), hardware=list(self.hardware), firmware=self.firmware)
        return data

    def selector(self) -> Selector:
        """Raises ``ValueError`` for a malformed selector."""
        return Selector.from_dict({"labels": dict(self.labels), "groups": list(self.groups), "hardware": list(self.hardware), "firmware": self.firmware})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Target:
        return cls(data["mode"], data.get("agent_id"), dict(data.get("labels") or {}), tuple(data.get("groups") or ()),
                   tuple(data.get("hardware") or ()), data.get("firmware"))


def on_agent(agent_id: str) -> Target:
    return Target("agent", agent_id=agent_id)


def any_agent(**labels: str) -> Target:
    return Target("any", labels=labels)


def every_agent(*, groups: Iterable[str] = (), hardware: Iterable[str] = (), firmware: str | None = None, **labels: str) -> Target:
    """Every device with these labels (and, when given, in one of ``groups``,
    of one of the ``hardware`` models, with firmware in the ``firmware``
    range). Raises ``InvalidDag`` for a malformed selector."""
    groups_, hardware_ = (tuple([v] if isinstance(v, str) else v) for v in (groups, hardware))
    target = Target("all", labels=labels, groups=tuple(sorted(set(groups_))), hardware=tuple(sorted(set(hardware_))), firmware=firmware)
    try:
        target.selector()
    except (ValueError, TypeError) as exc:
        raise InvalidDag(f"every_agent(): {exc}") from None
    return target


# --- dependencies ----------------------------------------------------------------


class DependencyMixin:
    """``>>``, ``<<`` and ``set_upstream``/``set_downstream`` between tasks,
    XCom references (their task) and task groups (their roots and leaves)."""

    def _roots(self) -> list[BaseOperator]:
        """The tasks an edge into this node lands on."""
        raise NotImplementedError

    def _leaves(self) -> list[BaseOperator]:
        """The tasks an edge out of this node starts from."""
        raise NotImplementedError

    def set_downstream(self, other: Any) -> None:
        targets = [root for node in _nodes(other) for root in node._roots()]
        for leaf in self._leaves():
            for root in targets:
                leaf._link(root)

    def set_upstream(self, other: Any) -> None:
        for node in _nodes(other):
            node.set_downstream(self)

    def __rshift__(self, other: Any) -> Any:
        self.set_downstream(other)
        return other

    def __lshift__(self, other: Any) -> Any:
        self.set_upstream(other)
        return other

    def __rrshift__(self, other: Any) -> Any:
        self.set_upstream(other)
        return self

    def __rlshift__(self, other: Any) -> Any:
        self.set_downstream(other)
        return self


def _nodes(value: Any) -> list[DependencyMixin]:
    if isinstance(value, DependencyMixin):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [node for item in value for node in _nodes(item)]
    raise InvalidDag(f"cannot make a dependency with {type(value).__name__} {value!r}: use tasks, task groups, XComArgs or lists of them")


# --- lazy values: XCom references and @dag params -------------------------------


class XComArg(DependencyMixin):
    """A task's XCom (default ``return_value``) to be read at run time:
    ``task.output``, ``task.output["key"]`` or what calling a ``@task``
    function returns. Passing it as an argument makes its task an upstream."""

    __outpost_lazy__ = True

    def __init__(self, operator: BaseOperator, key: str = "return_value") -> None:
        self.operator = operator
        self.key = key

    def _roots(self) -> list[BaseOperator]:
        return [self.operator]

    def _leaves(self) -> list[BaseOperator]:
        return [self.operator]

    def __getitem__(self, key: str) -> XComArg:
        if not isinstance(key, str):
            raise InvalidDag(f"XCom keys are strings, not {key!r}")
        return XComArg(self.operator, key)

    def __iter__(self) -> Any:
        raise InvalidDag(f"the output of {self.operator.task_id!r} is only known at run time: it cannot be iterated in the DAG file (map over it with .expand())")

    def resolve(self, context: dict[str, Any]) -> Any:
        return context["ti"].xcom_pull(task_ids=self.operator.task_id, key=self.key)

    def to_placeholder(self) -> dict[str, Any]:
        return {templating.XCOM_MARK: {"task_id": self.operator.task_id, "key": self.key}}

    def __repr__(self) -> str:
        return f"XComArg({self.operator.task_id!r}, {self.key!r})"


class DagParam:
    """A parameter of a ``@dag`` function: the run's value of that DAG param."""

    __outpost_lazy__ = True

    def __init__(self, name: str) -> None:
        self.name = name

    def resolve(self, context: dict[str, Any]) -> Any:
        return context["params"][self.name]

    def to_placeholder(self) -> dict[str, Any]:
        return {templating.PARAM_MARK: self.name}

    def __repr__(self) -> str:
        return f"DagParam({self.name!r})"


def _lazy_values(value: Any) -> Iterable[Any]:
    if getattr(value, "__outpost_lazy__", False):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _lazy_values(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _lazy_values(item)


# --- task groups ---------------------------------------------------------------------


class TaskGroup(DependencyMixin):
    """Airflow's ``TaskGroup``: tasks created inside ``with TaskGroup("g"):``
    get ids ``"g.task"`` (nested: ``"outer.inner.task"``) and the group's
    ``default_args`` over the DAG's. ``group >> task`` links the group's
    leaves; ``task >> group`` links to its roots."""

    def __init__(
        self,
        group_id: str | None,
        *,
        prefix_group_id: bool = True,
        parent_group: TaskGroup | None = None,
        dag: DAG | None = None,
        default_args: dict[str, Any] | None = None,
        tooltip: str = "",
        add_suffix_on_collision: bool = False,
    ) -> None:
        self.children: dict[str, BaseOperator | TaskGroup] = {}
        self.default_args = dict(default_args or {})
        self.tooltip = tooltip
        self.prefix_group_id = prefix_group_id
        self._token: contextvars.Token[TaskGroup | None] | None = None
        if group_id is None:  # the DAG's root group
            if dag is None:
                raise InvalidDag("the root task group needs its DAG")
            self.dag, self.parent_group, self.group_id, self.label = dag, None, None, None
            return
        if not isinstance(group_id, str) or not _ID_RE.fullmatch(group_id):
            raise InvalidDag(f"invalid group_id {group_id!r}: use letters, digits, '_', '.', '-' (max 250)")
        parent = parent_group or _current_group.get()
        owner = dag or (parent.dag if parent else None) or _current_dag.get()
        if owner is None:
            raise InvalidDag(f"task group {group_id!r} is not in a DAG: create it inside 'with DAG(...)' or pass dag=")
        if parent is None or parent.dag is not owner:
            parent = owner.task_group
        self.dag, self.parent_group, self.label = owner, parent, group_id
        full = parent.child_id(group_id)
        if add_suffix_on_collision:
            full = _unique_id(full, set(owner.task_group_dict) | set(owner.tasks))
            self.label = full.rsplit(".", 1)[-1] if parent.group_id and parent.prefix_group_id else full
        if full in owner.task_group_dict or full in owner.tasks:
            raise InvalidDag(f"DAG {owner.dag_id!r} has two task groups or tasks named {full!r}")
        self.group_id = full
        owner.task_group_dict[full] = self
        parent.children[full] = self

    @property
    def is_root(self) -> bool:
        return self.group_id is None

    def child_id(self, label: str) -> str:
        return f"{self.group_id}.{label}" if self.group_id and self.prefix_group_id else label

    def lineage(self) -> list[TaskGroup]:
        """This group and its parents, outermost first (root excluded)."""
        chain_: list[TaskGroup] = []
        group: TaskGroup | None = self
        while group is not None and not group.is_root:
            chain_.append(group)
            group = group.parent_group
        return chain_[::-1]

    def iter_tasks(self) -> Iterable[BaseOperator]:
        for child in self.children.values():
            if isinstance(child, TaskGroup):
                yield from child.iter_tasks()
            else:
                yield child

    def _roots(self) -> list[BaseOperator]:
        tasks = list(self.iter_tasks())
        ids = {t.task_id for t in tasks}
        return [t for t in tasks if not t.upstream_task_ids & ids]

    def _leaves(self) -> list[BaseOperator]:
        tasks = list(self.iter_tasks())
        ids = {t.task_id for t in tasks}
        return [t for t in tasks if not t.downstream_task_ids & ids]

    def __enter__(self) -> TaskGroup:
        self._token = _current_group.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _current_group.reset(self._token)
            self._token = None

    def __repr__(self) -> str:
        return f"TaskGroup({self.group_id!r})"


def _unique_id(candidate: str, taken: set[str]) -> str:
    """Airflow's ``get_unique_task_id``: ``name``, ``name__1``, ``name__2``..."""
    if candidate not in taken:
        return candidate
    base = re.sub(r"__\d+$", "", candidate)
    n = 1
    while f"{base}__{n}" in taken:
        n += 1
    return f"{base}__{n}"


# --- operators -------------------------------------------------------------------------

#: Arguments default_args never fill: they identify the task or mean
#: something else per operator (an agent task's ``params`` are its job's).
_NOT_DEFAULTABLE = frozenset({"self", "task_id", "dag", "task_group", "params", "python_callable", "job_type"})


@functools.cache
def _init_arguments(cls: type) -> frozenset[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD):
                names.add(p.name)
    return frozenset(names - _NOT_DEFAULTABLE)


def _apply_defaults(init: Callable[..., None]) -> Callable[..., None]:
    """Airflow's ``default_args``: every constructor argument of the operator
    that was not given explicitly takes the DAG's, then the enclosing task
    groups' (innermost wins), then the operator's own ``default_args=``."""

    @functools.wraps(init)
    def wrapper(self: BaseOperator, *args: Any, **kwargs: Any) -> None:
        if "_default_args" not in self.__dict__:  # only the outermost constructor
            own = kwargs.pop("default_args", None) or {}
            group = kwargs.get("task_group") or _current_group.get()
            dag = kwargs.get("dag") or (group.dag if group is not None else None) or _current_dag.get()
            merged: dict[str, Any] = dict(dag.default_args) if dag is not None else {}
            if group is not None and (dag is None or group.dag is dag):
                for g in group.lineage():
                    merged.update(g.default_args)
            merged.update(own)
            self.__dict__["_default_args"] = merged
            for name in _init_arguments(type(self)) & merged.keys():
                if name not in kwargs:
                    kwargs[name] = merged[name]
        init(self, *args, **kwargs)

    return wrapper


class BaseOperator(DependencyMixin):
    """A task. Subclasses run on the hub by implementing ``execute(context)``
    (its return value is the task's XCom ``return_value``: JSON only, at most
    1 MiB) and name their ``template_fields``."""

    kind = "hub"
    #: Attributes rendered as Jinja templates (sandboxed) before ``execute``.
    template_fields: Sequence[str] = ()
    is_branch = False
    short_circuit = False
    ignore_downstream_trigger_rules = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _apply_defaults(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(
        self,
        task_id: str,
        *,
        dag: DAG | None = None,
        task_group: TaskGroup | None = None,
        trigger_rule: str = "all_success",
        retries: int | None = None,
        retry_delay: timedelta | float | None = None,
        execution_timeout: timedelta | float | None = None,
        doc_md: str | None = None,
        doc: str | None = None,
        owner: str = "outpost",
        multiple_outputs: bool = False,
        do_xcom_push: bool = True,
        outlets: Iterable[Any] | None = None,
        inlets: Iterable[Any] | None = None,
        pool: str | None = None,
        pool_slots: int | None = None,
        priority_weight: int | None = None,
        weight_rule: str | None = None,
        depends_on_past: bool | None = None,
        retry_exponential_backoff: bool | None = None,
        max_retry_delay: timedelta | float | None = None,
        sla: timedelta | float | None = None,
        on_success_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
        on_failure_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
        on_retry_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
        on_execute_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
        max_active_tis_per_dag: int | None = None,
        max_active_tis_per_dagrun: int | None = None,
        wait_for_downstream: bool | None = None,
    ) -> None:
        self.__dict__.setdefault("_default_args", {})
        if not isinstance(task_id, str) or not _ID_RE.fullmatch(task_id):
            raise InvalidDag(f"invalid task_id {task_id!r}: use letters, digits, '_', '.', '-' (max 250)")
        if trigger_rule not in TRIGGER_RULES:
            raise InvalidDag(f"task {task_id!r}: unknown trigger_rule {trigger_rule!r}; one of {', '.join(sorted(TRIGGER_RULES))}")
        group = task_group if task_group is not None else _current_group.get()
        self.dag = dag or (group.dag if group is not None else None) or _current_dag.get()
        if self.dag is None:
            raise InvalidDag(f"task {task_id!r} is not in a DAG: create it inside 'with DAG(...)' or pass dag=")
        if group is None or group.dag is not self.dag:
            group = self.dag.task_group
        task_id = group.child_id(task_id)
        if len(task_id) > 250:
            raise InvalidDag(f"task id {task_id!r} is longer than 250 characters")
        self.task_id = task_id
        self.task_group: TaskGroup | None = None if group.is_root else group
        self.trigger_rule = trigger_rule
        self.doc_md = doc_md if doc_md is not None else doc
        self.owner = owner
        self.multiple_outputs = bool(multiple_outputs)
        self.do_xcom_push = bool(do_xcom_push)
        self.outlets = _asset_uris(task_id, "outlets", outlets)
        self.inlets = _asset_uris(task_id, "inlets", inlets)
        self.upstream_task_ids: set[str] = set()
        self.downstream_task_ids: set[str] = set()
        defaults = self.__dict__["_default_args"] or self.dag.default_args
        self.retries = int(retries if retries is not None else defaults.get("retries", 0))
        self.retry_delay = _seconds(retry_delay if retry_delay is not None else defaults.get("retry_delay", 10.0))
        timeout = execution_timeout if execution_timeout is not None else defaults.get("execution_timeout")
        self.execution_timeout = None if timeout is None else _seconds(timeout)
        # Pools, priority, depends_on_past, backoff, SLA, callbacks (hub.scheduling_options).
        scheduling = {
            "pool": pool, "pool_slots": pool_slots, "priority_weight": priority_weight, "weight_rule": weight_rule,
            "depends_on_past": depends_on_past, "retry_exponential_backoff": retry_exponential_backoff,
            "max_retry_delay": max_retry_delay, "sla": sla, "on_success_callback": on_success_callback,
            "on_failure_callback": on_failure_callback, "on_retry_callback": on_retry_callback, "on_execute_callback": on_execute_callback,
            "max_active_tis_per_dag": max_active_tis_per_dag, "max_active_tis_per_dagrun": max_active_tis_per_dagrun,
            "wait_for_downstream": wait_for_downstream,
        }
        for name, value in task_options(task_id, scheduling, defaults).items():
            setattr(self, name, value)
        self.dag.add_task(self)
        group.children[task_id] = self
        self.__dict__["_in_dag"] = True
        for name in self.template_fields:
            if name in self.__dict__:
                self._link_lazy(self.__dict__[name])

    def __setattr__(self, name: str, value: Any) -> None:
        # Airflow links an XComArg given to a templated field even when the
        # subclass sets the field after calling BaseOperator.__init__.
        super().__setattr__(name, value)
        if self.__dict__.get("_in_dag") and name in self.template_fields:
            self._link_lazy(value)

    def _link_lazy(self, value: Any) -> None:
        for lazy in _lazy_values(value):
            if isinstance(lazy, XComArg):
                lazy.operator.set_downstream(self)

    # --- dependencies ------------------------------------------------------

    def _roots(self) -> list[BaseOperator]:
        return [self]

    def _leaves(self) -> list[BaseOperator]:
        return [self]

    def _link(self, task: BaseOperator) -> None:
        if task.dag is not self.dag:
            raise InvalidDag(f"cannot link {self.task_id!r} to {task.task_id!r}: they are in different DAGs")
        if task is self:
            raise InvalidDag(f"task {self.task_id!r} cannot depend on itself")
        self.downstream_task_ids.add(task.task_id)
        task.upstream_task_ids.add(self.task_id)

    @property
    def output(self) -> XComArg:
        """The task's return value, resolved at run time."""
        return XComArg(self)

    @property
    def dag_id(self) -> str:
        return self.dag.dag_id

    # --- dynamic task mapping (MAP; the logic lives in hub/mapping.py) -----

    #: Set by ``expand()``: a ``hub.mapping.Mapping``, None for an ordinary task.
    mapping: Any = None

    @classmethod
    def partial(cls, **kwargs: Any) -> Any:
        """Airflow's ``partial()``: the arguments every mapped instance shares;
        ``.expand(arg=[...])`` on the result names the mapped ones."""
        from hub.mapping import OperatorPartial  # hub.mapping builds on this module

        return OperatorPartial(cls, kwargs)

    @property
    def is_mapped(self) -> bool:
        return self.mapping is not None

    # --- end of dynamic task mapping ----------------------------------------

    # --- running (in a hub worker) ------------------------------------------

    def execute(self, context: dict[str, Any]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement execute(context)")

    def render_template_fields(self, context: dict[str, Any]) -> BaseOperator:
        """A copy of this task with its ``template_fields`` rendered for one
        try (the DAG's objects are shared by every run a worker executes, so
        they are never changed). The copy's ``rendered_fields`` is the JSON
        to store in ``task_instances.rendered_fields``. Raises
        ``templating.TemplateError``."""
        env = templating.environment(bool(getattr(self.dag, "render_template_as_native_obj", False)))
        rendered = copy.copy(self)
        values: dict[str, Any] = {}
        for name in self.template_fields:
            try:
                value = templating.render(getattr(self, name), context, env)
            except templating.TemplateError as exc:
                raise templating.TemplateError(f"task {self.task_id!r}, field {name!r}: {exc}") from None
            rendered.__dict__[name] = value
            values[name] = templating.jsonable(value)
        rendered.__dict__["rendered_fields"] = values
        return rendered

    # --- structure -----------------------------------------------------------

    def serialize(self) -> dict[str, Any]:
        templates = {name: templating.to_template_json(getattr(self, name, None), strict=False) for name in self.template_fields}
        refs: dict[str, dict[str, str]] = {}
        for name, value in templates.items():
            for path, ref in templating.xcom_refs(value).items():
                refs[name if path == "." else f"{name}.{path}"] = ref
        return {
            "task_id": self.task_id,
            "kind": self.kind,
            "operator": type(self).__name__,
            "upstream": sorted(self.upstream_task_ids),
            "trigger_rule": self.trigger_rule,
            "retries": self.retries,
            "retry_delay": self.retry_delay,
            "execution_timeout": self.execution_timeout,
            "doc_md": self.doc_md,
            "task_group": self.task_group.group_id if self.task_group is not None else None,
            "templates": templates,
            "xcom_args": refs,
            "is_branch": self.is_branch,
            "short_circuit": self.short_circuit,
            "ignore_downstream_trigger_rules": self.ignore_downstream_trigger_rules,
            "sensor": None,
            "multiple_outputs": self.multiple_outputs,
            "outlets": self.outlets,
            "inlets": self.inlets,
            "mapped": self.mapping.serialize() if self.mapping is not None else None,
            **serialize_task_options(self),
        }

    def __repr__(self) -> str:
        return f"<Task({type(self).__name__}): {self.task_id}>"


BaseOperator.__init__ = _apply_defaults(BaseOperator.__init__)  # type: ignore[method-assign]


def _asset_uris(task_id: str, name: str, values: Iterable[Any] | None) -> list[str]:
    """Outlets/inlets as URIs: strings, or asset objects with a ``uri``."""
    if values is None:
        return []
    if isinstance(values, str) or hasattr(values, "uri"):
        values = [values]
    uris = []
    for value in values:
        uri = value if isinstance(value, str) else getattr(value, "uri", None)
        if not isinstance(uri, str) or not uri:
            raise InvalidDag(f"task {task_id!r}: {name} must be assets or asset URIs, not {value!r}")
        try:
            uris.append(check_uri(uri))
        except InvalidDag as exc:
            raise InvalidDag(f"task {task_id!r}: {name}: {exc}") from None
    return uris


def call_with_context(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any], context: dict[str, Any]) -> Any:
    """Call a DAG-file function Airflow's way: ``op_args`` positionally,
    ``op_kwargs`` by name, and any context entry (``ti``, ``params``, ``ds``...)
    its signature names; a ``**kwargs`` receives the whole context."""
    parameters = inspect.signature(fn).parameters
    positional = [p.name for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    taken = set(positional[: len(args)]) | set(kwargs)
    call_kwargs = dict(kwargs)
    takes_all = False
    for name, p in parameters.items():
        if p.kind is p.VAR_KEYWORD:
            takes_all = True
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in taken and name in context:
            call_kwargs[name] = context[name]
    if takes_all:
        for name, value in context.items():
            if name not in taken and name not in positional:
                call_kwargs.setdefault(name, value)
    return fn(*args, **call_kwargs)


class EmptyOperator(BaseOperator):
    """Does nothing (a join or a marker), like Airflow's ``EmptyOperator``."""

    def execute(self, context: dict[str, Any]) -> Any:
        return None


class PythonOperator(BaseOperator):
    """Runs ``python_callable`` on the hub with ``op_args`` and ``op_kwargs``
    (both templated, XComArgs allowed) and, by parameter name, any context
    entry (``ti``, ``dag_run``, ``params``, ``ds``, ``logical_date``...).
    Its return value (JSON) becomes the task's XCom ``return_value``; with
    ``multiple_outputs=True`` each key of a returned dict is also an XCom."""

    template_fields: Sequence[str] = ("templates_dict", "op_args", "op_kwargs")

    def __init__(
        self,
        task_id: str,
        *,
        python_callable: Callable[..., Any],
        op_args: Sequence[Any] | None = None,
        op_kwargs: dict[str, Any] | None = None,
        templates_dict: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(python_callable):
            raise InvalidDag(f"task {task_id!r}: python_callable is not callable")
        self.python_callable = python_callable
        self.op_args = list(op_args or [])
        self.op_kwargs = dict(op_kwargs or {})
        self.templates_dict = templates_dict
        super().__init__(task_id, **kwargs)

    def execute(self, context: dict[str, Any]) -> Any:
        return call_with_context(self.python_callable, self.op_args, self.op_kwargs, {**context, "templates_dict": self.templates_dict})

    def serialize(self) -> dict[str, Any]:
        return {**super().serialize(), "callable": getattr(self.python_callable, "__qualname__", repr(self.python_callable))}


class _BranchMixin:
    """What a branch returns: a task id, a task group id (its roots run) or a
    list of them; every other task directly downstream is skipped. ``None``
    skips them all."""

    is_branch = True
    task_id: str
    dag: DAG

    def _checked_branches(self, result: Any) -> Any:
        if result is None:
            return None
        ids = [result] if isinstance(result, str) else result
        if not isinstance(ids, (list, tuple, set)) or not all(isinstance(i, str) for i in ids):
            raise TypeError(f"branch {self.task_id!r} must return a task id, a task group id, a list of them or None; got {result!r}")
        unknown = sorted(i for i in ids if i not in self.dag.tasks and i not in self.dag.task_group_dict)
        if unknown:
            raise ValueError(f"branch {self.task_id!r} returned unknown task or group ids: {', '.join(unknown)}")
        return result if isinstance(result, str) else list(ids)


class BaseBranchOperator(_BranchMixin, BaseOperator):
    """Implement ``choose_branch(context)``."""

    def choose_branch(self, context: dict[str, Any]) -> str | Iterable[str] | None:
        raise NotImplementedError

    def execute(self, context: dict[str, Any]) -> Any:
        return self._checked_branches(self.choose_branch(context))


class BranchPythonOperator(_BranchMixin, PythonOperator):
    """``python_callable`` returns the task id(s) or group id(s) to follow."""

    def execute(self, context: dict[str, Any]) -> Any:
        return self._checked_branches(super().execute(context))


class ShortCircuitOperator(PythonOperator):
    """A falsy result of ``python_callable`` skips everything downstream
    (``ignore_downstream_trigger_rules=True``, the default) or only the
    direct downstream tasks, whose own downstream then follow their trigger
    rules (``False``). A truthy result lets the DAG go on."""

    short_circuit = True

    def __init__(self, task_id: str, *, ignore_downstream_trigger_rules: bool = True, **kwargs: Any) -> None:
        self.ignore_downstream_trigger_rules = bool(ignore_downstream_trigger_rules)
        super().__init__(task_id, **kwargs)


class AgentOperator(BaseOperator):
    """Runs the registered job type ``job_type`` with JSON ``params`` on the
    device(s) chosen by ``target`` (default: any agent that has the job type).
    ``params`` is templated and may hold XComArgs (``{"limit": t.output}``):
    the hub renders it right before each assignment."""

    kind = "agent"
    template_fields: Sequence[str] = ("params",)

    def __init__(
        self, task_id: str, *, job_type: str, params: dict[str, Any] | None = None, target: Target | None = None,
        offline_grace: timedelta | float | None = None, not_before: timedelta | float | str | datetime | None = None,
        deadline: timedelta | float | str | datetime | None = None, rollout: Rollout | None = None, **kwargs: Any,
    ) -> None:
        if not isinstance(job_type, str) or not job_type:
            raise InvalidDag(f"task {task_id!r}: job_type must be a non-empty string")
        if params is not None and not isinstance(params, dict):
            raise InvalidDag(f"task {task_id!r}: params must be a dict, not {type(params).__name__}")
        try:
            templating.to_template_json(params or {}, strict=True, where="params")
        except ValueError as exc:
            raise InvalidDag(f"task {task_id!r}: params must be JSON-serialisable: {exc}") from None
        self.job_type = job_type
        self.params = dict(params or {})
        self.target = target or any_agent()
        if not isinstance(self.target, Target) or self.target.mode not in ("agent", "any", "all") or (self.target.mode == "agent" and not self.target.agent_id):
            raise InvalidDag(f"task {task_id!r}: invalid target {self.target!r}")
        if rollout is not None and (not isinstance(rollout, Rollout) or self.target.mode != "all"):
            raise InvalidDag(f"task {task_id!r}: rollout= takes a Rollout(...) and needs target=every_agent(...)")
        self.rollout = rollout
        # Offline operation (docs/dags.md): how long the hub waits for an
        # offline device (None: the hub's default_offline_grace), and when the
        # device may start the job (scheduled ahead) and no longer start it.
        if offline_grace is not None and (isinstance(offline_grace, bool) or not isinstance(offline_grace, (timedelta, int, float)) or _seconds(offline_grace) < 0):
            raise InvalidDag(f"task {task_id!r}: offline_grace must be a timedelta or seconds >= 0, got {offline_grace!r}")
        self.offline_grace = None if offline_grace is None else _seconds(offline_grace)
        self.not_before = _window_time(task_id, "not_before", not_before)
        self.deadline = _window_time(task_id, "deadline", deadline)
        if isinstance(self.not_before, float) and isinstance(self.deadline, float) and self.deadline <= self.not_before:
            raise InvalidDag(f"task {task_id!r}: deadline ({self.deadline:g}s) must come after not_before ({self.not_before:g}s)")
        super().__init__(task_id, **kwargs)

    def params_are_literal(self) -> bool:
        """True when ``params`` is plain JSON (no template, no XComArg), so it
        can be checked against the job's schema when the file is parsed."""
        return not templating.has_templates(templating.to_template_json(self.params, strict=True))

    def serialize(self) -> dict[str, Any]:
        data = super().serialize()
        return {
            **data, "job_type": self.job_type, "params": data["templates"]["params"], "target": self.target.to_dict(),
            # The hub renders these params itself, so it needs the DAG's rendering mode.
            "render_native": bool(self.dag.render_template_as_native_obj),
            "offline_grace": self.offline_grace,
            "window": {k: v for k, v in (("not_before", self.not_before), ("deadline", self.deadline)) if v is not None},
            **({"rollout": self.rollout.to_dict()} if self.rollout is not None else {}),
        }


# --- sensors ----------------------------------------------------------------------------


class PokeReturnValue:
    """A poke's answer with a value: ``PokeReturnValue(True, xcom_value=...)``
    ends the sensor with ``xcom_value`` as its return value."""

    def __init__(self, is_done: bool, xcom_value: Any = None) -> None:
        self.is_done = bool(is_done)
        self.xcom_value = xcom_value

    def __bool__(self) -> bool:
        return self.is_done


class BaseSensorOperator(BaseOperator):
    """Waits for ``poke(context)`` to return True (or a done
    ``PokeReturnValue``). ``mode="poke"`` keeps its worker and pokes every
    ``poke_interval`` seconds; ``mode="reschedule"`` gives the worker back
    between pokes (``TaskRescheduled``). After ``timeout`` seconds, counted
    from the first poke of the try (``sensor_started_at``), it fails with
    ``SensorTimeout``, or is skipped with ``soft_fail``.
    ``exponential_backoff`` doubles the interval from poke to poke (with
    jitter), up to ``max_wait``."""

    def __init__(
        self,
        task_id: str,
        *,
        poke_interval: timedelta | float = 60.0,
        timeout: timedelta | float = 7 * 24 * 3600.0,
        mode: str = "poke",
        soft_fail: bool = False,
        exponential_backoff: bool = False,
        max_wait: timedelta | float | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in ("poke", "reschedule"):
            raise InvalidDag(f"task {task_id!r}: sensor mode must be 'poke' or 'reschedule', not {mode!r}")
        self.poke_interval = _seconds(poke_interval)
        self.timeout = _seconds(timeout)
        if self.poke_interval < 0 or self.timeout < 0:
            raise InvalidDag(f"task {task_id!r}: poke_interval and timeout must not be negative")
        self.mode = mode
        self.soft_fail = bool(soft_fail)
        self.exponential_backoff = bool(exponential_backoff)
        self.max_wait = None if max_wait is None else _seconds(max_wait)
        super().__init__(task_id, **kwargs)

    def poke(self, context: dict[str, Any]) -> bool | PokeReturnValue:
        raise NotImplementedError(f"{type(self).__name__} does not implement poke(context)")

    def execute(self, context: dict[str, Any]) -> Any:
        # The context may carry the hub's clock and a sleep (tests drive both).
        clock = context.get("clock") or SystemClock()
        sleep: Callable[[float], None] = context.get("sleep") or time.sleep
        started = context.get("sensor_started_at") or utcnow(clock)
        poke_count = self._pokes_before(started, utcnow(clock)) + 1
        while True:
            result = self.poke(context)
            if isinstance(result, PokeReturnValue):
                if result.is_done:
                    return result.xcom_value
            elif result:
                return None
            now = utcnow(clock)
            elapsed = (now - started).total_seconds()
            if elapsed > self.timeout:
                message = f"sensor {self.task_id!r} timed out after {elapsed:.0f}s (timeout {self.timeout:.0f}s)"
                if self.soft_fail:
                    raise TaskSkipped(message)
                raise SensorTimeout(message)
            interval = self.next_interval(poke_count, started, elapsed)
            if self.mode == "reschedule":
                raise TaskRescheduled(now + timedelta(seconds=interval))
            sleep(interval)
            poke_count += 1

    def next_interval(self, poke_count: int, started: datetime, elapsed: float) -> float:
        """Seconds to the next poke. With exponential backoff, Airflow's
        formula: at least ``poke_interval * 2**(n-2)``, jittered by a hash
        of the task and the poke, never past the timeout nor ``max_wait``."""
        if not self.exponential_backoff:
            return self.poke_interval
        min_backoff = max(int(self.poke_interval * (2 ** (poke_count - 2))), 1)
        digest = hashlib.sha1(f"{self.dag_id}#{self.task_id}#{started.isoformat()}#{poke_count}".encode()).hexdigest()
        delay = min_backoff + int(digest, 16) % min_backoff
        delay = min(delay, max(self.timeout - elapsed, 0.0))
        if self.max_wait is not None:
            delay = min(delay, self.max_wait)
        return float(delay)

    def _pokes_before(self, started: datetime, now: datetime) -> int:
        """How many pokes a rescheduled sensor already made in this try: the
        count is not stored, so it is derived from the time waited (exact
        for a fixed interval, the doubling's count for a backoff)."""
        waited = max((now - started).total_seconds(), 0.0)
        if waited <= 0 or self.poke_interval <= 0:
            return 0
        if self.exponential_backoff:
            return int(math.log2(waited / self.poke_interval + 1)) + 1
        return int(waited // self.poke_interval)

    def serialize(self) -> dict[str, Any]:
        return {
            **super().serialize(),
            "sensor": {
                "mode": self.mode,
                "poke_interval": self.poke_interval,
                "timeout": self.timeout,
                "soft_fail": self.soft_fail,
                "exponential_backoff": self.exponential_backoff,
                "max_wait": self.max_wait,
            },
        }


class PythonSensor(BaseSensorOperator):
    """Pokes ``python_callable`` (called like a ``PythonOperator``'s)."""

    template_fields: Sequence[str] = ("templates_dict", "op_args", "op_kwargs")

    def __init__(
        self,
        task_id: str,
        *,
        python_callable: Callable[..., Any],
        op_args: Sequence[Any] | None = None,
        op_kwargs: dict[str, Any] | None = None,
        templates_dict: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(python_callable):
            raise InvalidDag(f"task {task_id!r}: python_callable is not callable")
        self.python_callable = python_callable
        self.op_args = list(op_args or [])
        self.op_kwargs = dict(op_kwargs or {})
        self.templates_dict = templates_dict
        super().__init__(task_id, **kwargs)

    def poke(self, context: dict[str, Any]) -> bool | PokeReturnValue:
        result = call_with_context(self.python_callable, self.op_args, self.op_kwargs, {**context, "templates_dict": self.templates_dict})
        return result if isinstance(result, PokeReturnValue) else bool(result)

    def serialize(self) -> dict[str, Any]:
        return {**super().serialize(), "callable": getattr(self.python_callable, "__qualname__", repr(self.python_callable))}


# --- the DAG -------------------------------------------------------------------------------


class DAG:
    def __init__(
        self,
        dag_id: str,
        *,
        schedule: Any = None,
        start_date: datetime | None = None,
        end_date: datetime | None = None,
        max_active_runs: int | None = None,
        description: str | None = None,
        tags: Iterable[str] = (),
        default_args: dict[str, Any] | None = None,
        catchup: bool = False,
        is_paused_upon_creation: bool = False,
        doc_md: str | None = None,
        params: dict[str, Any] | None = None,
        render_template_as_native_obj: bool = False,
        max_active_tasks: int | None = None,
        dagrun_timeout: timedelta | float | None = None,
        on_success_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
        on_failure_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
        sla_miss_callback: Callable[..., Any] | list[Callable[..., Any]] | None = None,
    ) -> None:
        if not isinstance(dag_id, str) or not _ID_RE.fullmatch(dag_id):
            raise InvalidDag(f"invalid dag_id {dag_id!r}: use letters, digits, '_', '.', '-' (max 250)")
        self.dag_id = dag_id
        self.description = description
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            raise InvalidDag(f"DAG {dag_id!r}: tags must be a list of strings")
        self.tags = list(tags)
        self.default_args = dict(default_args or {})
        # schedule, start_date, end_date, catchup, max_active_runs, timezone, timetable (hub.timetables).
        for name, value in dag_schedule_options(dag_id, schedule, start_date, end_date, catchup, max_active_runs, self.default_args).items():
            setattr(self, name, value)
        self.is_paused_upon_creation = is_paused_upon_creation
        self.doc_md = doc_md
        self.params = ParamsDict(params)
        self.render_template_as_native_obj = bool(render_template_as_native_obj)
        scheduling = {"max_active_tasks": max_active_tasks, "dagrun_timeout": dagrun_timeout, "on_success_callback": on_success_callback,
                      "on_failure_callback": on_failure_callback, "sla_miss_callback": sla_miss_callback}
        for name, value in dag_options(dag_id, scheduling).items():
            setattr(self, name, value)
        self.tasks: dict[str, BaseOperator] = {}
        self.task_group_dict: dict[str, TaskGroup] = {}
        self.task_group = TaskGroup(None, dag=self)
        self.fileloc = ""
        self._token: contextvars.Token[DAG | None] | None = None
        self._group_token: contextvars.Token[TaskGroup | None] | None = None

    def __enter__(self) -> DAG:
        self._token = _current_dag.set(self)
        # A DAG inside another DAG's task group starts at its own root group.
        self._group_token = _current_group.set(None)
        return self

    def __exit__(self, *exc: object) -> None:
        captured = _captured.get()
        if captured is not None and not any(d is self for d in captured):
            captured.append(self)
        if self._group_token is not None:
            _current_group.reset(self._group_token)
            self._group_token = None
        if self._token is not None:
            _current_dag.reset(self._token)
            self._token = None

    def add_task(self, task: BaseOperator) -> None:
        if task.task_id in self.tasks or task.task_id in self.task_group_dict:
            raise InvalidDag(f"DAG {self.dag_id!r} has two tasks named {task.task_id!r}")
        self.tasks[task.task_id] = task

    @property
    def task_ids(self) -> list[str]:
        return list(self.tasks)

    @property
    def task_dict(self) -> dict[str, BaseOperator]:
        return self.tasks

    def get_task(self, task_id: str) -> BaseOperator:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise InvalidDag(f"DAG {self.dag_id!r} has no task {task_id!r}") from None

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
        self.params.validate_defaults(self.dag_id)
        required = [name for name, p in self.params.items() if not p.has_value]
        if required and getattr(self, "schedule", None) is not None:
            # Airflow's rule: a scheduled run has no conf to supply them.
            raise InvalidDag(f"DAG {self.dag_id!r} has a schedule, so every param needs a default; {', '.join(required)} has none")

    def serialize(self) -> dict[str, Any]:
        return {
            "dag_id": self.dag_id,
            **serialize_dag_schedule(self),
            "description": self.description,
            "tags": list(self.tags),
            "doc_md": self.doc_md,
            "params": self.params.serialize(),
            "render_template_as_native_obj": self.render_template_as_native_obj,
            **serialize_dag_options(self),
            "tasks": [self.tasks[t].serialize() for t in self.topological_order()],
        }


@contextmanager
def capture_dags() -> Iterator[list[DAG]]:
    """The DAGs completed (``with DAG(...)`` blocks, ``@dag`` calls) while
    the block runs: Airflow registers those even when no module-level name
    holds them, so importers of DAG files look here as well as at the
    module's globals (see ``dags_in_module``)."""
    found: list[DAG] = []
    token = _captured.set(found)
    try:
        yield found
    finally:
        _captured.reset(token)


def dags_in_module(module: Any, captured: Iterable[DAG] = ()) -> list[DAG]:
    """A DAG file's DAGs: its module-level DAG objects and those it built
    while ``capture_dags()`` was active, each once."""
    found: dict[int, DAG] = {}
    for value in [*vars(module).values(), *captured]:
        if isinstance(value, DAG):
            found.setdefault(id(value), value)
    return list(found.values())


def import_dag_file(fileloc: str) -> list[DAG]:
    """Import a DAG file as its own module and return its DAGs. The module
    name is derived from the path, so the DAG processor and the workers
    import a file under the same name. Whatever the file raises propagates;
    a failed import leaves no half-made module behind in ``sys.modules``."""
    name = "outpost_dag_" + hashlib.sha1(fileloc.encode()).hexdigest()[:12]
    try:
        spec = importlib.util.spec_from_file_location(name, fileloc)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {fileloc}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        with capture_dags() as created:  # `with DAG(...)` blocks and @dag calls need no module-level name
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return dags_in_module(module, created)


def chain(*tasks: Any) -> None:
    """``chain(a, b, c)`` is ``a >> b >> c``; tasks, XComArgs, task groups
    and lists of them. Two adjacent lists of equal length link pairwise
    (Airflow's rule); a list next to a single node fans out or in."""
    for left, right in zip(tasks, tasks[1:]):
        if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            if len(left) != len(right):
                raise InvalidDag(f"chain(): adjacent lists must have the same length, got {len(left)} and {len(right)}")
            for up, down in zip(left, right):
                _nodes(up)[0].set_downstream(down)
            continue
        for node in _nodes(left):
            node.set_downstream(right)


def cross_downstream(from_tasks: Sequence[Any], to_tasks: Any) -> None:
    """Every task of ``from_tasks`` upstream of every task of ``to_tasks``."""
    for node in _nodes(list(from_tasks)):
        node.set_downstream(to_tasks)


def _window_time(task_id: str, name: str, value: Any) -> float | str | None:
    """An agent task's ``not_before`` / ``deadline`` as stored: seconds after
    the run's data interval end (a timedelta or a number), or a string: a
    Jinja template rendered at dispatch, or an ISO 8601 time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidDag(f"task {task_id!r}: {name} must be an aware datetime (with a time zone), got {value!r}")
        return value.isoformat()
    if isinstance(value, (timedelta, int, float)) and not isinstance(value, bool):
        return _seconds(value)
    if isinstance(value, str) and value.strip():
        if not templating.is_template(value):
            try:
                datetime.fromisoformat(value.strip())
            except ValueError:
                raise InvalidDag(f"task {task_id!r}: {name} {value!r} is neither a template nor an ISO 8601 time") from None
        return value
    raise InvalidDag(f"task {task_id!r}: {name} must be a timedelta, seconds, a template string or an aware datetime, got {value!r}")


def _seconds(value: timedelta | float | int) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
