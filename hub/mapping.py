"""Dynamic task mapping, in Airflow's words: ``partial()`` and ``expand()``.

Authoring::

    ping = AgentOperator.partial(task_id="ping", job_type="command.run", target=any_agent()).expand(
        params=[{"argv": ["ping", "-c1", "a"]}, {"argv": ["ping", "-c1", "b"]}])
    add = PythonOperator.partial(task_id="add", python_callable=add).expand(op_kwargs=[{"x": 1}, {"x": 2}])
    add.expand(x=list_files())        # a TaskFlow function over an upstream task's output

``partial()`` fixes the arguments shared by every mapped instance, ``expand()``
names the mapped ones: each takes every value of a list (or every ``[key,
value]`` item of a dict), written in the DAG file or returned at run time by
an upstream task. Several mapped arguments multiply (a cross product; the last
one varies fastest, as in Airflow). ``expand_kwargs()`` takes a list of
argument dicts, one per instance.

A mapped task serializes with ``"mapped": {"expand": {arg: {"literal": [...]}
| {"xcom": {"task_id", "key"}}}, "group": None}`` (plus ``"expand_kwargs"``
when used, and ``"group_args"`` for a task of a mapped task group). The
scheduler needs nothing else: when the task may run it resolves the lists
(:func:`resolve_expansion`) and replaces the task's one instance (map index
-1) by one instance per value (0..n-1), each carrying its own argument values
in ``TaskInstance.params``. A hub worker turns those back into an operator
with :func:`unmap`; for an agent task they are the job's parameters
(:func:`agent_params`). Zero values skip the task; more than
``max_map_length`` fail it. A mapped task cleared as a whole expands again.

A mapped task group (``@task_group`` ... ``.expand()``) marks every task in it
with the group's ``expand`` and its id; the group's arguments reach a task as
``group_args`` paths (``"op_kwargs.x"``, ``"params.host"``). Instance i of such
a task waits only for instance i of its upstreams in the group, and pulling a
group member's XCom gives instance i's value (:func:`same_group_index`).
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.dag import BaseOperator, BaseSensorOperator
from hub.errors import InvalidDag
from hub.models import TaskInstance, XCom
from shared.states import TaskState

#: Airflow's ``[core] max_map_length`` default.
DEFAULT_MAX_MAP_LENGTH = 1024

#: What an agent task can map over: the scheduler builds assignments from the
#: serialized structure alone, and the job parameters are the only per-instance part.
AGENT_MAPPABLE = frozenset({"params"})


# --- authoring ----------------------------------------------------------------


@dataclass
class Mapping:
    """How a task maps: kept on the operator (``operator.mapping``) and
    serialized under the task's ``"mapped"`` key."""

    #: {argument: {"literal": [...]} | {"xcom": {"task_id", "key"}}}
    expand: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``expand_kwargs()``'s source (a list of argument dicts), or None.
    expand_kwargs: dict[str, Any] | None = None
    #: The mapped task group this task belongs to (its instances follow the group's index).
    group: str | None = None
    #: For a task of a mapped group: {task argument: group argument}.
    group_args: dict[str, str] | None = None
    #: Not serialized: the operator attribute the mapped values go into, for
    #: TaskFlow functions whose arguments live in ``op_kwargs``.
    into: str | None = None

    def serialize(self) -> dict[str, Any]:
        data: dict[str, Any] = {"expand": self.expand, "group": self.group}
        if self.expand_kwargs is not None:
            data["expand_kwargs"] = self.expand_kwargs
        if self.group_args is not None:
            data["group_args"] = dict(self.group_args)
        return data


