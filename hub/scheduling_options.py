"""The scheduling arguments of operators and DAGs, in Airflow's names:
checked when the DAG file is parsed, serialized for the scheduler.

``hub.dag`` calls ``task_options`` from ``BaseOperator.__init__`` and
``dag_options`` from ``DAG.__init__``; the values land on the object as
attributes of the same name (``task.pool``, ``dag.dagrun_timeout``...) so a
DAG file and the hub workers read them as in Airflow, and their
``serialize`` adds ``serialize_task_options`` / ``serialize_dag_options``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from hub.errors import InvalidDag

DEFAULT_POOL = "default_pool"
WEIGHT_RULES = ("downstream", "upstream", "absolute")
TASK_CALLBACKS = ("on_success_callback", "on_failure_callback", "on_retry_callback", "on_execute_callback")
DAG_CALLBACKS = ("on_success_callback", "on_failure_callback", "sla_miss_callback")
#: Airflow's defaults (core.max_active_tasks_per_dag, core.max_active_runs_per_dag).
DEFAULT_MAX_ACTIVE_TASKS = 16
DEFAULT_MAX_ACTIVE_RUNS = 16

_UNSET: Any = object()


def task_options(owner: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The operator's scheduling attributes from its own arguments
    (``given``; missing or ``None`` means "not given") and the DAG's
    ``default_args``. Raises ``InvalidDag`` naming the task and argument."""

    def pick(name: str, fallback: Any) -> Any:
        value = given.get(name)
        if value is None:
            value = defaults.get(name)
        return fallback if value is None else value

    where = f"task {owner!r}"
    pool = pick("pool", DEFAULT_POOL)
    if not isinstance(pool, str) or not pool or len(pool) > 256:
        raise InvalidDag(f"{where}: pool must be a pool name (1-256 characters), got {pool!r}")
    options = {
        "pool": pool,
        "pool_slots": _int(where, "pool_slots", pick("pool_slots", 1), minimum=1),
        "priority_weight": _int(where, "priority_weight", pick("priority_weight", 1)),
        "weight_rule": pick("weight_rule", "downstream"),
        "depends_on_past": _bool(where, "depends_on_past", pick("depends_on_past", False)),
        "wait_for_downstream": _bool(where, "wait_for_downstream", pick("wait_for_downstream", False)),
        "retry_exponential_backoff": _bool(where, "retry_exponential_backoff", pick("retry_exponential_backoff", False)),
        "max_retry_delay": _duration(where, "max_retry_delay", pick("max_retry_delay", _UNSET)),
        "sla": _duration(where, "sla", pick("sla", _UNSET)),
        "max_active_tis_per_dag": _limit(where, "max_active_tis_per_dag", pick("max_active_tis_per_dag", None)),
        "max_active_tis_per_dagrun": _limit(where, "max_active_tis_per_dagrun", pick("max_active_tis_per_dagrun", None)),
    }
    # Airflow: wait_for_downstream forces depends_on_past.
    options["depends_on_past"] = options["depends_on_past"] or options["wait_for_downstream"]
    rule = options["weight_rule"]
    if not isinstance(rule, str) or rule.lower() not in WEIGHT_RULES:
        raise InvalidDag(f"{where}: weight_rule must be one of {', '.join(WEIGHT_RULES)}, got {rule!r}")
    options["weight_rule"] = rule.lower()
    for name in TASK_CALLBACKS:
        options[name] = _callbacks(where, name, pick(name, _UNSET))
    return options


def dag_options(dag_id: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """The DAG's scheduling attributes (``max_active_tasks``,
    ``dagrun_timeout``, its callbacks). Raises ``InvalidDag``."""
    where = f"DAG {dag_id!r}"
    max_tasks = given.get("max_active_tasks")
    options: dict[str, Any] = {
        "max_active_tasks": _int(where, "max_active_tasks", DEFAULT_MAX_ACTIVE_TASKS if max_tasks is None else max_tasks, minimum=1),
        "dagrun_timeout": _duration(where, "dagrun_timeout", given.get("dagrun_timeout", _UNSET)),
    }
    for name in DAG_CALLBACKS:
        options[name] = _callbacks(where, name, given.get(name, _UNSET))
    return options


def serialize_task_options(task: Any) -> dict[str, Any]:
    """The contract keys the scheduler reads (see ``hub.dag``)."""
    return {
        "pool": task.pool,
        "pool_slots": task.pool_slots,
        "priority_weight": task.priority_weight,
        "weight_rule": task.weight_rule,
        "depends_on_past": task.depends_on_past,
        "wait_for_downstream": task.wait_for_downstream,
        "retry_exponential_backoff": task.retry_exponential_backoff,
        "max_retry_delay": _secs(task.max_retry_delay),
        "sla": _secs(task.sla),
        "max_active_tis_per_dag": task.max_active_tis_per_dag,
        "max_active_tis_per_dagrun": task.max_active_tis_per_dagrun,
        "callbacks": [name for name in TASK_CALLBACKS if getattr(task, name)],
    }


def serialize_dag_options(dag: Any) -> dict[str, Any]:
    return {
        "max_active_tasks": dag.max_active_tasks,
        "dagrun_timeout": _secs(dag.dagrun_timeout),
        "callbacks": [name for name in DAG_CALLBACKS if getattr(dag, name)],
    }


def _secs(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _int(where: str, name: str, value: Any, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidDag(f"{where}: {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidDag(f"{where}: {name} must be at least {minimum}, got {value}")
    return value


def _limit(where: str, name: str, value: Any) -> int | None:
    return None if value is None else _int(where, name, value, minimum=1)


def _bool(where: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidDag(f"{where}: {name} must be True or False, got {value!r}")
    return value


def _duration(where: str, name: str, value: Any) -> timedelta | None:
    """A ``timedelta`` (Airflow's type) or seconds; ``None`` when unset."""
    if value is _UNSET or value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise InvalidDag(f"{where}: {name} must be a timedelta or a number of seconds, got {value!r}")
    if seconds < 0:
        raise InvalidDag(f"{where}: {name} must not be negative, got {value!r}")
    return timedelta(seconds=seconds)


def _callbacks(where: str, name: str, value: Any) -> list[Callable[..., Any]]:
    """Airflow accepts one callable or a list of them; kept as a list."""
    if value is _UNSET or value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not callable(item):
            raise InvalidDag(f"{where}: {name} must be a callable or a list of callables, got {item!r}")
    return items
