"""TaskFlow, as in ``airflow.decorators``: ``@dag``, ``@task`` (with
``.branch``, ``.short_circuit``, ``.sensor``) and ``@task_group``::

    from hub.taskflow import dag, task

    @dag(schedule="@daily", start_date=..., params={"limit": 10})
    def report():
        @task
        def extract() -> list[int]:
            return [1, 2, 3]

        @task
        def total(values: list[int], params=None) -> int:
            return sum(values[: params["limit"]])

        total(extract())

    report()

Calling a ``@task`` function inside a DAG creates its task and returns an
``XComArg``; an ``XComArg`` passed as an argument makes its task upstream
and is replaced by that task's return value at run time.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from typing import Any

from hub.dag import (
    DAG,
    BranchPythonOperator,
    DagParam,
    PokeReturnValue,
    PythonOperator,
    PythonSensor,
    ShortCircuitOperator,
    TaskGroup,
    XComArg,
    _current_dag,
    _current_group,
    call_with_context,
)
from hub.errors import InvalidDag
from hub.mapping import TaskFlowPartial, mappable_task_group
from hub.params import NOTSET, Param

__all__ = ["dag", "task", "task_group", "PokeReturnValue"]


class DecoratedPythonOperator(PythonOperator):
    """A ``@task`` function."""


class DecoratedBranchOperator(BranchPythonOperator):
    """A ``@task.branch`` function."""


class DecoratedShortCircuitOperator(ShortCircuitOperator):
    """A ``@task.short_circuit`` function."""


class DecoratedSensorOperator(PythonSensor):
    """A ``@task.sensor`` function: returns a bool or a ``PokeReturnValue``."""

    def poke(self, context: dict[str, Any]) -> bool | PokeReturnValue:
        result = call_with_context(self.python_callable, self.op_args, self.op_kwargs, context)
        return result if isinstance(result, PokeReturnValue) else bool(result)


def _returns_dict(function: Callable[..., Any]) -> bool:
    """Airflow infers ``multiple_outputs`` from a ``-> dict[...]`` annotation."""
    try:
        hint = typing.get_type_hints(function).get("return")
    except Exception:  # unresolvable string annotations: fall back to the text
        raw = inspect.signature(function).return_annotation
        return isinstance(raw, str) and raw.replace(" ", "").split("[")[0] in ("dict", "Dict", "typing.Dict")
    if hint is None:
        return False
    origin = typing.get_origin(hint) or hint
    return origin is dict


class TaskDecorator:
    """What ``@task`` turns a function into. Call it inside a DAG to add a
    task; ``.override(task_id=..., retries=...)`` changes its arguments."""

    def __init__(self, function: Callable[..., Any], operator_class: type[PythonOperator], kwargs: dict[str, Any]) -> None:
        if not callable(function):
            raise InvalidDag(f"@task needs a function, not {function!r}")
        self.function = function
        self.operator_class = operator_class
        self.kwargs = dict(kwargs)
        functools.update_wrapper(self, function)

    def override(self, **kwargs: Any) -> TaskDecorator:
        return TaskDecorator(self.function, self.operator_class, {**self.kwargs, **kwargs})

    # --- dynamic task mapping (MAP; the logic lives in hub/mapping.py) -----

    def partial(self, **kwargs: Any) -> TaskFlowPartial:
        """Airflow's ``my_task.partial(y=1).expand(x=[...])``."""
        return TaskFlowPartial(self, kwargs)

    def expand(self, **mapped: Any) -> XComArg:
        """One task instance per value of each mapped argument (a list, a
        dict's items, or an upstream task's output), created at run time."""
        return TaskFlowPartial(self, {}).expand(**mapped)

    def expand_kwargs(self, value: Any) -> XComArg:
        """One task instance per dict of arguments."""
        return TaskFlowPartial(self, {}).expand_kwargs(value)

    # --- end of dynamic task mapping ----------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> XComArg:
        return XComArg(self.make_operator(args, kwargs))

    def make_operator(self, args: tuple[Any, ...], kwargs: dict[str, Any], **extra: Any) -> PythonOperator:
        """The task for one call: ``args``/``kwargs`` become its ``op_args``/
        ``op_kwargs`` (XComArgs in them become upstream tasks)."""
        options = {**self.kwargs, **extra}
        dag = options.get("dag") or _current_dag.get()
        if dag is None:
            raise InvalidDag(f"@task function {self.function.__name__!r} was called outside a DAG: call it inside 'with DAG(...)' or a @dag function")
        try:
            inspect.signature(self.function).bind_partial(*args, **kwargs)
        except TypeError as exc:
            raise InvalidDag(f"@task function {self.function.__name__!r}: {exc}") from None
        group = options.get("task_group") or _current_group.get() or dag.task_group
        base = options.pop("task_id", None) or self.function.__name__
        label, n = base, 0
        while group.child_id(label) in dag.tasks:  # Airflow's get_unique_task_id: f, f__1, f__2...
            n += 1
            label = f"{base}__{n}"
        if "multiple_outputs" not in options:
            options["multiple_outputs"] = _returns_dict(self.function)
        if "doc_md" not in options and "doc" not in options and self.function.__doc__:
            options["doc_md"] = inspect.cleandoc(self.function.__doc__)
        return self.operator_class(task_id=label, python_callable=self.function, op_args=list(args), op_kwargs=dict(kwargs), **options)


