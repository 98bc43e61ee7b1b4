"""The authoring API builds the structure the scheduler works from: TaskFlow,
task groups, default_args, XComArgs, params, branches and sensors, each
serialized per the structure contract."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from hub.dag import (
    DAG,
    AgentOperator,
    BranchPythonOperator,
    EmptyOperator,
    PythonOperator,
    PythonSensor,
    ShortCircuitOperator,
    TaskGroup,
    chain,
    cross_downstream,
    every_agent,
)
from hub.errors import InvalidDag, InvalidRequest
from hub.params import Param, resolve_run_params
from hub.taskflow import dag, task, task_group


def tasks_of(d: DAG) -> dict[str, dict[str, Any]]:
    d.validate()
    return {t["task_id"]: t for t in d.serialize()["tasks"]}


def test_taskflow_builds_tasks_dependencies_and_xcom_references() -> None:
    @dag(schedule=None, tags=["etl"])
    def etl() -> None:
        """Extract, then load."""

        @task
        def extract() -> dict[str, int]:
            return {"rows": 3, "bad": 0}

        @task(retries=2, retry_delay=timedelta(seconds=30))
        def load(rows: int, mode: str = "append") -> int:
            return rows

        load(extract()["rows"], mode="replace")

    d = etl()
    assert d.dag_id == "etl" and d.doc_md == "Extract, then load." and d.tags == ["etl"]
    tasks = tasks_of(d)
    assert tasks["extract"]["multiple_outputs"] is True  # inferred from "-> dict[...]", as Airflow does
    assert tasks["extract"]["operator"] == "DecoratedPythonOperator"
    load_ = tasks["load"]
    assert load_["upstream"] == ["extract"]
    assert (load_["retries"], load_["retry_delay"]) == (2, 30.0)
    assert load_["xcom_args"] == {"op_args.0": {"task_id": "extract", "key": "rows"}}
    assert load_["templates"]["op_args"] == [{"__xcom__": {"task_id": "extract", "key": "rows"}}]
    assert load_["templates"]["op_kwargs"] == {"mode": "replace"}


def test_calling_a_task_twice_gives_unique_ids_and_override_renames() -> None:
    with DAG("twice") as d:
        @task
        def ping() -> None:
            return None

        ping()
        ping()
        ping.override(task_id="custom")()
    assert sorted(tasks_of(d)) == ["custom", "ping", "ping__1"]


def test_a_task_called_outside_a_dag_is_a_clear_error() -> None:
    @task
    def lonely() -> int:
        return 1

    with pytest.raises(InvalidDag, match="outside a DAG"):
        lonely()


def test_default_args_fill_every_operator_argument_they_name_and_groups_override() -> None:
    defaults = {"retries": 3, "poke_interval": 7, "trigger_rule": "all_done", "not_an_argument": 1, "execution_timeout": 60}
    with DAG("defaults", default_args=defaults) as d:
        plain = EmptyOperator(task_id="plain")
        explicit = EmptyOperator(task_id="explicit", retries=0)
        sensor = PythonSensor(task_id="sensor", python_callable=lambda: True)
        with TaskGroup("outer", default_args={"retries": 5}):
            with TaskGroup("inner", default_args={"trigger_rule": "one_success"}):
                nested = EmptyOperator(task_id="nested")
        own = EmptyOperator(task_id="own", default_args={"retries": 9})
        plain >> [explicit, sensor, nested, own]
    tasks = tasks_of(d)
    assert tasks["plain"]["retries"] == 3 and tasks["plain"]["trigger_rule"] == "all_done"
    assert tasks["plain"]["execution_timeout"] == 60.0
    assert tasks["explicit"]["retries"] == 0
    assert tasks["sensor"]["sensor"]["poke_interval"] == 7.0
    assert tasks["outer.inner.nested"]["retries"] == 5
    assert tasks["outer.inner.nested"]["trigger_rule"] == "one_success"
    assert tasks["outer.inner.nested"]["task_group"] == "outer.inner"
    assert tasks["own"]["retries"] == 9
    assert sensor.poke_interval == 7.0


def test_task_group_edges_go_from_its_leaves_and_to_its_roots() -> None:
    with DAG("groups") as d:
        start = EmptyOperator(task_id="start")
        with TaskGroup("g") as g:
            a = EmptyOperator(task_id="a")
            b = EmptyOperator(task_id="b")
            c = EmptyOperator(task_id="c")
            a >> c
        end = EmptyOperator(task_id="end")
        start >> g >> end
    tasks = tasks_of(d)
    assert tasks["g.a"]["upstream"] == ["start"] and tasks["g.b"]["upstream"] == ["start"]
    assert tasks["g.c"]["upstream"] == ["g.a"]  # not a root: the group edge lands on roots only
    assert tasks["end"]["upstream"] == ["g.b", "g.c"]
    assert b.task_id == "g.b" and b.task_group is g


def test_task_group_decorator_and_chain_with_xcomargs_and_groups() -> None:
    with DAG("tg") as d:
        @task
        def make() -> int:
            return 1

        @task
        def use(x: int) -> int:
            return x

        @task_group
        def section(x: Any) -> None:
            use(x)
            use(x)

        first = make()
        section_a = section(first)
        section_b = section(first)
        done = EmptyOperator(task_id="done")
        chain(first, section_a, section_b, done)
    tasks = tasks_of(d)
    assert set(tasks) == {"make", "section.use", "section.use__1", "section__1.use", "section__1.use__1", "done"}
    assert tasks["section__1.use"]["upstream"] == ["make", "section.use", "section.use__1"]
    assert tasks["done"]["upstream"] == ["section__1.use", "section__1.use__1"]


def test_chain_pairs_equal_lists_and_cross_downstream_links_all() -> None:
    with DAG("chains") as d:
        a, b, c, x, y = (EmptyOperator(task_id=n) for n in "abcxy")
        chain(a, [b, c], [x, y])
        p, q = EmptyOperator(task_id="p"), EmptyOperator(task_id="q")
        cross_downstream([x, y], [p, q])
    tasks = tasks_of(d)
    assert tasks["x"]["upstream"] == ["b"] and tasks["y"]["upstream"] == ["c"]
    assert tasks["p"]["upstream"] == ["x", "y"] and tasks["q"]["upstream"] == ["x", "y"]
    with DAG("uneven"):
        with pytest.raises(InvalidDag, match="same length"):
            chain([EmptyOperator(task_id="1")], [EmptyOperator(task_id="2"), EmptyOperator(task_id="3")])


def test_operator_output_and_shift_operators_with_xcomargs() -> None:
    with DAG("shift") as d:
        t1 = PythonOperator(task_id="t1", python_callable=lambda: 1)
        t2 = PythonOperator(task_id="t2", python_callable=lambda x: x, op_kwargs={"x": t1.output})
        t3 = EmptyOperator(task_id="t3")
        t2.output >> t3
        t3 << t1.output
    tasks = tasks_of(d)
    assert tasks["t2"]["upstream"] == ["t1"]
    assert tasks["t3"]["upstream"] == ["t1", "t2"]
    assert tasks["t2"]["xcom_args"] == {"op_kwargs.x": {"task_id": "t1", "key": "return_value"}}


def test_agent_params_may_hold_templates_and_xcomargs() -> None:
    with DAG("agent") as d:
        compute = PythonOperator(task_id="compute", python_callable=lambda: 5)
        AgentOperator(task_id="probe", job_type="noop", target=every_agent(site="a"),
                      params={"threshold": compute.output, "day": "{{ ds }}", "fixed": [1, 2]})
    probe = tasks_of(d)["probe"]
    assert probe["upstream"] == ["compute"]
    assert probe["params"] == {"threshold": {"__xcom__": {"task_id": "compute", "key": "return_value"}}, "day": "{{ ds }}", "fixed": [1, 2]}
    assert probe["templates"] == {"params": probe["params"]}
    assert probe["xcom_args"] == {"params.threshold": {"task_id": "compute", "key": "return_value"}}
    assert probe["target"] == {"mode": "all", "agent_id": None, "labels": {"site": "a"}}
    with DAG("bad_agent"):
        with pytest.raises(InvalidDag, match="JSON"):
            AgentOperator(task_id="x", job_type="noop", params={"when": object()})
        with pytest.raises(InvalidDag, match="reserved"):
            AgentOperator(task_id="y", job_type="noop", params={"a": {"__xcom__": "forged"}})


def test_branch_short_circuit_and_sensor_serialize_their_behaviour() -> None:
    with DAG("control") as d:
        b = BranchPythonOperator(task_id="b", python_callable=lambda: "x")
        s = ShortCircuitOperator(task_id="s", python_callable=lambda: False, ignore_downstream_trigger_rules=False)
        w = PythonSensor(task_id="w", python_callable=lambda: True, mode="reschedule", poke_interval=timedelta(minutes=1),
                         timeout=600, soft_fail=True, exponential_backoff=True, max_wait=300, outlets=["s3://bucket/x"])
        x = EmptyOperator(task_id="x")
        b >> x
        s >> w

        @task.branch
        def choose() -> str:
            return "x"

        @task.short_circuit
        def check() -> bool:
            return True

        @task.sensor(poke_interval=5, timeout=50, mode="reschedule")
        def wait() -> bool:
            return True

        choose() >> check() >> wait()
    tasks = tasks_of(d)
    assert tasks["b"]["is_branch"] and not tasks["b"]["short_circuit"]
    assert tasks["s"]["short_circuit"] and tasks["s"]["ignore_downstream_trigger_rules"] is False
    assert tasks["w"]["sensor"] == {"mode": "reschedule", "poke_interval": 60.0, "timeout": 600.0, "soft_fail": True,
                                    "exponential_backoff": True, "max_wait": 300.0}
    assert tasks["w"]["outlets"] == ["s3://bucket/x"]
    assert tasks["choose"]["is_branch"] and tasks["check"]["short_circuit"]
    assert tasks["check"]["ignore_downstream_trigger_rules"] is True
    assert tasks["wait"]["sensor"]["mode"] == "reschedule" and tasks["wait"]["operator"] == "DecoratedSensorOperator"
    assert tasks["x"]["sensor"] is None and tasks["x"]["is_branch"] is False


def test_invalid_definitions_are_clear_errors() -> None:
    with DAG("bad"):
        with pytest.raises(InvalidDag, match="sensor mode"):
            PythonSensor(task_id="s", python_callable=lambda: True, mode="sometimes")
        with pytest.raises(InvalidDag, match="trigger_rule"):
            EmptyOperator(task_id="e", trigger_rule="most_success")
        EmptyOperator(task_id="dup")
        with pytest.raises(InvalidDag, match="two tasks"):
            EmptyOperator(task_id="dup")
        with pytest.raises(InvalidDag, match="cannot make a dependency"):
            EmptyOperator(task_id="f") >> "g"  # type: ignore[operator]
    with pytest.raises(InvalidDag, match="not in a DAG"):
        TaskGroup("floating")


def test_params_serialize_and_bad_defaults_fail_at_parse_time() -> None:
    with DAG("p", params={"limit": Param(10, type="integer", minimum=1, description="rows"), "mode": "fast",
                          "site": Param(type="string", enum=["a", "b"])}) as d:
        EmptyOperator(task_id="t")
    d.validate()
    assert d.serialize()["params"] == {
        "limit": {"default": 10, "required": False, "schema": {"type": "integer", "minimum": 1, "description": "rows"}, "description": "rows"},
        "mode": {"default": "fast", "required": False, "schema": {}, "description": None},
        "site": {"default": None, "required": True, "schema": {"type": "string", "enum": ["a", "b"]}, "description": None},
    }
    with DAG("bad_default", params={"n": Param(-1, type="integer", minimum=0)}) as bad:
        EmptyOperator(task_id="t")
    with pytest.raises(InvalidDag, match="minimum"):
        bad.validate()
    with pytest.raises(InvalidDag, match="schema"):
        Param(1, type="no-such-type")
    with DAG("scheduled_required", schedule="@daily", params={"site": Param(type="string")}) as scheduled:
        EmptyOperator(task_id="t")
    with pytest.raises(InvalidDag, match="site has none"):
        scheduled.validate()


def test_run_params_merge_conf_over_defaults_and_validate() -> None:
    with DAG("p", params={"limit": Param(10, type="integer", minimum=1), "site": Param(type="string", enum=["a", "b"])}) as d:
        EmptyOperator(task_id="t")
    spec = d.serialize()["params"]
    assert resolve_run_params(spec, {"site": "a"}) == {"limit": 10, "site": "a"}
    assert resolve_run_params(spec, {"site": "b", "limit": 3, "extra": "{{ not rendered }}"}) == {"limit": 3, "site": "b", "extra": "{{ not rendered }}"}
    with pytest.raises(InvalidRequest, match="'site' is required"):
        resolve_run_params(spec, {})
    with pytest.raises(InvalidRequest) as info:
        resolve_run_params(spec, {"site": "c", "limit": 0})
    assert "'site'" in str(info.value) and "'limit'" in str(info.value) and "minimum" in str(info.value)


def test_dag_decorator_turns_function_arguments_into_params() -> None:
    @dag(params={"n": Param(2, type="integer")})
    def with_args(n: int, label: str = "x") -> None:
        @task
        def show(n: int, label: str) -> str:
            return f"{label}{n}"

        show(n, label)

    d = with_args(n=4)
    spec = d.serialize()["params"]
    assert spec["n"]["default"] == 4 and spec["n"]["schema"] == {"type": "integer"}
    assert spec["label"]["default"] == "x"
    assert tasks_of(d)["show"]["templates"]["op_args"] == [{"__param__": "n"}, {"__param__": "label"}]


def test_serialization_is_stable_across_parses() -> None:
    def build() -> dict[str, Any]:
        with DAG("stable") as d:
            PythonOperator(task_id="t", python_callable=print, op_kwargs={"when": object(), "n": 1})
        return d.serialize()

    first, second = build(), build()
    assert first == second
    assert first["tasks"][0]["templates"]["op_kwargs"] == {"when": "<object>", "n": 1}


def test_dags_need_no_module_level_name(tmp_path: Any) -> None:
    from hub.dagbag import load_file

    path = tmp_path / "unnamed.py"
    path.write_text(
        "from hub.sdk import DAG, EmptyOperator, dag, task\n"
        "with DAG('from_with'):\n"
        "    EmptyOperator(task_id='t')\n"
        "@dag()\n"
        "def from_decorator():\n"
        "    @task\n"
        "    def t():\n"
        "        return 1\n"
        "    t()\n"
        "from_decorator()\n"
        "named = DAG('named')\n"
        "EmptyOperator(task_id='n', dag=named)\n"
    )
    dags, error = load_file(path)
    assert error is None
    assert sorted(d.dag_id for d in dags) == ["from_decorator", "from_with", "named"]