class OperatorPartial:
    """What ``SomeOperator.partial(...)`` returns; ``.expand()`` or
    ``.expand_kwargs()`` makes the mapped task."""

    def __init__(self, operator_class: type[BaseOperator], kwargs: dict[str, Any]) -> None:
        task_id = kwargs.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise InvalidDag(f"{operator_class.__name__}.partial() needs task_id=")
        accepted, open_ended = init_arguments(operator_class)
        unknown = sorted(set(kwargs) - accepted)
        if unknown and not open_ended:
            raise InvalidDag(f"task {task_id!r}: {operator_class.__name__}.partial() got unknown argument(s) {', '.join(unknown)}")
        self.operator_class = operator_class
        self.task_id = task_id
        self.kwargs = dict(kwargs)

    def expand(self, **mapped: Any) -> BaseOperator:
        if not mapped:
            raise InvalidDag(f"task {self.task_id!r}: expand() needs at least one argument to map over")
        mappable = mappable_arguments(self.operator_class)
        for name in mapped:
            self._check_name(name, mappable)
        sources = {name: expand_source(self.task_id, name, value, agent=self.operator_class.kind == "agent") for name, value in mapped.items()}
        operator = self._build()
        for name, (source, _) in sources.items():
            # An argument that is a dict (op_kwargs) or a list (op_args) takes one per instance.
            current = getattr(operator, name, None)
            kind = dict if isinstance(current, dict) else list if isinstance(current, list) else None
            if "literal" in source and kind is not None:
                for item in source["literal"]:
                    if not isinstance(item, kind):
                        raise InvalidDag(f"task {self.task_id!r}: each value of expand({name}=...) must be a {kind.__name__}; got {_json_type(item)}")
        attach(operator, Mapping(expand={n: s for n, (s, _) in sources.items()}), [ref for _, ref in sources.values() if ref is not None])
        return operator

    def expand_kwargs(self, value: Any) -> BaseOperator:
        """One dict of arguments per instance (a list, or an upstream task's output)."""
        mappable = mappable_arguments(self.operator_class)
        source, ref = expand_source(self.task_id, "expand_kwargs", value, agent=False)
        if ref is None:
            for item in source["literal"]:
                if not isinstance(item, dict):
                    raise InvalidDag(f"task {self.task_id!r}: expand_kwargs() needs a list of dicts; got an item {_json_type(item)}")
                for name in item:
                    self._check_name(name, mappable)
                if "params" in item and self.operator_class.kind == "agent" and not isinstance(item["params"], dict):
                    raise InvalidDag(f"task {self.task_id!r}: each mapped 'params' must be a dict; got {_json_type(item['params'])}")
        operator = self._build()
        attach(operator, Mapping(expand_kwargs=source), [ref] if ref is not None else [])
        return operator

    def _check_name(self, name: str, mappable: frozenset[str]) -> None:
        if name in self.kwargs:
            raise InvalidDag(f"task {self.task_id!r}: argument {name!r} is given to both partial() and expand()")
        if name not in mappable:
            raise InvalidDag(
                f"task {self.task_id!r}: {self.operator_class.__name__} cannot map over {name!r}; "
                f"mappable arguments: {', '.join(sorted(mappable)) or 'none'}"
            )

    def _build(self) -> BaseOperator:
        try:
            return self.operator_class(**self.kwargs)
        except TypeError as exc:
            raise InvalidDag(f"task {self.task_id!r}: {exc}") from None


def attach(operator: BaseOperator, mapping: Mapping, upstream_refs: list[tuple[BaseOperator, str]]) -> None:
    """Make ``operator`` a mapped task; the tasks whose output it maps over become its upstreams."""
    if getattr(operator, "target", None) is not None and operator.target.mode == "all":  # type: ignore[attr-defined]
        raise InvalidDag(f"task {operator.task_id!r}: a mapped agent task cannot also target every_agent(); map over the agents' parameters instead")
    if getattr(operator, "is_branch", False) or getattr(operator, "short_circuit", False):
        # The skips a branch decides come from one output; n outputs would disagree.
        raise InvalidDag(f"task {operator.task_id!r}: a branch or short-circuit task cannot be mapped")
    for source, _key in upstream_refs:
        if source is operator:
            raise InvalidDag(f"task {operator.task_id!r}: cannot map over its own output")
        if source.dag is not operator.dag:
            raise InvalidDag(f"task {operator.task_id!r}: maps over {source.task_id!r}, which is in another DAG")
        source.set_downstream(operator)
    operator.mapping = mapping


