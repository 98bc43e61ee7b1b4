"""Branching, short-circuits and sensors: what Airflow skips, checked on the
pure structure functions and end to end through the scheduler and the hub
executor on a manual clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.branching import group_roots, skipped_by
from hub.dag import DAG, BaseSensorOperator, EmptyOperator, PokeReturnValue, PythonSensor, SensorTimeout, TaskGroup, TaskRescheduled, TaskSkipped
from hub.models import DagRun
from shared.clock import ManualClock


def structure(d: DAG) -> dict[str, dict[str, Any]]:
    d.validate()
    return {t["task_id"]: t for t in d.serialize()["tasks"]}


def branch_dag() -> dict[str, dict[str, Any]]:
    with DAG("b") as d:
        from hub.dag import BranchPythonOperator

        branch = BranchPythonOperator(task_id="branch", python_callable=lambda: None)
        a, a2, b, join = (EmptyOperator(task_id=n) for n in ("a", "a2", "b", "join"))
        with TaskGroup("g"):
            g1 = EmptyOperator(task_id="one")
            g2 = EmptyOperator(task_id="two")
            g1 >> g2
        branch >> [a, b, g1, join]
        a >> a2 >> join
    return structure(d)


@pytest.mark.parametrize(
    ("output", "skipped"),
    [
        ("a", {"b", "g.one"}),                 # join is downstream of a: an empty branch's join is kept
        (["a", "b"], {"g.one"}),
        ("g", {"a", "b", "join"}),             # a group id stands for its roots
        ("join", {"a", "b", "g.one"}),
        (None, {"a", "b", "g.one", "join"}),   # None: every direct downstream task
        ([], {"a", "b", "g.one", "join"}),
        ("a2", {"a", "b", "g.one"}),           # not a direct downstream: its own downstream (join) is kept
    ],
)
def test_branch_skips_the_direct_downstream_tasks_not_chosen(output: Any, skipped: set[str]) -> None:
    assert skipped_by(branch_dag(), "branch", output) == skipped


def test_group_roots_include_nested_groups() -> None:
    with DAG("roots") as d:
        start = EmptyOperator(task_id="start")
        with TaskGroup("outer") as outer:
            with TaskGroup("inner"):
                deep = EmptyOperator(task_id="deep")
            after = EmptyOperator(task_id="after")
            deep >> after
            lone = EmptyOperator(task_id="lone")
        start >> outer
    tasks = structure(d)
    assert group_roots(tasks, "outer") == ["outer.inner.deep", "outer.lone"]
    assert group_roots(tasks, "outer.inner") == ["outer.inner.deep"]
    assert lone.task_id == "outer.lone"


def test_short_circuit_skips_all_downstream_or_only_direct_ones() -> None:
    from hub.dag import ShortCircuitOperator

    def build(ignore: bool) -> dict[str, dict[str, Any]]:
        with DAG(f"sc{ignore}") as d:
            check = ShortCircuitOperator(task_id="check", python_callable=lambda: False, ignore_downstream_trigger_rules=ignore)
            t1, t2, t3 = (EmptyOperator(task_id=n) for n in ("t1", "t2", "t3"))
            cleanup = EmptyOperator(task_id="cleanup", trigger_rule="all_done")
            check >> t1 >> t2 >> cleanup
            t3 >> cleanup
        return structure(d)

    assert skipped_by(build(True), "check", False) == {"t1", "t2", "cleanup"}
    assert skipped_by(build(True), "check", 0) == {"t1", "t2", "cleanup"}
    assert skipped_by(build(False), "check", []) == {"t1"}
    assert skipped_by(build(True), "check", True) == set()
    assert skipped_by(build(True), "check", {"any": "thing"}) == set()


# --- end to end ----------------------------------------------------------------

BRANCH_DAG = """
from hub.dag import DAG, EmptyOperator, TaskGroup
from hub.taskflow import task

