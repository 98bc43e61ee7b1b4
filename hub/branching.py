"""What a finished branch or short-circuit task skips, from the serialized
structure alone (the scheduler never imports DAG files).

Airflow's semantics (``SkipMixin.skip_all_except`` and
``ShortCircuitOperator``):

- a branch (``@task.branch``, ``BranchPythonOperator``) returns task ids
  and/or task group ids (a group stands for its roots); every *direct*
  downstream task of the branch that is not chosen, and not itself
  downstream of a chosen task (the "join" of an empty branch), is skipped.
  ``None`` skips every direct downstream task. Further downstream, the
  trigger rules propagate the skip (``all_success`` skips,
  ``none_failed_min_one_success`` joins run);
- a short-circuit with a falsy result skips every task downstream of it
  (``ignore_downstream_trigger_rules=True``, the default), or only its
  direct downstream tasks (``False``), leaving the rest to trigger rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Tasks = Mapping[str, Mapping[str, Any]]

_graphs: dict[int, tuple[Tasks, dict[str, list[str]], tuple[str, ...]]] = {}


def _graph(tasks: Tasks) -> tuple[dict[str, list[str]], tuple[str, ...]]:
    """Downstream lists and the deciding tasks of a structure; computed once
    per structure object (the scheduler keeps one per DAG version)."""
    cached = _graphs.get(id(tasks))
    if cached is not None and cached[0] is tasks:
        return cached[1], cached[2]
    downstream: dict[str, list[str]] = {task_id: [] for task_id in tasks}
    for task_id, spec in tasks.items():
        for up in spec.get("upstream", ()):
            downstream.setdefault(up, []).append(task_id)
    deciders = tuple(t for t, spec in tasks.items() if spec.get("is_branch") or spec.get("short_circuit"))
    if len(_graphs) > 256:
        _graphs.clear()
    _graphs[id(tasks)] = (tasks, downstream, deciders)
    return downstream, deciders


def deciders(tasks: Tasks) -> tuple[str, ...]:
    """Task ids of the branch and short-circuit tasks of a structure."""
    return _graph(tasks)[1]


def _descendants(downstream: Mapping[str, list[str]], start: Iterable[str]) -> set[str]:
    seen: set[str] = set()
    stack = list(start)
    while stack:
        for child in downstream.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


def group_roots(tasks: Tasks, group_id: str) -> list[str]:
    """The tasks of group ``group_id`` (nested groups included) that have no
    upstream inside it."""
    prefix = group_id + "."
    members = {t for t, spec in tasks.items() if (spec.get("task_group") or "") == group_id or (spec.get("task_group") or "").startswith(prefix)}
    return sorted(t for t in members if not set(tasks[t].get("upstream", ())) & members)


def skipped_by(tasks: Tasks, decider_id: str, output: Any) -> set[str]:
    """The task ids that the successful decider ``decider_id``, having
    returned ``output``, skips."""
    spec = tasks.get(decider_id)
    if spec is None:
        return set()
    downstream, _ = _graph(tasks)
    direct = set(downstream.get(decider_id, ()))
    if spec.get("short_circuit"):
        if output:
            return set()
        if spec.get("ignore_downstream_trigger_rules", True):
            return _descendants(downstream, [decider_id])
        return direct
    if not spec.get("is_branch"):
        return set()
    chosen: set[str] = set()
    for branch in [] if output is None else [output] if isinstance(output, str) else output if isinstance(output, list) else []:
        if not isinstance(branch, str):
            continue
        if branch in tasks:
            chosen.add(branch)
        else:
            chosen.update(group_roots(tasks, branch))
    followed = chosen | _descendants(downstream, chosen)
    return direct - followed