class _TaskNamespace:
    """``task`` itself: ``@task``, ``@task(...)``, ``@task.python``,
    ``@task.branch``, ``@task.short_circuit`` and ``@task.sensor``."""

    def _decorate(self, operator_class: type[PythonOperator], function: Callable[..., Any] | None, kwargs: dict[str, Any]) -> Any:
        if function is not None:
            return TaskDecorator(function, operator_class, kwargs)
        return lambda f: TaskDecorator(f, operator_class, kwargs)

    def __call__(self, python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        return self._decorate(DecoratedPythonOperator, python_callable, kwargs)

    def python(self, python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        return self._decorate(DecoratedPythonOperator, python_callable, kwargs)

    def branch(self, python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        return self._decorate(DecoratedBranchOperator, python_callable, kwargs)

    def short_circuit(self, python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        return self._decorate(DecoratedShortCircuitOperator, python_callable, kwargs)

    def sensor(self, python_callable: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        return self._decorate(DecoratedSensorOperator, python_callable, kwargs)  # type: ignore[arg-type]


task = _TaskNamespace()


def dag(dag_id: str | Callable[..., Any] | None = None, **dag_kwargs: Any) -> Any:
    """``@dag(...)`` on a function that builds the DAG's tasks. Calling the
    function returns the DAG (call it at module level so the file defines
    it). The function's parameters become DAG params (their defaults, or
    the values passed in the call); inside, they stand for the run's value."""
    if callable(dag_id):  # bare @dag
        return dag()(dag_id)

    def decorator(function: Callable[..., Any]) -> Callable[..., DAG]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def factory(*args: Any, **kwargs: Any) -> DAG:
            try:
                bound = signature.bind_partial(*args, **kwargs)
            except TypeError as exc:
                raise InvalidDag(f"@dag function {function.__name__!r}: {exc}") from None
            params: dict[str, Any] = dict(dag_kwargs.get("params") or {})
            names = []
            for name, p in signature.parameters.items():
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                names.append(name)
                if name in bound.arguments:
                    value = bound.arguments[name]
                    params[name] = Param(value, **params[name].schema) if isinstance(params.get(name), Param) else value
                elif name not in params:
                    params[name] = Param(NOTSET) if p.default is p.empty else p.default
            options = {**dag_kwargs, "params": params}
            if "doc_md" not in options and function.__doc__:
                options["doc_md"] = inspect.cleandoc(function.__doc__)
            with DAG(dag_id if isinstance(dag_id, str) else function.__name__, **options) as built:
                function(**{name: DagParam(name) for name in names})
            return built

        return factory

    return decorator


def task_group(group_id: str | Callable[..., Any] | None = None, **group_kwargs: Any) -> Any:
    """``@task_group`` on a function that creates tasks: each call makes a
    ``TaskGroup`` (``name``, then ``name__1``...). The call returns what the
    function returns, or the group when that is None, so ``start >>
    my_group() >> end`` links to the group's roots and from its leaves."""
    if callable(group_id):
        return task_group()(group_id)

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def factory(*args: Any, **kwargs: Any) -> Any:
            dag_obj = group_kwargs.get("dag") or _current_dag.get()
            if dag_obj is None:
                raise InvalidDag(f"@task_group function {function.__name__!r} was called outside a DAG")
            parent = _current_group.get() or dag_obj.task_group
            base = group_id if isinstance(group_id, str) else function.__name__
            label, n = base, 0
            while parent.child_id(label) in dag_obj.task_group_dict or parent.child_id(label) in dag_obj.tasks:
                n += 1
                label = f"{base}__{n}"
            options = dict(group_kwargs)
            if "tooltip" not in options and function.__doc__:
                options["tooltip"] = inspect.cleandoc(function.__doc__)
            with TaskGroup(label, **options) as group:
                result = function(*args, **kwargs)
            return group if result is None else result

        return mappable_task_group(factory, function, group_id if isinstance(group_id, str) else None, group_kwargs)  # .partial()/.expand() (MAP)

    return decorator