with DAG("branchy") as dag:
    @task.branch
    def pick(params=None):
        return params["go"]

    a, a2, b, b2 = (EmptyOperator(task_id=n) for n in ("a", "a2", "b", "b2"))
    with TaskGroup("grp") as grp:
        inside = EmptyOperator(task_id="inside")
    join = EmptyOperator(task_id="join", trigger_rule="none_failed_min_one_success")
    strict_join = EmptyOperator(task_id="strict_join")
    chosen = pick()
    chosen >> [a, b, grp]
    a >> a2
    b >> b2
    [a2, b2, grp] >> join
    [a2, b2, grp] >> strict_join
"""

SHORT_DAG = """
from hub.dag import DAG, EmptyOperator
from hub.taskflow import task

with DAG("short") as dag:
    @task.short_circuit
    def keep_all(params=None):
        return params["go"]

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    def keep_rules(params=None):
        return params["go"]

    t1, t2 = EmptyOperator(task_id="t1"), EmptyOperator(task_id="t2", trigger_rule="all_done")
    u1, u2 = EmptyOperator(task_id="u1"), EmptyOperator(task_id="u2", trigger_rule="all_done")
    keep_all() >> t1 >> t2
    keep_rules() >> u1 >> u2
"""


def states(hub: Any, run_pk: int) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in hub.tis(run_pk)}


def run_state(hub: Any, run_pk: int) -> str:
    with hub.sessions() as session:
        return session.get(DagRun, run_pk).state


def test_branch_through_the_scheduler_skips_and_propagates(make_hub: Any) -> None:
    hub = make_hub({"branchy.py": BRANCH_DAG})
    run_pk = hub.trigger("branchy", {"go": "a"})
    hub.tick(8)
    assert states(hub, run_pk) == {
        "pick": "success", "a": "success", "a2": "success", "b": "skipped", "b2": "skipped", "grp.inside": "skipped",
        "join": "success",         # none_failed_min_one_success: runs after a skipped branch
        "strict_join": "skipped",  # all_success: the skip propagates
    }
    assert run_state(hub, run_pk) == "success"
    run_pk = hub.trigger("branchy", {"go": ["grp", "b"]})
    hub.tick(8)
    found = states(hub, run_pk)
    assert (found["grp.inside"], found["b2"], found["a"], found["a2"], found["join"]) == ("success", "success", "skipped", "skipped", "success")


def test_a_branch_returning_an_unknown_task_fails(make_hub: Any) -> None:
    hub = make_hub({"branchy.py": BRANCH_DAG})
    run_pk = hub.trigger("branchy", {"go": "nowhere"})
    hub.tick(8)
    [pick] = [ti for ti in hub.tis(run_pk) if ti.task_id == "pick"]
    assert pick.state == "failed" and "nowhere" in pick.error["message"]
    assert states(hub, run_pk)["a"] == "upstream_failed"
    assert run_state(hub, run_pk) == "failed"


@pytest.mark.parametrize("go", [False, True])
def test_short_circuit_through_the_scheduler(make_hub: Any, go: bool) -> None:
    hub = make_hub({"short.py": SHORT_DAG})
    run_pk = hub.trigger("short", {"go": go})
    hub.tick(8)
    found = states(hub, run_pk)
    if go:
        assert set(found.values()) == {"success"}
    else:
        # ignore_downstream_trigger_rules=True: everything downstream, even all_done.
        assert (found["t1"], found["t2"]) == ("skipped", "skipped")
        # False: only the direct downstream; all_done further down still runs.
        assert (found["u1"], found["u2"]) == ("skipped", "success")
    assert run_state(hub, run_pk) == "success"


def sensor_dag(flag: Path, **options: Any) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in {"poke_interval": 60, "timeout": 300, "mode": "reschedule", **options}.items())
    return f"""
from pathlib import Path
from hub.dag import DAG, EmptyOperator
from hub.taskflow import task

with DAG("sensing") as dag:
    @task.sensor({args})
    def wait_for_flag():
        return Path({str(flag)!r}).exists()

    wait_for_flag() >> EmptyOperator(task_id="after")
