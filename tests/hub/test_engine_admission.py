"""Pure admission rules (priority, pools, max_active_tasks), weight rules,
retry backoff and the scheduling arguments of DAG files: table tests, no
database."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from hub.admission import UNLIMITED, Admission, Candidate, Verdict, effective_weights, select
from hub.dag import DAG, PythonOperator
from hub.errors import InvalidDag
from hub.lifecycle import MAX_RETRY_DELAY, retry_delay_seconds

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def cand(ti_id: int, *, dag: str = "d", pool: str = "default_pool", slots: int = 1, weight: int = 1, day: int = 0,
         task: str | None = None, per_dag: int | None = None, per_run: int | None = None) -> Candidate:
    return Candidate(ti_id, dag, pool, slots, weight, T0 + timedelta(days=day), run_pk=day, task_id=task or f"t{ti_id}",
                     map_index=ti_id, max_per_dag=per_dag, max_per_run=per_run)


# (description, pools {name: size}, dag limits, held {pool: slots}, dag load, candidates, expected {ti_id: verdict})
ADMISSION_TABLE: list[tuple[str, dict[str, int], dict[str, int], dict[str, int], dict[str, int], list[Candidate], dict[int, Verdict]]] = [
    ("room for all", {"default_pool": 128}, {}, {}, {}, [cand(1), cand(2)], {1: Verdict.ADMIT, 2: Verdict.ADMIT}),
    ("pool of one: highest weight first", {"p": 1}, {}, {}, {},
     [cand(1, pool="p", weight=1), cand(2, pool="p", weight=5)], {2: Verdict.ADMIT, 1: Verdict.POOL_FULL}),
    ("equal weight: oldest logical date first", {"p": 1}, {}, {}, {},
     [cand(1, pool="p", day=2), cand(2, pool="p", day=1)], {2: Verdict.ADMIT, 1: Verdict.POOL_FULL}),
    ("slots already held count", {"p": 2}, {}, {"p": 2}, {}, [cand(1, pool="p")], {1: Verdict.POOL_FULL}),
    ("a big task that does not fit lets a smaller one by", {"p": 3}, {}, {"p": 1}, {},
     [cand(1, pool="p", slots=3, weight=9), cand(2, pool="p", slots=2, weight=1)], {1: Verdict.POOL_FULL, 2: Verdict.ADMIT}),
    ("pool_slots bigger than the pool never fits", {"p": 2}, {}, {}, {}, [cand(1, pool="p", slots=3)], {1: Verdict.POOL_FULL}),
    ("zero-slot pool holds everything back", {"p": 0}, {}, {}, {}, [cand(1, pool="p")], {1: Verdict.POOL_FULL}),
    ("-1 slots is unlimited", {"p": UNLIMITED}, {}, {"p": 1000}, {}, [cand(1, pool="p", slots=50)], {1: Verdict.ADMIT}),
    ("unknown pool", {"default_pool": 128}, {}, {}, {}, [cand(1, pool="nope")], {1: Verdict.UNKNOWN_POOL}),
    ("max_active_tasks counts running instances of every run", {"default_pool": 128}, {"d": 2}, {}, {"d": 1},
     [cand(1, weight=3), cand(2, weight=2), cand(3, weight=1)], {1: Verdict.ADMIT, 2: Verdict.DAG_FULL, 3: Verdict.DAG_FULL}),
    ("another DAG's limit does not apply", {"default_pool": 128}, {"d": 1}, {}, {"d": 1},
     [cand(1), cand(2, dag="e")], {1: Verdict.DAG_FULL, 2: Verdict.ADMIT}),
    ("pools are separate", {"a": 1, "b": 1}, {}, {"a": 1}, {}, [cand(1, pool="a"), cand(2, pool="b")], {1: Verdict.POOL_FULL, 2: Verdict.ADMIT}),
    ("max_active_tis_per_dag counts the task in every run", {"default_pool": 128}, {}, {}, {},
     [cand(1, task="t", per_dag=2, day=1), cand(2, task="t", per_dag=2, day=2), cand(3, task="t", per_dag=2, day=3), cand(4, task="u", day=1)],
     {1: Verdict.ADMIT, 4: Verdict.ADMIT, 2: Verdict.ADMIT, 3: Verdict.TASK_FULL}),
    ("max_active_tis_per_dagrun counts the task within its run", {"default_pool": 128}, {}, {}, {},
     [cand(1, task="t", per_run=1, day=1), cand(2, task="t", per_run=1, day=1), cand(3, task="t", per_run=1, day=2)],
     {1: Verdict.ADMIT, 2: Verdict.TASK_FULL, 3: Verdict.ADMIT}),
]


@pytest.mark.parametrize(("pools", "limits", "held", "load", "candidates", "expected"), [row[1:] for row in ADMISSION_TABLE], ids=[row[0] for row in ADMISSION_TABLE])
def test_admission(pools: dict[str, int], limits: dict[str, int], held: dict[str, int], load: dict[str, int], candidates: list[Candidate], expected: dict[int, Verdict]) -> None:
    decided = select(candidates, Admission(pools, limits, dict(held), dict(load)))
    assert {c.ti_id: v for c, v in decided} == expected
    admitted = [c.ti_id for c, v in decided if v == Verdict.ADMIT]
    assert admitted == [c for c in expected if expected[c] == Verdict.ADMIT], "admitted in priority order"


def test_a_fan_out_charges_every_instance() -> None:
    admission = Admission({"p": 4})
    admission.charge(cand(9, pool="p"), instances=3)
    assert admission.verdict(cand(1, pool="p", slots=2)) == Verdict.POOL_FULL
    assert admission.open_slots("p") == 1


def _tasks(edges: list[tuple[str, str]], weights: dict[str, int] | None = None, rule: str = "downstream") -> dict[str, dict[str, Any]]:
    ids = sorted({n for e in edges for n in e})
    weights = weights or {}
    return {t: {"task_id": t, "upstream": [a for a, b in edges if b == t], "priority_weight": weights.get(t, 1), "weight_rule": rule} for t in ids}


WEIGHT_TABLE = [
    # a >> b >> c, a >> d: downstream sums every task below (each once)
    ("downstream", [("a", "b"), ("b", "c"), ("a", "d")], {}, {"a": 4, "b": 2, "c": 1, "d": 1}),
    ("upstream", [("a", "b"), ("b", "c"), ("a", "d")], {}, {"a": 1, "b": 2, "c": 3, "d": 2}),
    ("absolute", [("a", "b"), ("b", "c"), ("a", "d")], {"a": 7}, {"a": 7, "b": 1, "c": 1, "d": 1}),
    # diamond: a >> (b, c) >> d; d is counted once for a
    ("downstream", [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], {"d": 10}, {"a": 13, "b": 11, "c": 11, "d": 10}),
    ("upstream", [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")], {"a": 5}, {"a": 5, "b": 6, "c": 6, "d": 8}),
]


@pytest.mark.parametrize(("rule", "edges", "weights", "expected"), WEIGHT_TABLE)
def test_weight_rules(rule: str, edges: list[tuple[str, str]], weights: dict[str, int], expected: dict[str, int]) -> None:
    assert effective_weights(_tasks(edges, weights, rule)) == expected


def test_weights_are_clamped_to_32_bits() -> None:
    tasks = _tasks([("a", "b")], {"a": 2**31 - 1, "b": 5})
    assert effective_weights(tasks)["a"] == 2**31 - 1


def test_a_long_chain_weighs_quickly() -> None:
    chain = [(f"t{i:05d}", f"t{i + 1:05d}") for i in range(5000)]
    weights = effective_weights(_tasks(chain))
    assert weights["t00000"] == 5001 and weights["t05000"] == 1


# --- retry delays ---------------------------------------------------------------

BACKOFF_TABLE = [
    # (retry_delay, try that failed, exponential, max_retry_delay, low, high)
    (10.0, 1, False, None, 10, 10),
    (10.0, 3, False, 5.0, 10, 10),  # max_retry_delay applies to backoff only (Airflow)
    (10.0, 1, True, None, 10, 19),
    (10.0, 2, True, None, 20, 39),
    (10.0, 4, True, None, 80, 159),
    (10.0, 4, True, 60.0, 60, 60),
    (0.0, 3, True, None, 1, 1),  # at least one second
    (0.3, 1, True, None, 1, 1),  # rounded up before the jitter
    (300.0, 200, True, None, MAX_RETRY_DELAY, MAX_RETRY_DELAY),  # a day at most, no overflow
]


@pytest.mark.parametrize(("delay", "try_number", "exponential", "cap", "low", "high"), BACKOFF_TABLE)
def test_retry_delay(delay: float, try_number: int, exponential: bool, cap: float | None, low: float, high: float) -> None:
    for key in ("d/run1/t[-1]", "d/run2/t[-1]", "e/run1/x[3]"):
        got = retry_delay_seconds(key, try_number, delay, exponential=exponential, max_retry_delay=cap)
        assert low <= got <= high, (key, got)


def test_backoff_jitter_is_deterministic_and_varies_by_instance() -> None:
    first = [retry_delay_seconds(f"d/run/t{i}[-1]", 3, 60.0, exponential=True) for i in range(20)]
    again = [retry_delay_seconds(f"d/run/t{i}[-1]", 3, 60.0, exponential=True) for i in range(20)]
    assert first == again
    assert len(set(first)) > 5


# --- DAG file arguments ---------------------------------------------------------


def _noop() -> None:
    return None


def _cb(context: dict[str, Any]) -> None:
    return None


def test_scheduling_arguments_serialize_with_default_args() -> None:
    defaults = {"pool": "gpu", "retry_exponential_backoff": True, "max_retry_delay": timedelta(minutes=5), "on_failure_callback": _cb}
    with DAG("s", default_args=defaults, max_active_tasks=3, dagrun_timeout=timedelta(hours=1), sla_miss_callback=_cb) as dag:
        a = PythonOperator(task_id="a", python_callable=_noop, priority_weight=5, weight_rule="absolute", sla=timedelta(minutes=30),
                           depends_on_past=True, pool_slots=2, on_success_callback=[_cb, _cb])
        b = PythonOperator(task_id="b", python_callable=_noop, pool="default_pool")
        a >> b
    data = dag.serialize()
    assert data["max_active_tasks"] == 3 and data["dagrun_timeout"] == 3600.0 and data["callbacks"] == ["sla_miss_callback"]
    ta, tb = data["tasks"]
    assert {k: ta[k] for k in ("pool", "pool_slots", "priority_weight", "weight_rule", "depends_on_past", "retry_exponential_backoff", "max_retry_delay", "sla")} == {
        "pool": "gpu", "pool_slots": 2, "priority_weight": 5, "weight_rule": "absolute", "depends_on_past": True,
        "retry_exponential_backoff": True, "max_retry_delay": 300.0, "sla": 1800.0,
    }
    assert ta["callbacks"] == ["on_success_callback", "on_failure_callback"]
    assert tb["pool"] == "default_pool" and tb["weight_rule"] == "downstream" and tb["sla"] is None and tb["depends_on_past"] is False
    assert ta["wait_for_downstream"] is False and ta["max_active_tis_per_dag"] is None
    assert a.on_success_callback == [_cb, _cb] and a.sla == timedelta(minutes=30)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pool_slots": 0}, "pool_slots must be at least 1"),
        ({"priority_weight": "high"}, "priority_weight must be an integer"),
        ({"weight_rule": "sideways"}, "weight_rule must be one of downstream, upstream, absolute"),
        ({"depends_on_past": "yes"}, "depends_on_past must be True or False"),
        ({"sla": "1h"}, "sla must be a timedelta or a number of seconds"),
        ({"max_retry_delay": -5}, "max_retry_delay must not be negative"),
        ({"on_failure_callback": "alert"}, "on_failure_callback must be a callable or a list of callables"),
        ({"pool": ""}, "pool must be a pool name"),
        ({"max_active_tis_per_dag": 0}, "max_active_tis_per_dag must be at least 1"),
        ({"wait_for_downstream": 1}, "wait_for_downstream must be True or False"),
        ({"max_active_tis_per_dagrun": "one"}, "max_active_tis_per_dagrun must be an integer"),
    ],
)
def test_bad_scheduling_arguments_name_the_task_and_argument(kwargs: dict[str, Any], message: str) -> None:
    with DAG("bad") as _dag, pytest.raises(InvalidDag, match=message) as info:
        PythonOperator(task_id="t", python_callable=_noop, **kwargs)
    assert "'t'" in str(info.value)


def test_bad_dag_arguments() -> None:
    with pytest.raises(InvalidDag, match="max_active_tasks must be at least 1"):
        DAG("bad", max_active_tasks=0)
    with pytest.raises(InvalidDag, match="dagrun_timeout must be a timedelta"):
        DAG("bad", dagrun_timeout="soon")  # type: ignore[arg-type]


def test_wait_for_downstream_implies_depends_on_past() -> None:
    with DAG("w") as dag:
        PythonOperator(task_id="t", python_callable=_noop, wait_for_downstream=True)
    task = dag.serialize()["tasks"][0]
    assert (task["wait_for_downstream"], task["depends_on_past"]) == (True, True)
