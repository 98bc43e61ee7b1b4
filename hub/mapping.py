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
``max_map_length`` fail it.
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

from hub.dag import BaseOperator
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
        if klass is BaseOperator or not issubclass(klass, BaseOperator):
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

    def __init__(self, code: str, message: str, state: TaskState = TaskState.FAILED) -> None:
        super().__init__(message)
        self.code = code
        self.state = state

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
                "missing_upstream_xcom", f"{task_id!r} left no XCom {key!r} to map {name!r} over (it did not succeed)", TaskState.UPSTREAM_FAILED
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
        if key:
            current = getattr(clone, attr)
            if not isinstance(current, dict):
                raise InvalidDag(f"task {operator.task_id!r}: cannot map {name!r}: {attr!r} is not a dict")
            setattr(clone, attr, {**current, key: value})
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