"""


def sensor_ti(hub: Any, run_pk: int) -> Any:
    return next(ti for ti in hub.tis(run_pk) if ti.task_id == "wait_for_flag")


def test_reschedule_sensor_gives_its_slot_back_and_keeps_its_try(make_hub: Any, tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    hub = make_hub({"sensing.py": sensor_dag(flag)})
    run_pk = hub.trigger("sensing")
    hub.tick()
    first = sensor_ti(hub, run_pk)
    assert (first.state, first.try_number) == ("up_for_reschedule", 1)
    assert first.next_try_at == first.sensor_started_at + timedelta(seconds=60)
    hub.clock.advance(30)
    hub.tick()
    assert sensor_ti(hub, run_pk).state == "up_for_reschedule"  # not due yet
    hub.clock.advance(31)
    hub.tick()
    again = sensor_ti(hub, run_pk)
    assert (again.state, again.try_number, again.sensor_started_at) == ("up_for_reschedule", 1, first.sensor_started_at)
    flag.write_text("ready")
    hub.clock.advance(61)
    hub.tick()
    done = sensor_ti(hub, run_pk)
    assert (done.state, done.try_number) == ("success", 1)
    assert states(hub, run_pk)["after"] == "success"


@pytest.mark.parametrize(("soft_fail", "state"), [(True, "skipped"), (False, "failed")])
def test_sensor_timeout_fails_or_soft_fails(make_hub: Any, tmp_path: Path, soft_fail: bool, state: str) -> None:
    hub = make_hub({"sensing.py": sensor_dag(tmp_path / "never", soft_fail=soft_fail, retries=2)})
    run_pk = hub.trigger("sensing")
    hub.tick()
    for _ in range(6):
        hub.clock.advance(61)
        hub.tick()
    ti = sensor_ti(hub, run_pk)
    assert ti.state == state and ti.try_number == 1  # a timeout is not retried
    assert states(hub, run_pk)["after"] == ("skipped" if soft_fail else "upstream_failed")
    if not soft_fail:
        assert ti.error["code"] == "sensor_timeout"


# --- sensors in poke mode, driven directly ---------------------------------------


class Flip(BaseSensorOperator):
    def __init__(self, task_id: str, *, after: int, **kwargs: Any) -> None:
        self.after = after
        self.pokes = 0
        super().__init__(task_id, **kwargs)

    def poke(self, context: dict[str, Any]) -> bool | PokeReturnValue:
        self.pokes += 1
        return PokeReturnValue(self.pokes >= self.after, xcom_value={"pokes": self.pokes})


def poke_context(clock: ManualClock, slept: list[float]) -> dict[str, Any]:
    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    return {"clock": clock, "sleep": sleep, "sensor_started_at": None}


def test_poke_mode_waits_in_the_worker_and_returns_the_poke_value() -> None:
    with DAG("poke"):
        sensor = Flip("flip", after=3, poke_interval=10, timeout=100)
    clock, slept = ManualClock(1_767_225_600.0), []
    assert sensor.execute(poke_context(clock, slept)) == {"pokes": 3}
    assert slept == [10.0, 10.0]


def test_poke_mode_timeout_and_soft_fail() -> None:
    with DAG("poke_timeout"):
        hard = PythonSensor(task_id="hard", python_callable=lambda: False, poke_interval=10, timeout=25)
        soft = PythonSensor(task_id="soft", python_callable=lambda: False, poke_interval=10, timeout=25, soft_fail=True)
    clock = ManualClock(1_767_225_600.0)
    with pytest.raises(SensorTimeout, match="timed out"):
        hard.execute(poke_context(clock, []))
    with pytest.raises(TaskSkipped):
        soft.execute(poke_context(clock, []))


def test_reschedule_mode_raises_with_the_next_poke_time_and_backoff_grows() -> None:
    with DAG("resched"):
        plain = PythonSensor(task_id="plain", python_callable=lambda: False, poke_interval=30, mode="reschedule")
        backoff = PythonSensor(task_id="backoff", python_callable=lambda: False, poke_interval=10, mode="reschedule",
                               exponential_backoff=True, max_wait=1000, timeout=10_000)
    clock = ManualClock(1_767_225_600.0)
    started = datetime.fromtimestamp(clock.now(), tz=UTC)
    with pytest.raises(TaskRescheduled) as info:
        plain.execute({"clock": clock, "sensor_started_at": started})
    assert info.value.reschedule_at == started + timedelta(seconds=30)
    intervals = [backoff.next_interval(n, started, 0.0) for n in range(1, 8)]
    assert all(later >= earlier for earlier, later in zip(intervals[2:], intervals[3:]))
    assert intervals[-1] >= 10 * 2 ** 5 and max(intervals) <= 1000


# --- property: random DAGs below a branch ------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from hub.trigger_rules import Decision, decide  # noqa: E402

#: "always" runs before its upstreams finish, so before the branch decides
#: (a race in Airflow too): left out of this property.
RULES = ("all_success", "all_failed", "all_done", "all_skipped", "one_success", "one_failed", "one_done",
         "none_failed", "none_failed_min_one_success", "none_skipped")


@st.composite
def branch_plans(draw: Any) -> tuple[list[tuple[str, list[str], str]], Any]:
    count = draw(st.integers(2, 7))
    ids = [f"t{i}" for i in range(count)]
    tasks = []
    for i, task_id in enumerate(ids):
        upstream = draw(st.lists(st.sampled_from(["branch", *ids[:i]]), min_size=1, max_size=3, unique=True))
        tasks.append((task_id, upstream, draw(st.sampled_from(RULES))))
    choice = draw(st.one_of(st.none(), st.sampled_from(ids), st.lists(st.sampled_from(ids), max_size=3, unique=True)))
    return tasks, choice


def branch_dag_file(dag_id: str, tasks: list[tuple[str, list[str], str]]) -> str:
    lines = [
        "from hub.sdk import DAG, EmptyOperator, task",
        f"with DAG({dag_id!r}) as dag:",
        "    @task.branch(task_id='branch')",
        "    def branch(params=None):",
        "        return params['choice']",
        "    t = {'branch': branch()}",
    ]
    for task_id, upstream, rule in tasks:
        lines.append(f"    t[{task_id!r}] = EmptyOperator(task_id={task_id!r}, trigger_rule={rule!r})")
        lines.extend(f"    t[{up!r}] >> t[{task_id!r}]" for up in upstream)
    return "\n".join(lines) + "\n"


def expected_states(tasks: list[tuple[str, list[str], str]], choice: Any, structure: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Airflow's outcome with every task succeeding when it runs: the branch's
    skips first, then each task's trigger rule on its upstreams' final states."""
    skipped = skipped_by(structure, "branch", choice)
    final = {"branch": "success"}
    for task_id, upstream, rule in tasks:  # topological order
        if task_id in skipped:
            final[task_id] = "skipped"
            continue
        decision = decide(rule, [final[u] for u in upstream])
        assert decision != Decision.WAIT
        final[task_id] = "success" if decision == Decision.RUN else decision.value
    return final


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=branch_plans())
def test_property_random_dags_below_a_branch_end_as_airflow_decides(make_hub: Any, tmp_path: Path, plan: Any) -> None:
    from hub.models import Dag
    from shared.clock import utcnow

    tasks, choice = plan
    hub = _property_hub(make_hub)
    dag_id = f"prop_{len(list((tmp_path / 'dags').glob('prop_*.py')))}"
    (tmp_path / "dags" / f"{dag_id}.py").write_text(branch_dag_file(dag_id, tasks))
    hub.scheduler.parse_dags(utcnow(hub.clock), force=True)
    run_pk = hub.trigger(dag_id, {"choice": choice})
    hub.tick(rounds=len(tasks) + 4)
    with hub.sessions() as session:
        structure = {t["task_id"]: t for t in session.get(Dag, dag_id).structure["tasks"]}
    found = states(hub, run_pk)
    assert found == expected_states(tasks, choice, structure)
    assert run_state(hub, run_pk) in ("success", "failed")


_hubs: dict[int, Any] = {}


def _property_hub(make_hub: Any) -> Any:
    """One hub per test (the fixture is function-scoped; hypothesis reuses it
    across examples), each example adding its own DAG file."""
    key = id(make_hub)
    if key not in _hubs:
        _hubs.clear()
        _hubs[key] = make_hub({})
    return _hubs[key]
