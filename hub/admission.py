"""Which ready task instances may start now: Airflow's admission rules,
as pure functions the scheduler feeds with counts from the database.

- Ready instances are considered by ``priority_weight`` (highest first),
  then by their run's logical date (oldest first), like Airflow.
- Each instance takes ``pool_slots`` slots of its pool while it is queued,
  delivered, running or on an offline device (a sensor waiting in
  ``up_for_reschedule`` holds none). A pool of ``-1`` slots is unlimited.
  One that does not fit is passed over, and smaller or lower-priority
  instances behind it may still start.
- A DAG runs at most ``max_active_tasks`` instances at once, over all
  its runs; a task at most ``max_active_tis_per_dag`` over all runs and
  ``max_active_tis_per_dagrun`` within one run (its mapped or fan-out
  instances).
- An instance naming a pool that does not exist fails (``unknown_pool``).

``effective_weights`` turns ``priority_weight`` and ``weight_rule`` into
the weight an instance is ordered by.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from shared.states import TaskState

#: States in which an instance holds its pool slots and counts towards max_active_tasks.
OCCUPYING = frozenset({TaskState.QUEUED, TaskState.DELIVERED, TaskState.RUNNING, TaskState.DEVICE_OFFLINE})
UNLIMITED = -1
_WEIGHT_MIN, _WEIGHT_MAX = -(2**31), 2**31 - 1


class Verdict(StrEnum):
    ADMIT = "admit"
    #: Not enough open slots in the pool now.
    POOL_FULL = "pool_full"
    #: The DAG already runs max_active_tasks instances.
    DAG_FULL = "dag_full"
    #: The task already runs max_active_tis_per_dag (or _per_dagrun) instances.
    TASK_FULL = "task_full"
    #: The pool does not exist: the instance fails.
    UNKNOWN_POOL = "unknown_pool"


@dataclass(frozen=True)
class Candidate:
    """A task instance whose dependencies are met."""

    ti_id: int
    dag_id: str
    pool: str
    pool_slots: int
    priority_weight: int
    logical_date: datetime
    run_pk: int = 0
    task_id: str = ""
    map_index: int = -1
    #: Its state now: ``none`` or ``scheduled`` (already waiting for room).
    state: str = ""
    #: The task's max_active_tis_per_dag and max_active_tis_per_dagrun (None: no limit).
    max_per_dag: int | None = None
    max_per_run: int | None = None

    def sort_key(self) -> tuple[Any, ...]:
        return (-self.priority_weight, self.logical_date, self.run_pk, self.task_id, self.map_index)


@dataclass
class Admission:
    """Open capacity for one scheduling pass; ``charge`` as instances start."""

    #: Slots per pool (``UNLIMITED`` for no limit); a pool missing here does not exist.
    pool_sizes: Mapping[str, int]
    #: max_active_tasks per DAG; a DAG missing here is not limited.
    dag_limits: Mapping[str, int] = field(default_factory=dict)
    #: Slots held per pool now.
    pool_used: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Instances queued or running per DAG now.
    dag_used: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Instances queued or running per (dag_id, task_id) and per (run_pk, task_id),
    #: for the tasks that have max_active_tis_per_dag / _per_dagrun.
    task_used: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    run_task_used: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        self.pool_used = defaultdict(int, self.pool_used)
        self.dag_used = defaultdict(int, self.dag_used)
        self.task_used = defaultdict(int, self.task_used)
        self.run_task_used = defaultdict(int, self.run_task_used)

    def verdict(self, c: Candidate) -> Verdict:
        size = self.pool_sizes.get(c.pool)
        if size is None:
            return Verdict.UNKNOWN_POOL
        limit = self.dag_limits.get(c.dag_id)
        if limit is not None and self.dag_used[c.dag_id] >= limit:
            return Verdict.DAG_FULL
        if (c.max_per_dag is not None and self.task_used[(c.dag_id, c.task_id)] >= c.max_per_dag) or (
            c.max_per_run is not None and self.run_task_used[(c.run_pk, c.task_id)] >= c.max_per_run
        ):
            return Verdict.TASK_FULL
        if size != UNLIMITED and self.pool_used[c.pool] + c.pool_slots > size:
            return Verdict.POOL_FULL
        return Verdict.ADMIT

    def charge(self, c: Candidate, instances: int = 1) -> None:
        """Count ``instances`` started instances of ``c``'s task (a fleet
        fan-out starts several)."""
        self.pool_used[c.pool] += c.pool_slots * instances
        self.dag_used[c.dag_id] += instances
        self.task_used[(c.dag_id, c.task_id)] += instances
        self.run_task_used[(c.run_pk, c.task_id)] += instances

    def open_slots(self, pool: str) -> int | None:
        size = self.pool_sizes.get(pool)
        if size is None:
            return 0
        return None if size == UNLIMITED else max(0, size - self.pool_used[pool])


def ordered(candidates: Iterable[Candidate]) -> list[Candidate]:
    return sorted(candidates, key=Candidate.sort_key)


def select(candidates: Iterable[Candidate], admission: Admission) -> list[tuple[Candidate, Verdict]]:
    """Each candidate in admission order with its verdict, charging every
    admitted one as it goes (one instance each)."""
    decided: list[tuple[Candidate, Verdict]] = []
    for c in ordered(candidates):
        verdict = admission.verdict(c)
        if verdict == Verdict.ADMIT:
            admission.charge(c)
        decided.append((c, verdict))
    return decided


def effective_weights(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    """Each task's weight under its ``weight_rule`` (Airflow's): ``downstream``
    (the default) adds the weights of every task downstream of it,
    ``upstream`` of every task upstream, ``absolute`` only its own. Clamped
    to a 32-bit integer as Airflow does."""
    ids = list(tasks)
    index = {task_id: i for i, task_id in enumerate(ids)}
    own = [int(tasks[t].get("priority_weight", 1)) for t in ids]
    upstream = [[index[u] for u in tasks[t].get("upstream", ()) if u in index] for t in ids]
    downstream: list[list[int]] = [[] for _ in ids]
    for i, ups in enumerate(upstream):
        for u in ups:
            downstream[u].append(i)
    rules = {str(tasks[t].get("weight_rule", "downstream")) for t in ids}
    reach = {
        "downstream": _closure(downstream) if "downstream" in rules else [],
        "upstream": _closure(upstream) if "upstream" in rules else [],
    }
    all_ones = all(w == 1 for w in own)
    weights: dict[str, int] = {}
    for i, task_id in enumerate(ids):
        rule = str(tasks[task_id].get("weight_rule", "downstream"))
        if rule not in reach:
            weight = own[i]
        else:
            others = reach[rule][i]
            weight = own[i] + (others.bit_count() if all_ones else sum(own[j] for j in _bits(others)))
        weights[task_id] = max(_WEIGHT_MIN, min(_WEIGHT_MAX, weight))
    return weights


def _closure(edges: list[list[int]]) -> list[int]:
    """For each node, the set of nodes reachable from it (a bitmask), in
    one pass over the DAG in reverse topological order."""
    n = len(edges)
    indegree = [0] * n
    for outs in edges:
        for j in outs:
            indegree[j] += 1
    order = [i for i in range(n) if indegree[i] == 0]
    for i in order:  # grows while iterating: Kahn's algorithm
        for j in edges[i]:
            indegree[j] -= 1
            if indegree[j] == 0:
                order.append(j)
    reach = [0] * n
    for i in reversed(order):
        mask = 0
        for j in edges[i]:
            mask |= reach[j] | (1 << j)
        reach[i] = mask
    return reach


def _bits(mask: int) -> Iterable[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low