def expand_source(task_id: str, name: str, value: Any, *, agent: bool) -> tuple[dict[str, Any], tuple[BaseOperator, str] | None]:
    """The serialized source of one mapped argument and, for an upstream
    output, the upstream task and XCom key. Raises ``InvalidDag``."""
    ref = xcom_reference(value)
    if ref is not None:
        return {"xcom": {"task_id": ref[0].task_id, "key": ref[1]}}, ref
    if isinstance(value, dict):
        values: list[Any] = [[k, v] for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        values = list(value)
    else:
        raise InvalidDag(f"task {task_id!r}: expand({name}=...) needs a list, a dict or an upstream task's output; got {type(value).__name__}")
    try:
        json.dumps(values)
    except (TypeError, ValueError) as exc:
        raise InvalidDag(f"task {task_id!r}: the values of expand({name}=...) must be JSON: {exc}") from None
    if agent and name == "params":
        for item in values:
            if not isinstance(item, dict):
                raise InvalidDag(f"task {task_id!r}: each mapped 'params' must be a dict; got {_json_type(item)}")
    return {"literal": values}, None


def xcom_reference(value: Any) -> tuple[BaseOperator, str] | None:
    """(task, key) when ``value`` stands for an upstream task's output: an
    operator itself, or an XComArg (``task.output``, a TaskFlow call)."""
    if isinstance(value, BaseOperator):
        return value, "return_value"
    operator = getattr(value, "operator", None)
    key = getattr(value, "key", None)
    if isinstance(operator, BaseOperator) and isinstance(key, str):
        return operator, key
    return None


def init_arguments(operator_class: type) -> tuple[frozenset[str], bool]:
    """Keyword arguments the class's constructor chain accepts, and whether it
    accepts any (a ``**kwargs`` that reaches no explicit signature)."""
    names: set[str] = set()
    for klass in operator_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return frozenset(names), False
    return frozenset(names), True


def mappable_arguments(operator_class: type[BaseOperator]) -> frozenset[str]:
    """Arguments ``expand()`` accepts: an agent task maps its job parameters;
    a hub operator any optional argument of its own (the task-level settings of
    ``BaseOperator`` such as retries or pool are per task, not per instance)."""
    if operator_class.kind == "agent":
        return AGENT_MAPPABLE
    base, _ = init_arguments(BaseOperator)
    names: set[str] = set()
    for klass in operator_class.__mro__:
        # A sensor's mode, poke interval and timeout are scheduled from the
        # serialized task, so like BaseOperator's they are per task.
        if klass is BaseOperator or klass is BaseSensorOperator or not issubclass(klass, BaseOperator):
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty and p.name not in base:
                names.add(p.name)
    return frozenset(names)


# --- run time -----------------------------------------------------------------


class MappingFailure(Exception):
    """The mapped task cannot expand; ``state`` is what its instance becomes."""

    def __init__(self, code: str, message: str, state: TaskState = TaskState.FAILED, source: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.state = state
        #: The upstream task whose output was missing, if that is the reason.
        self.source = source

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "retryable": False}


#: Looks up an upstream output: (task_id, key) -> (found, value).
XComFetcher = Callable[[str, str], tuple[bool, Any]]


def xcom_sources(mapped: dict[str, Any]) -> list[str]:
    """Task ids whose output the mapping's length depends on."""
    sources = list(mapped.get("expand", {}).values())
    if mapped.get("expand_kwargs") is not None:
        sources.append(mapped["expand_kwargs"])
    return [s["xcom"]["task_id"] for s in sources if "xcom" in s]


def resolve_expansion(mapped: dict[str, Any], fetch: XComFetcher, max_length: int) -> list[dict[str, Any]]:
    """The argument values of each instance, in map index order. Raises
    ``MappingFailure`` (``unmappable_xcom``, ``max_map_length_exceeded``,
    ``missing_upstream_xcom``)."""
    if mapped.get("expand_kwargs") is not None:
        items = _values(mapped["expand_kwargs"], "expand_kwargs", fetch, max_length)
        for item in items:
            if not isinstance(item, dict):
                raise MappingFailure("unmappable_xcom", f"expand_kwargs() needs a list of dicts; got an item {_json_type(item)}")
        combos: list[dict[str, Any]] = [dict(item) for item in items]
    else:
        lists = {name: _values(source, name, fetch, max_length) for name, source in mapped.get("expand", {}).items()}
        total = math.prod(len(v) for v in lists.values())
        if total > max_length:
            sizes = " x ".join(f"{len(v)} ({n})" for n, v in lists.items())
            raise MappingFailure("max_map_length_exceeded", f"the mapped arguments make {sizes} = {total} instances, over max_map_length {max_length}")
        combos = [dict(zip(lists, combo, strict=True)) for combo in itertools.product(*lists.values())]
    group_args = mapped.get("group_args")
    if group_args is not None:
        # A task of a mapped group receives the group's values under its own argument names.
        combos = [{task_arg: combo[group_arg] for task_arg, group_arg in group_args.items() if group_arg in combo} for combo in combos]
    return combos


def _values(source: dict[str, Any], name: str, fetch: XComFetcher, max_length: int) -> list[Any]:
    if "literal" in source:
        values = list(source["literal"])
    else:
        ref = source["xcom"]
        task_id, key = ref["task_id"], ref.get("key", "return_value")
        found, value = fetch(task_id, key)
        if not found:
            raise MappingFailure(
                "missing_upstream_xcom", f"{task_id!r} left no XCom {key!r} to map {name!r} over (it did not succeed)", TaskState.UPSTREAM_FAILED, task_id
            )
        if isinstance(value, dict):
            values = [[k, v] for k, v in value.items()]
        elif isinstance(value, list):
            values = value
        else:
            raise MappingFailure("unmappable_xcom", f"{name!r} maps over the output of {task_id!r}, which must be a list or a dict; it is {_json_type(value)}")
    if len(values) > max_length:
        raise MappingFailure("max_map_length_exceeded", f"{name!r} has {len(values)} values, over max_map_length {max_length}")
    return values


def agent_params(task: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The job parameters of one instance of a mapped agent task: the
    mapped ``params`` (or, in a mapped group, single mapped keys of them)."""
    params = dict(task.get("params") or {})
    for name, value in values.items():
        if name == "params":
            if not isinstance(value, dict):
                raise MappingFailure("unmappable_xcom", f"each mapped 'params' must be a dict; one is {_json_type(value)}")
            params = dict(value)
        elif name.startswith("params."):
            params[name.removeprefix("params.")] = value
        else:
            raise MappingFailure("unmappable_xcom", f"an agent task maps only 'params'; got {name!r}")
    return params


def unmap(operator: BaseOperator, values: dict[str, Any]) -> BaseOperator:
    """The operator of one mapped instance: a copy carrying that instance's
    argument values (``TaskInstance.params`` of the instance). A name
    ``attr.key`` sets one key of a dict attribute (``op_kwargs.x``).
    Raises ``InvalidDag`` for an argument the operator does not have."""
    clone = copy.copy(operator)
    into = operator.mapping.into if operator.mapping is not None else None
    for name, value in values.items():
        attr, _, key = (f"{into}.{name}" if into else name).partition(".")
        if not hasattr(clone, attr):
            raise InvalidDag(f"task {operator.task_id!r}: cannot map argument {attr!r}: {type(operator).__name__} has no such attribute")
        current = getattr(clone, attr)
        if key:
            if not isinstance(current, dict):
                raise InvalidDag(f"task {operator.task_id!r}: cannot map {name!r}: {attr!r} is not a dict")
            setattr(clone, attr, {**current, key: value})
        elif isinstance(current, dict) and not isinstance(value, dict):
            raise InvalidDag(f"task {operator.task_id!r}: each value mapped to {attr!r} must be a dict; this instance's is {_json_type(value)}")
        elif isinstance(current, list) and not isinstance(value, list):
            raise InvalidDag(f"task {operator.task_id!r}: each value mapped to {attr!r} must be a list; this instance's is {_json_type(value)}")
        else:
            setattr(clone, attr, value)
    return clone


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def mapping_input_fetcher(session: Session, run_pk: int) -> XComFetcher:
    """Reads upstream outputs of run ``run_pk`` for :func:`resolve_expansion`:
    the return value is ``TaskInstance.output``, other keys the ``xcoms``
    table. A mapped (or fanned-out) upstream gives the list of its
    successful instances' values in map index order, as ``xcom_pull`` does."""

    def fetch(task_id: str, key: str) -> tuple[bool, Any]:
        if key == "return_value":
            rows = session.execute(
                select(TaskInstance.map_index, TaskInstance.state, TaskInstance.output)
                .where(TaskInstance.run_pk == run_pk, TaskInstance.task_id == task_id)
                .order_by(TaskInstance.map_index)
            ).all()
            found = [(r.map_index, r.output) for r in rows if r.state == TaskState.SUCCESS]
        else:
            rows_x = session.execute(
                select(XCom.map_index, XCom.value).where(XCom.run_pk == run_pk, XCom.task_id == task_id, XCom.key == key).order_by(XCom.map_index)
            ).all()
            found = [(r.map_index, r.value) for r in rows_x]
        if not found:
            return False, None
        if len(found) == 1 and found[0][0] < 0:
            return True, found[0][1]
        return True, [value for _, value in found]

    return fetch


# --- TaskFlow: @task functions and @task_group functions ----------------------------


class TaskFlowPartial:
    """``my_task.partial(y=1)``: a ``@task`` function with fixed arguments;
    ``.expand(x=[...])`` maps its other arguments."""

    def __init__(self, decorator: Any, kwargs: dict[str, Any]) -> None:
        self.decorator = decorator
        self.name = decorator.function.__name__
        self.kwargs = dict(kwargs)
        self.parameters, self.open_ended = _function_arguments(decorator.function)
        unknown = sorted(set(self.kwargs) - self.parameters)
        if unknown and not self.open_ended:
            raise InvalidDag(f"@task function {self.name!r}: partial() got unknown argument(s) {', '.join(unknown)}")

    def expand(self, **mapped: Any) -> Any:
        if not mapped:
            raise InvalidDag(f"@task function {self.name!r}: expand() needs at least one argument to map over")
        self._check_names(mapped)
        sources = {name: expand_source(self.name, name, value, agent=False) for name, value in mapped.items()}
        return self._build(Mapping(expand={n: s for n, (s, _) in sources.items()}, into="op_kwargs"), [ref for _, ref in sources.values() if ref is not None])

    def expand_kwargs(self, value: Any) -> Any:
        source, ref = expand_source(self.name, "expand_kwargs", value, agent=False)
        if ref is None:
            for item in source["literal"]:
                if not isinstance(item, dict):
                    raise InvalidDag(f"@task function {self.name!r}: expand_kwargs() needs a list of dicts; got an item {_json_type(item)}")
                self._check_names(item)
        return self._build(Mapping(expand_kwargs=source, into="op_kwargs"), [ref] if ref is not None else [])

    def _check_names(self, mapped: dict[str, Any]) -> None:
        for name in mapped:
            if name in self.kwargs:
                raise InvalidDag(f"@task function {self.name!r}: argument {name!r} is given to both partial() and expand()")
            if name not in self.parameters and not self.open_ended:
                raise InvalidDag(f"@task function {self.name!r}: expand() got {name!r}, which is not one of its arguments ({', '.join(sorted(self.parameters))})")

    def _build(self, mapping: Mapping, refs: list[tuple[BaseOperator, str]]) -> Any:
        from hub.dag import XComArg  # noqa: PLC0415 - a late import keeps this module's top light

        operator = self.decorator.make_operator((), self.kwargs)
        attach(operator, mapping, refs)
        return XComArg(operator)


def _function_arguments(function: Callable[..., Any]) -> tuple[frozenset[str], bool]:
    params = inspect.signature(function).parameters.values()
    names = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


_PLACEHOLDER_MARK = "<mapped argument "


class MappedArgument(str):
    """What a mapped task group's function receives for a mapped argument.
    Passed to a task inside the group (as a ``@task`` argument, an
    ``op_kwargs`` value or a key of an agent task's ``params``), it becomes
    that task's per-index value. A ``str`` so that it passes the JSON checks
    of operator constructors; it is taken out of the task right after the
    group function returns and never reaches a run."""

    group_name: str
    name: str

    def __new__(cls, group_name: str, name: str) -> MappedArgument:
        self = super().__new__(cls, f"{_PLACEHOLDER_MARK}{name!r} of task group {group_name!r}>")
        self.group_name, self.name = group_name, name
        return self


class TaskGroupPartial:
    """``my_group.partial(...)`` for a ``@task_group`` function; ``.expand()``
    creates one mapped task group (Airflow 2.5+): every task in it runs once
    per mapped value, with the group's map index, and instance i of a task
    waits only for instance i of its upstreams inside the group."""

    def __init__(self, function: Callable[..., Any], group_id: str | None, group_kwargs: dict[str, Any], kwargs: dict[str, Any]) -> None:
        self.function = function
        self.label = group_id or function.__name__
        self.group_kwargs = dict(group_kwargs)
        self.kwargs = dict(kwargs)
        self.parameters, self.open_ended = _function_arguments(function)
        unknown = sorted(set(self.kwargs) - self.parameters)
        if unknown and not self.open_ended:
            raise InvalidDag(f"task group {self.label!r}: partial() got unknown argument(s) {', '.join(unknown)}")

    def expand(self, **mapped: Any) -> Any:
        if not mapped:
            raise InvalidDag(f"task group {self.label!r}: expand() needs at least one argument to map over")
        for name in mapped:
            if name in self.kwargs:
                raise InvalidDag(f"task group {self.label!r}: argument {name!r} is given to both partial() and expand()")
            if name not in self.parameters:
                raise InvalidDag(f"task group {self.label!r}: expand() got {name!r}, which is not one of its arguments ({', '.join(sorted(self.parameters))})")
        sources = {name: expand_source(self.label, name, value, agent=False) for name, value in mapped.items()}
        return self._build(Mapping(expand={n: s for n, (s, _) in sources.items()}), [ref for _, ref in sources.values() if ref is not None], list(mapped))

    def _build(self, template: Mapping, refs: list[tuple[BaseOperator, str]], names: list[str]) -> Any:
        from hub.dag import TaskGroup, _current_dag  # noqa: PLC0415

        options = dict(self.group_kwargs)
        dag = options.pop("dag", None) or _current_dag.get()
        if dag is None:
            raise InvalidDag(f"@task_group function {self.label!r} was called outside a DAG")
        if "tooltip" not in options and self.function.__doc__:
            options["tooltip"] = inspect.cleandoc(self.function.__doc__)
        placeholders = {name: MappedArgument(self.label, name) for name in names}
        with TaskGroup(self.label, dag=dag, add_suffix_on_collision=True, **options) as group:
            result = self.function(**self.kwargs, **placeholders)
        members = list(group.iter_tasks())
        if not members:
            raise InvalidDag(f"task group {group.group_id!r}: a mapped task group needs at least one task")
        ids = {t.task_id for t in members}
        for task in members:
            if task.mapping is not None:
                raise InvalidDag(f"task {task.task_id!r}: a task inside mapped task group {group.group_id!r} cannot be mapped itself")
            mapping = Mapping(expand=template.expand, group=group.group_id, group_args=_take_mapped_arguments(task))
            roots_refs = refs if not task.upstream_task_ids & ids else []  # the group's roots wait for the mapped-over outputs
            attach(task, mapping, roots_refs)
        # As Airflow: what the function returns (say, its last task's output)
        # stands for the group, so downstream tasks bind to it; else the group.
        return group if result is None else result


def _take_mapped_arguments(task: BaseOperator) -> dict[str, str]:
    """Take the group's ``MappedArgument`` placeholders out of ``task`` and
    return where they go: {"op_kwargs.x" | "params.key" | attribute: group argument}."""
    found: dict[str, str] = {}
    op_args = getattr(task, "op_args", None)
    if op_args and any(isinstance(a, MappedArgument) for a in op_args):
        # Positional arguments become named ones, so each has a path.
        signature = inspect.signature(task.python_callable)  # type: ignore[attr-defined]
        if any(p.kind is p.VAR_POSITIONAL for p in signature.parameters.values()):
            raise InvalidDag(f"task {task.task_id!r}: pass a mapped group argument by name to a function with *args")
        bound = signature.bind_partial(*op_args).arguments
        task.op_kwargs = {**task.op_kwargs, **bound}  # type: ignore[attr-defined]
        task.op_args = []  # type: ignore[attr-defined]
    for attr, value in list(vars(task).items()):
        if isinstance(value, MappedArgument):
            found[attr] = value.name
            setattr(task, attr, None)
        elif isinstance(value, dict) and any(isinstance(v, MappedArgument) for v in value.values()):
            found.update({f"{attr}.{k}": v.name for k, v in value.items() if isinstance(v, MappedArgument)})
            setattr(task, attr, {k: v for k, v in value.items() if not isinstance(v, MappedArgument)})
        elif _contains_mapped(value):
            raise InvalidDag(
                f"task {task.task_id!r}: a mapped group argument can only be passed whole, as an argument or a top-level value of a dict "
                f"argument, not inside a list or a formatted string ({attr!r}); format it inside a task"
            )
    return found


def _contains_mapped(value: Any) -> bool:
    if isinstance(value, MappedArgument):
        return True
    if isinstance(value, str) and _PLACEHOLDER_MARK in value:
        return True  # formatted into a string in the DAG file: its value only exists at run time
    if isinstance(value, dict):
        return any(_contains_mapped(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_mapped(v) for v in value)
    return False


def mappable_task_group(factory: Any, function: Callable[..., Any], group_id: str | None, group_kwargs: dict[str, Any]) -> Any:
    """Give a ``@task_group`` function ``.partial()`` and ``.expand()``."""
    factory.partial = lambda **kwargs: TaskGroupPartial(function, group_id, group_kwargs, kwargs)
    factory.expand = lambda **mapped: TaskGroupPartial(function, group_id, group_kwargs, {}).expand(**mapped)
    return factory


def same_group_index(task: Any, other_task_id: str, map_index: int) -> int | None:
    """The map index to read when instance ``map_index`` of ``task`` pulls
    ``other_task_id`` without naming indexes: inside one mapped task group,
    instance i sees instance i of the group's other tasks (Airflow 2.5+);
    None otherwise (all instances, in map index order)."""
    mapping = getattr(task, "mapping", None)
    if mapping is None or mapping.group is None or map_index < 0 or getattr(task, "dag", None) is None:
        return None
    other = task.dag.tasks.get(other_task_id)
    other_mapping = getattr(other, "mapping", None)
    return map_index if other_mapping is not None and other_mapping.group == mapping.group else None
