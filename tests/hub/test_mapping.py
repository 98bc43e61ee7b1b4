"""Dynamic task mapping (``partial().expand()``), checked against Airflow's
documented semantics: one instance per mapped value, created at run time;
zero values skip the task; an upstream output must be a list or a dict; a
cap on the number of instances; downstream tasks see every mapped result in
map index order. Real SQLite, manual clock, fake agents."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from hub.dag import DAG, AgentOperator, PythonOperator, any_agent, every_agent
from hub.errors import InvalidDag
from hub.mapping import MappingFailure, resolve_expansion
from hub.models import Assignment, DagRun
from shared.messages import Accepted, Result, Started


def run_state(hub: Any, run_pk: int) -> str:
    with hub.sessions() as session:
        return session.get(DagRun, run_pk).state


def instances(hub: Any, run_pk: int, task_id: str) -> list[Any]:
    return [ti for ti in hub.tis(run_pk) if ti.task_id == task_id]


def answer_assignments(hub: Any, output: Any = None) -> list[Any]:
    """Every device accepts, starts and succeeds with what it sent back
    (its params by default); returns the assign bodies answered."""
    bodies = []
    for env in hub.assignments_sent():
        body = env.body
        with hub.sessions() as session:
            agent_id = session.get(Assignment, body.assignment_id).agent_id
        hub.send(agent_id, Accepted(body.assignment_id))
        hub.send(agent_id, Started(body.assignment_id, hub.clock.now()))
        hub.send(agent_id, Result(body.assignment_id, body.try_number, "success", output if output is not None else body.params))
        bodies.append(body)
    return bodies


# --- parse time ---------------------------------------------------------------


def _add(x: int, y: int = 0) -> int:
    return x + y


def test_expand_serializes_literal_and_upstream_sources() -> None:
    with DAG("m") as dag:
        src = PythonOperator(task_id="src", python_callable=_add)
        PythonOperator.partial(task_id="lit", python_callable=_add).expand(op_kwargs=[{"x": 1}, {"x": 2}])
        PythonOperator.partial(task_id="up", python_callable=_add).expand(op_kwargs=src.output if hasattr(src, "output") else src)
        AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(params=[{"echo": 1}])
        PythonOperator.partial(task_id="pairs", python_callable=_add).expand(op_args={"a": 1})
    tasks = {t["task_id"]: t for t in dag.serialize()["tasks"]}
    assert tasks["src"]["mapped"] is None
    assert tasks["lit"]["mapped"] == {"expand": {"op_kwargs": {"literal": [{"x": 1}, {"x": 2}]}}, "group": None}
    assert tasks["up"]["mapped"] == {"expand": {"op_kwargs": {"xcom": {"task_id": "src", "key": "return_value"}}}, "group": None}
    assert tasks["up"]["upstream"] == ["src"]  # mapping over an output makes its task an upstream
    assert tasks["ping"]["mapped"]["expand"] == {"params": {"literal": [{"echo": 1}]}}
    assert tasks["ping"]["params"] == {}
    assert tasks["pairs"]["mapped"]["expand"]["op_args"] == {"literal": [["a", 1]]}  # a dict maps over its items


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add).expand(op_kwargs=5), "expand(op_kwargs=...) needs a list, a dict"),
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add).expand(op_kwargz=[{}]), "cannot map over 'op_kwargz'"),
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add).expand(), "needs at least one argument"),
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add, op_kwargs={}).expand(op_kwargs=[{}]), "given to both partial() and expand()"),
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add).expand(op_kwargs=[object()]), "must be JSON"),
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add).expand(op_kwargs=[{"x": 1}, 2]), "each value of expand(op_kwargs=...) must be a dict"),
        (lambda: PythonOperator.partial(task_id="bad", python_callable=_add).expand(op_args=[[1], 2]), "each value of expand(op_args=...) must be a list"),
        (lambda: PythonOperator.partial(task_id="bad", python_callabl=_add), "unknown argument(s) python_callabl"),
        (lambda: AgentOperator.partial(task_id="bad", params={}).expand(job_type=["a"]), "cannot map over 'job_type'"),
        (lambda: AgentOperator.partial(task_id="bad", job_type="noop").expand(params=[1, 2]), "each mapped 'params' must be a dict"),
        (lambda: AgentOperator.partial(task_id="bad", job_type="noop", target=every_agent()).expand(params=[{}]), "cannot also target every_agent()"),
    ],
)
def test_invalid_expand_is_an_invalid_dag_naming_the_task(build: Any, message: str) -> None:
    with DAG("m"), pytest.raises(InvalidDag) as err:
        build()
    assert "'bad'" in str(err.value) and message in str(err.value)


def test_partial_needs_a_task_id() -> None:
    with DAG("m"), pytest.raises(InvalidDag, match=r"PythonOperator.partial\(\) needs task_id="):
        PythonOperator.partial(python_callable=_add)


def test_literal_agent_params_are_checked_against_the_job_schema(make_hub: Any) -> None:
    hub = make_hub({"bad.py": """
from hub.dag import DAG, AgentOperator
with DAG("bad") as dag:
    AgentOperator.partial(task_id="run", job_type="command.run").expand(params=[{"argv": ["true"]}, {"argv": "not a list"}])
"""})
    from hub.models import DagImportError

    with hub.sessions() as session:
        [error] = session.scalars(select(DagImportError)).all()
    assert "'run' (mapped params [1])" in error.error


def test_cross_product_varies_the_last_argument_fastest() -> None:
    mapped = {"expand": {"a": {"literal": [1, 2]}, "b": {"literal": ["x", "y", "z"]}}, "group": None}
    values = resolve_expansion(mapped, lambda t, k: (False, None), 1024)
    assert values == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]
    with pytest.raises(MappingFailure) as err:
        resolve_expansion(mapped, lambda t, k: (False, None), 5)
    assert err.value.code == "max_map_length_exceeded" and "= 6 instances" in str(err.value)


# --- run time: hub tasks --------------------------------------------------------

LITERAL_DAG = """
from hub.dag import DAG, PythonOperator

def add_one(x):
    return x + 1

def sum_it(ti):
    return {"values": ti.xcom_pull(task_ids="add_one"), "total": sum(ti.xcom_pull(task_ids="add_one"))}

with DAG("literal") as dag:
    added = PythonOperator.partial(task_id="add_one", python_callable=add_one).expand(op_kwargs=[{"x": 1}, {"x": 2}, {"x": 3}])
    added >> PythonOperator(task_id="sum_it", python_callable=sum_it)
"""


def test_literal_expand_runs_one_instance_per_value_and_the_sum_gets_them_in_order(make_hub: Any) -> None:
    hub = make_hub({"literal.py": LITERAL_DAG})
    run_pk = hub.trigger("literal")
    assert [(ti.map_index, ti.state) for ti in instances(hub, run_pk, "add_one")] == [(-1, "none")]  # expanded at run time
    hub.tick()
    added = instances(hub, run_pk, "add_one")
    assert [(ti.map_index, ti.state, ti.params, ti.output) for ti in added] == [
        (0, "success", {"op_kwargs": {"x": 1}}, 2),
        (1, "success", {"op_kwargs": {"x": 2}}, 3),
        (2, "success", {"op_kwargs": {"x": 3}}, 4),
    ]
    [total] = instances(hub, run_pk, "sum_it")
    assert total.output == {"values": [2, 3, 4], "total": 9}
    assert run_state(hub, run_pk) == "success"


UPSTREAM_DAG = """
from hub.dag import DAG, PythonOperator

def make_list(dag_run):
    return dag_run.conf["items"]

def double(item):
    return item * 2

def collect(ti):
    return ti.xcom_pull(task_ids="double")

with DAG("upstream") as dag:
    source = PythonOperator(task_id="make_list", python_callable=make_list)
    doubled = PythonOperator.partial(task_id="double", python_callable=double).expand(op_kwargs=source)
    doubled >> PythonOperator(task_id="collect", python_callable=collect)
"""


def test_expand_over_an_upstream_output(make_hub: Any) -> None:
    hub = make_hub({"upstream.py": UPSTREAM_DAG})
    run_pk = hub.trigger("upstream", {"items": [{"item": 5}, {"item": 1}, {"item": 7}, {"item": 2}]})
    hub.tick()
    assert [(ti.map_index, ti.output) for ti in instances(hub, run_pk, "double")] == [(0, 10), (1, 2), (2, 14), (3, 4)]
    assert instances(hub, run_pk, "collect")[0].output == [10, 2, 14, 4]
    assert run_state(hub, run_pk) == "success"


def test_a_dict_output_maps_over_its_items_and_a_mapped_output_over_its_instances() -> None:
    outputs = {"d": {"a": 1, "b": {"c": 2}}, "m": [10, 20]}
    mapped = {"expand": {"pair": {"xcom": {"task_id": "d", "key": "return_value"}}}, "group": None}
    assert resolve_expansion(mapped, lambda t, k: (True, outputs[t]), 1024) == [{"pair": ["a", 1]}, {"pair": ["b", {"c": 2}]}]
    mapped = {"expand": {"x": {"xcom": {"task_id": "m", "key": "return_value"}}}, "group": None}
    assert resolve_expansion(mapped, lambda t, k: (True, outputs[t]), 1024) == [{"x": 10}, {"x": 20}]


ZERO_DAG = """
from hub.dag import DAG, PythonOperator

def nothing():
    return []

def work(x):
    return x

def after():
    return "ran"

with DAG("zero") as dag:
    source = PythonOperator(task_id="nothing", python_callable=nothing)
    mapped = PythonOperator.partial(task_id="work", python_callable=work).expand(op_kwargs=source)
    mapped >> PythonOperator(task_id="after", python_callable=after)
    mapped >> PythonOperator(task_id="cleanup", python_callable=after, trigger_rule="all_done")
"""


def test_zero_length_mapping_skips_the_task_and_its_downstream(make_hub: Any) -> None:
    hub = make_hub({"zero.py": ZERO_DAG})
    run_pk = hub.trigger("zero")
    hub.tick()
    [work] = instances(hub, run_pk, "work")
    assert (work.map_index, work.state, work.error["code"]) == (-1, "skipped", "empty_mapping")
    states = {ti.task_id: ti.state for ti in hub.tis(run_pk)}
    # Airflow's skip propagation: all_success skips, all_done still runs.
    assert states == {"nothing": "success", "work": "skipped", "after": "skipped", "cleanup": "success"}
    assert run_state(hub, run_pk) == "success"


def test_zero_length_literal_skips_too(make_hub: Any) -> None:
    hub = make_hub({"z.py": """
from hub.dag import DAG, PythonOperator
with DAG("z") as dag:
    PythonOperator.partial(task_id="work", python_callable=lambda x: x).expand(op_kwargs=[])
"""})
    run_pk = hub.trigger("z")
    hub.tick()
    assert [(ti.map_index, ti.state) for ti in hub.tis(run_pk)] == [(-1, "skipped")]


NOT_A_LIST_DAG = """
from hub.dag import DAG, PythonOperator

def scalar():
    return 42

with DAG("scalar") as dag:
    source = PythonOperator(task_id="scalar", python_callable=scalar)
    mapped = PythonOperator.partial(task_id="work", python_callable=lambda x: x).expand(op_kwargs=source)
    mapped >> PythonOperator(task_id="after", python_callable=lambda: 1)
"""


def test_a_non_list_output_fails_the_mapped_task_with_unmappable_xcom(make_hub: Any) -> None:
    hub = make_hub({"scalar.py": NOT_A_LIST_DAG})
    run_pk = hub.trigger("scalar")
    hub.tick()
    [work] = instances(hub, run_pk, "work")
    assert (work.map_index, work.state, work.error["code"], work.error["retryable"]) == (-1, "failed", "unmappable_xcom", False)
    assert "'scalar'" in work.error["message"] and "a number" in work.error["message"]
    assert instances(hub, run_pk, "after")[0].state == "upstream_failed"
    assert run_state(hub, run_pk) == "failed"


def test_more_values_than_max_map_length_fail_the_task(make_hub: Any) -> None:
    hub = make_hub({"upstream.py": UPSTREAM_DAG}, max_map_length=3)
    run_pk = hub.trigger("upstream", {"items": [{"item": i} for i in range(4)]})
    hub.tick()
    [double] = instances(hub, run_pk, "double")
    assert (double.state, double.error["code"]) == ("failed", "max_map_length_exceeded")
    assert "4 values, over max_map_length 3" in double.error["message"]
    assert instances(hub, run_pk, "collect")[0].state == "upstream_failed"


def test_a_failed_source_marks_the_mapped_task_upstream_failed(make_hub: Any) -> None:
    hub = make_hub({"upstream.py": UPSTREAM_DAG})
    run_pk = hub.trigger("upstream", {})  # make_list raises KeyError
    hub.tick()
    assert {ti.task_id: (ti.map_index, ti.state) for ti in hub.tis(run_pk)} == {
        "make_list": (-1, "failed"), "double": (-1, "upstream_failed"), "collect": (-1, "upstream_failed"),
    }


def test_one_failed_mapped_instance_fails_downstream_and_retries_alone(make_hub: Any) -> None:
    hub = make_hub({"f.py": """
from hub.dag import DAG, PythonOperator

def check(x):
    if x == 2:
        raise ValueError("two")
    return x

with DAG("f", default_args={"retries": 1, "retry_delay": 60}) as dag:
    mapped = PythonOperator.partial(task_id="check", python_callable=check).expand(op_kwargs=[{"x": 1}, {"x": 2}, {"x": 3}])
    mapped >> PythonOperator(task_id="after", python_callable=lambda: 1)
"""})
    run_pk = hub.trigger("f")
    hub.tick()
    assert [(ti.map_index, ti.state, ti.try_number) for ti in instances(hub, run_pk, "check")] == [
        (0, "success", 1), (1, "up_for_retry", 1), (2, "success", 1),
    ]
    assert instances(hub, run_pk, "after")[0].state == "none"  # trigger rules count every instance
    hub.clock.advance(61)
    hub.tick()
    assert [(ti.map_index, ti.state, ti.try_number) for ti in instances(hub, run_pk, "check")][1] == (1, "failed", 2)
    assert instances(hub, run_pk, "after")[0].state == "upstream_failed"


# --- run time: agent tasks ------------------------------------------------------

AGENT_DAG = """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent

def total(ti):
    return [o["echo"] for o in ti.xcom_pull(task_ids="ping")]

with DAG("pings") as dag:
    ping = AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(
        params=[{"echo": 1}, {"echo": 2}, {"echo": 3}, {"echo": 4}])
    ping >> PythonOperator(task_id="total", python_callable=total)
"""


def test_a_mapped_output_that_does_not_fit_the_argument_fails_that_instance(make_hub: Any) -> None:
    hub = make_hub({"u.py": UPSTREAM_DAG})
    run_pk = hub.trigger("upstream", {"items": [{"item": 1}, 2]})
    hub.tick()
    assert [(ti.map_index, ti.state, ti.error and ti.error["code"]) for ti in instances(hub, run_pk, "double")] == [
        (0, "success", None), (1, "failed", "unmappable_argument"),
    ]
    assert "must be a dict; this instance's is a number" in instances(hub, run_pk, "double")[1].error["message"]


def test_mapped_agent_task_sends_one_assignment_per_value(make_hub: Any) -> None:
    hub = make_hub({"pings.py": AGENT_DAG})
    hub.agent_online("a1")
    hub.agent_online("a2")
    run_pk = hub.trigger("pings")
    hub.tick()
    ping = instances(hub, run_pk, "ping")
    assert [(ti.map_index, ti.state, ti.params) for ti in ping] == [(i, "queued", {"echo": i + 1}) for i in range(4)]
    sent = sorted((e.body.map_index, e.body.params["echo"]) for e in hub.assignments_sent())
    assert sent == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert sorted(ti.agent_id for ti in ping) == ["a1", "a1", "a2", "a2"]  # any_agent spreads the load
    answer_assignments(hub)
    hub.tick()
    assert instances(hub, run_pk, "total")[0].output == [1, 2, 3, 4]  # map index order, not arrival order
    assert run_state(hub, run_pk) == "success"


def test_mapped_agent_task_over_an_upstream_output(make_hub: Any) -> None:
    hub = make_hub({"hosts.py": """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent

def hosts(dag_run):
    return [{"echo": h} for h in dag_run.conf["hosts"]]

with DAG("hosts") as dag:
    listed = PythonOperator(task_id="hosts", python_callable=hosts)
    AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(params=listed)
"""})
    hub.agent_online("a1")
    run_pk = hub.trigger("hosts", {"hosts": ["x", "y"]})
    hub.tick()
    assert [(ti.map_index, ti.params) for ti in instances(hub, run_pk, "ping")] == [(0, {"echo": "x"}), (1, {"echo": "y"})]
    answer_assignments(hub)
    hub.tick()
    assert run_state(hub, run_pk) == "success"


def test_mapped_agent_task_with_a_non_object_value_fails_clearly(make_hub: Any) -> None:
    hub = make_hub({"hosts.py": """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("hosts") as dag:
    listed = PythonOperator(task_id="hosts", python_callable=lambda: ["x", "y"])
    AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(params=listed)
"""})
    hub.agent_online("a1")
    run_pk = hub.trigger("hosts")
    hub.tick()
    [ping] = instances(hub, run_pk, "ping")
    assert (ping.state, ping.error["code"]) == ("failed", "unmappable_xcom")
    assert hub.assignments_sent() == []


def test_fleet_fan_out_still_works_next_to_mapping(make_hub: Any) -> None:
    hub = make_hub({"both.py": """
from hub.dag import DAG, AgentOperator, any_agent, every_agent
with DAG("both") as dag:
    AgentOperator(task_id="fleet", job_type="noop", target=every_agent())
    AgentOperator.partial(task_id="mapped", job_type="noop", target=any_agent()).expand(params=[{"echo": 1}])
"""})
    for agent in ("a1", "a2", "a3"):
        hub.agent_online(agent)
    run_pk = hub.trigger("both")
    hub.tick()
    assert [(ti.map_index, ti.agent_id) for ti in instances(hub, run_pk, "fleet")] == [(0, "a1"), (1, "a2"), (2, "a3")]
    assert [(ti.map_index, ti.params) for ti in instances(hub, run_pk, "mapped")] == [(0, {"echo": 1})]


# --- TaskFlow -------------------------------------------------------------------

TASKFLOW_DAG = """
from hub.dag import DAG
from hub.taskflow import task

@task
def add(x, y):
    return x + y

@task
def numbers():
    return [10, 20, 30]

@task
def sum_it(values):
    return {"values": values, "total": sum(values)}

@task
def letters():
    return {"a": 1, "b": 2}

@task
def show(pair):
    return f"{pair[0]}={pair[1]}"

with DAG("taskflow") as dag:
    literal = add.partial(y=1).expand(x=[1, 2, 3])
    sum_it.override(task_id="sum_literal")(literal)
    from_upstream = add.partial(y=5).expand(x=numbers())
    sum_it.override(task_id="sum_upstream")(values=from_upstream)
    show.expand(pair=letters())
    add.expand_kwargs([{"x": 1, "y": 100}, {"x": 2, "y": 200}])
"""


def test_taskflow_partial_expand_and_a_summing_task(make_hub: Any) -> None:
    hub = make_hub({"taskflow.py": TASKFLOW_DAG})
    run_pk = hub.trigger("taskflow")
    hub.tick()
    assert [(ti.map_index, ti.params, ti.output) for ti in instances(hub, run_pk, "add")] == [
        (0, {"x": 1}, 2), (1, {"x": 2}, 3), (2, {"x": 3}, 4),
    ]
    assert instances(hub, run_pk, "sum_literal")[0].output == {"values": [2, 3, 4], "total": 9}
    assert [ti.output for ti in instances(hub, run_pk, "add__1")] == [15, 25, 35]
    assert instances(hub, run_pk, "sum_upstream")[0].output == {"values": [15, 25, 35], "total": 75}
    assert [ti.output for ti in instances(hub, run_pk, "show")] == ["a=1", "b=2"]  # a dict maps over its items
    assert [ti.output for ti in instances(hub, run_pk, "add__2")] == [101, 202]
    assert run_state(hub, run_pk) == "success"


@pytest.mark.parametrize(
    ("expand", "message"),
    [
        (lambda t: t.expand(z=[1]), "expand() got 'z', which is not one of its arguments"),
        (lambda t: t.partial(x=1).expand(x=[1]), "'x' is given to both partial() and expand()"),
        (lambda t: t.partial(q=1), "partial() got unknown argument(s) q"),
        (lambda t: t.expand(x="abc"), "expand(x=...) needs a list, a dict or an upstream task's output; got str"),
        (lambda t: t.expand_kwargs([{"x": 1}, 3]), "needs a list of dicts"),
        (lambda t: __import__("hub.taskflow").taskflow.task.branch(t.function).expand(x=[1]), "a branch or short-circuit task cannot be mapped"),
    ],
)
def test_invalid_taskflow_expand_names_the_task(expand: Any, message: str) -> None:
    from hub.taskflow import task

    @task
    def add(x: int, y: int = 0) -> int:
        return x + y

    with DAG("m"), pytest.raises(InvalidDag) as err:
        expand(add)
    assert "'add'" in str(err.value) and message in str(err.value)


GROUP_DAG = """
from hub.dag import DAG, PythonOperator
from hub.taskflow import task, task_group

@task
def files():
    return ["a.json", "b.json", "c.json"]

@task
def convert(name, suffix):
    if name == "c.json" and suffix == "slow":
        raise ValueError("c is slow")
    return name.replace(".json", "." + suffix)

@task
def size(converted, ti=None):
    return {"file": converted, "map_index": ti.map_index}

@task
def report(values):
    return values

@task_group
def transform(name, suffix):
    return size(convert(name, suffix))

with DAG("groups") as dag:
    sized = transform.partial(suffix="yaml").expand(name=files())
    report(sized)
"""


def test_mapped_task_group_runs_each_task_once_per_value_with_the_groups_index(make_hub: Any) -> None:
    hub = make_hub({"groups.py": GROUP_DAG})
    run_pk = hub.trigger("groups")
    hub.tick()
    converted = instances(hub, run_pk, "transform.convert")
    assert [(ti.map_index, ti.params, ti.output) for ti in converted] == [
        (0, {"op_kwargs.name": "a.json"}, "a.yaml"), (1, {"op_kwargs.name": "b.json"}, "b.yaml"), (2, {"op_kwargs.name": "c.json"}, "c.yaml"),
    ]
    # Inside the group, instance i reads instance i of its upstream.
    assert [ti.output for ti in instances(hub, run_pk, "transform.size")] == [
        {"file": "a.yaml", "map_index": 0}, {"file": "b.yaml", "map_index": 1}, {"file": "c.yaml", "map_index": 2},
    ]
    assert instances(hub, run_pk, "report")[0].output == [{"file": f"{n}.yaml", "map_index": i} for i, n in enumerate("abc")]
    assert run_state(hub, run_pk) == "success"


def test_in_a_mapped_group_instance_i_waits_only_for_instance_i(make_hub: Any) -> None:
    hub = make_hub({"groups.py": GROUP_DAG.replace('suffix="yaml"', 'suffix="slow"').replace("def convert(name, suffix):", "def convert(name, suffix):\n    return name if name != 'c.json' else 1 / 0\n")})
    run_pk = hub.trigger("groups")
    hub.tick()
    states = {(ti.task_id, ti.map_index): ti.state for ti in hub.tis(run_pk)}
    assert states[("transform.convert", 2)] == "failed"
    assert [states[("transform.size", i)] for i in range(3)] == ["success", "success", "upstream_failed"]
    assert states[("report", -1)] == "upstream_failed"


def test_mapped_group_serializes_its_members(make_hub: Any) -> None:
    import runpy
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "groups.py"
        path.write_text(GROUP_DAG)
        dag = runpy.run_path(str(path))["dag"]
    tasks = {t["task_id"]: t for t in dag.serialize()["tasks"]}
    source = {"name": {"xcom": {"task_id": "files", "key": "return_value"}}}
    assert tasks["transform.convert"]["mapped"] == {"expand": source, "group": "transform", "group_args": {"op_kwargs.name": "name"}}
    assert tasks["transform.size"]["mapped"] == {"expand": source, "group": "transform", "group_args": {}}
    assert tasks["transform.convert"]["upstream"] == ["files"]
    assert tasks["report"]["mapped"] is None


def test_invalid_mapped_group_is_an_invalid_dag() -> None:
    from hub.taskflow import task, task_group

    @task
    def one(x: int) -> int:
        return x

    @task_group
    def grp(x: int) -> None:
        one(x)

    @task_group
    def nested(x: int) -> None:
        one.expand(x=[1, 2])

    @task_group
    def formatted(x: str) -> None:
        one(f"file-{x}")

    with DAG("m"):
        with pytest.raises(InvalidDag, match=r"task group 'grp': expand\(\) got 'y'"):
            grp.expand(y=[1])
        with pytest.raises(InvalidDag, match=r"task 'nested.one': .*cannot be mapped itself"):
            nested.expand(x=[1])
        with pytest.raises(InvalidDag, match=r"task 'formatted.one': a mapped group argument can only be passed whole"):
            formatted.expand(x=["a"])


AGENT_GROUP_DAG = """
from hub.dag import DAG, AgentOperator, any_agent
from hub.taskflow import task, task_group

@task
def record(result, ti=None):
    return [ti.map_index, result["echo"]]

@task_group
def per_host(host):
    ping = AgentOperator(task_id="ping", job_type="noop", params={"echo": host, "sleep": 0}, target=any_agent())
    record(ping.output)

with DAG("agent_groups") as dag:
    per_host.expand(host=["h1", "h2", "h3"])
"""


def test_agent_task_in_a_mapped_group_gets_the_groups_value_in_its_params(make_hub: Any) -> None:
    hub = make_hub({"agent_groups.py": AGENT_GROUP_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("agent_groups")
    hub.tick()
    assert sorted((e.body.task_id, e.body.map_index, e.body.params["echo"], e.body.params["sleep"]) for e in hub.assignments_sent()) == [
        ("per_host.ping", 0, "h1", 0), ("per_host.ping", 1, "h2", 0), ("per_host.ping", 2, "h3", 0),
    ]
    assert [ti.state for ti in instances(hub, run_pk, "per_host.record")] == ["none", "none", "none"]
    answer_assignments(hub)
    hub.tick()
    assert [ti.output for ti in instances(hub, run_pk, "per_host.record")] == [[0, "h1"], [1, "h2"], [2, "h3"]]
    assert run_state(hub, run_pk) == "success"


def test_the_documented_example_runs(make_hub: Any) -> None:
    """The example of docs/dags.md's mapping section, as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "dags.md").read_text()
    example = text.split("## Dynamic task mapping", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    hub = make_hub({"mapping.py": example})
    hub.agent_online("a1", job_types=("command.run",))
    run_pk = hub.trigger("mapping")
    hub.tick()
    assert sorted(tuple(e.body.params["argv"]) for e in hub.assignments_sent()) == [("ping", "-c1", "a"), ("ping", "-c1", "b")]
    answer_assignments(hub, output={"exit_code": 0})
    hub.tick()
    sums = sorted(ti.output for ti in hub.tis(run_pk) if ti.task_id.startswith("sum_it"))
    assert sums == [9, 32]
    assert [ti.output for ti in instances(hub, run_pk, "add__1")] == [3, 7]
    assert run_state(hub, run_pk) == "success"


CLEAR_DAG = """
from hub.dag import DAG, PythonOperator

def make(ti):
    return [{"x": i} for i in range({1: 3, 2: 1, 3: 0}[ti.try_number])]

def collect(ti):
    return ti.xcom_pull(task_ids="work")

with DAG("clearing") as dag:
    made = PythonOperator(task_id="make", python_callable=make)
    work = PythonOperator.partial(task_id="work", python_callable=lambda x: x * 10).expand(op_kwargs=made)
    work >> PythonOperator(task_id="collect", python_callable=collect, trigger_rule="all_done")
"""


def test_clearing_a_mapped_task_with_its_upstream_expands_it_again(make_hub: Any) -> None:
    from hub.actions import clear

    hub = make_hub({"clearing.py": CLEAR_DAG})
    run_pk = hub.trigger("clearing")
    hub.tick()
    assert [(ti.map_index, ti.state, ti.output) for ti in instances(hub, run_pk, "work")] == [(0, "success", 0), (1, "success", 10), (2, "success", 20)]
    # The upstream now gives one value: the surplus instances are removed.
    clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, task_ids=["make"], include_downstream=True)
    hub.tick()
    assert [(ti.map_index, ti.state, ti.try_number) for ti in instances(hub, run_pk, "work")] == [(0, "success", 2), (1, "removed", 1), (2, "removed", 1)]
    assert instances(hub, run_pk, "collect")[0].output == [0]  # removed instances hold no place
    assert run_state(hub, run_pk) == "success"
    # Then none: the task is skipped, as a zero-length mapping is.
    clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, task_ids=["make"], include_downstream=True)
    hub.tick()
    assert [(ti.map_index, ti.state) for ti in instances(hub, run_pk, "work")] == [(-1, "skipped"), (1, "removed"), (2, "removed")]
    assert run_state(hub, run_pk) == "success"


def test_clearing_one_mapped_instance_reruns_it_with_its_value(make_hub: Any) -> None:
    from hub.actions import clear

    hub = make_hub({"literal.py": LITERAL_DAG})
    run_pk = hub.trigger("literal")
    hub.tick()
    clear(hub.sessions, hub.scheduler.events, hub.clock, run_pk, task_ids=["add_one"], map_indexes=[1])
    hub.tick()
    assert [(ti.map_index, ti.try_number, ti.output) for ti in instances(hub, run_pk, "add_one")] == [(0, 1, 2), (1, 2, 3), (2, 1, 4)]


def test_mapped_agent_params_with_templates_are_rendered_per_instance(make_hub: Any) -> None:
    hub = make_hub({"tmpl.py": """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("tmpl") as dag:
    AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(
        params=[{"echo": "{{ run_id }}/{{ map_index }}"}, {"echo": "plain"}])
"""})
    hub.agent_online("a1")
    run_pk = hub.trigger("tmpl")
    hub.tick()
    with hub.sessions() as session:
        run_id = session.get(DagRun, run_pk).run_id
    assert sorted(e.body.params["echo"] for e in hub.assignments_sent()) == [f"{run_id}/0", "plain"]
    ping = instances(hub, run_pk, "ping")
    assert ping[0].params == {"echo": "{{ run_id }}/{{ map_index }}"}  # kept for the next try
    assert ping[0].rendered_fields == {"params": {"echo": f"{run_id}/0"}}


def test_expand_over_a_pushed_xcom_key(make_hub: Any) -> None:
    hub = make_hub({"keys.py": """
from hub.dag import DAG, PythonOperator

def push(ti):
    ti.xcom_push("files", [{"name": "a"}, {"name": "b"}])
    return "done"

with DAG("keys") as dag:
    src = PythonOperator(task_id="push", python_callable=push)
    PythonOperator.partial(task_id="each", python_callable=lambda name: name.upper()).expand(op_kwargs=src.output["files"])
"""})
    run_pk = hub.trigger("keys")
    hub.tick()
    assert [ti.output for ti in instances(hub, run_pk, "each")] == ["A", "B"]


@given(st.lists(st.lists(st.integers(), max_size=4), min_size=1, max_size=3), st.integers(min_value=1, max_value=40))
def test_expansion_is_the_cross_product_in_order_or_fails_over_the_cap(lists: list[list[int]], cap: int) -> None:
    mapped = {"expand": {f"a{i}": {"literal": values} for i, values in enumerate(lists)}, "group": None}
    total = math.prod(len(v) for v in lists)
    if total > cap or any(len(v) > cap for v in lists):  # Airflow caps each mapped list; the product is capped too
        with pytest.raises(MappingFailure) as err:
            resolve_expansion(mapped, lambda t, k: (False, None), cap)
        assert err.value.code == "max_map_length_exceeded"
        return
    values = resolve_expansion(mapped, lambda t, k: (False, None), cap)
    assert len(values) == total
    assert [tuple(v.values()) for v in values] == list(itertools.product(*lists))


def test_mapped_params_from_an_upstream_are_checked_against_the_job_schema_per_instance(make_hub: Any) -> None:
    hub = make_hub({"hosts.py": """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("hosts") as dag:
    listed = PythonOperator(task_id="hosts", python_callable=lambda: [{"echo": "ok"}, {"colour": "red"}])
    AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(params=listed)
"""})
    hub.agent_online("a1")
    run_pk = hub.trigger("hosts")
    hub.tick()
    ping = instances(hub, run_pk, "ping")
    assert [(ti.map_index, ti.state) for ti in ping] == [(0, "queued"), (1, "failed")]
    assert "colour" in ping[1].error["message"]
    assert [e.body.params for e in hub.assignments_sent()] == [{"echo": "ok"}]


# Airflow's own documentation examples of dynamic task mapping, with only the
# imports changed (and a timezone on start_date, which Outpost requires).
AIRFLOW_EXAMPLES = """
from datetime import datetime, timezone

from hub.sdk import DAG, PythonOperator, task, task_group

with DAG(dag_id="example_dynamic_task_mapping", start_date=datetime(2022, 3, 4, tzinfo=timezone.utc)) as dag:

    @task
    def add_one(x: int):
        return x + 1

    @task
    def sum_it(values):
        total = sum(values)
        print(f"Total was {total}")
        return total

    added_values = add_one.expand(x=[1, 2, 3])
    sum_it(added_values)

    @task
    def add(x: int, y: int):
        return x + y

    added = add.partial(y=10).expand(x=[1, 2, 3])

    @task
    def make_list():
        return [1, 2, {"a": "b"}, "str"]

    @task
    def consumer(arg):
        return repr(arg)

    consumer.expand(arg=make_list())

    add.override(task_id="cross").expand(x=[1, 2], y=[10, 20])

    @task
    def convert_to_yaml(filename):
        return filename.replace(".json", ".yaml")

    @task_group
    def file_transforms(filename):
        return convert_to_yaml(filename)

    @task
    def join(names):
        return ",".join(names)

    join(file_transforms.expand(filename=["data1.json", "data2.json"]))

    def print_kwargs(**kwargs):
        return kwargs["x"]

    PythonOperator.partial(task_id="classic", python_callable=print_kwargs).expand(op_kwargs=[{"x": 1}, {"x": 2}])
"""


def test_airflow_documentation_examples_port_by_changing_imports(make_hub: Any) -> None:
    hub = make_hub({"airflow_examples.py": AIRFLOW_EXAMPLES})
    run_pk = hub.trigger("example_dynamic_task_mapping")
    hub.tick(rounds=8)
    outputs = {}
    for ti in hub.tis(run_pk):
        outputs.setdefault(ti.task_id, []).append(ti.output)
    assert outputs["sum_it"] == [9]
    assert outputs["add"] == [11, 12, 13]
    assert outputs["consumer"] == ["1", "2", "{'a': 'b'}", "'str'"]
    assert outputs["cross"] == [11, 21, 12, 22]  # x=1 with y=10, 20, then x=2
    assert outputs["file_transforms.convert_to_yaml"] == ["data1.yaml", "data2.yaml"]
    assert outputs["join"] == ["data1.yaml,data2.yaml"]
    assert outputs["classic"] == [1, 2]
    assert run_state(hub, run_pk) == "success"


def test_a_partial_argument_may_be_an_upstream_output(make_hub: Any) -> None:
    hub = make_hub({"p.py": """
from hub.dag import DAG
from hub.taskflow import task

@task
def base():
    return 100

@task
def add(x, y):
    return x + y

with DAG("partial_xcom") as dag:
    add.partial(y=base()).expand(x=[1, 2])
"""})
    run_pk = hub.trigger("partial_xcom")
    hub.tick()
    assert [ti.output for ti in instances(hub, run_pk, "add")] == [101, 102]


def test_whatever_the_trigger_rule_a_mapped_task_waits_for_the_output_it_maps_over(make_hub: Any) -> None:
    hub = make_hub({"always.py": """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("always") as dag:
    src = AgentOperator(task_id="src", job_type="noop", target=any_agent())
    PythonOperator.partial(task_id="m", python_callable=lambda x: x, trigger_rule="always").expand(op_kwargs=src)
"""})
    hub.agent_online("a1")
    run_pk = hub.trigger("always")
    hub.tick()
    assert [(ti.map_index, ti.state) for ti in instances(hub, run_pk, "m")] == [(-1, "none")]  # not started unmapped
    answer_assignments(hub, output=[{"x": 1}, {"x": 2}])
    hub.tick()
    assert [(ti.map_index, ti.output) for ti in instances(hub, run_pk, "m")] == [(0, 1), (1, 2)]


def test_a_skipped_upstream_skips_the_task_mapping_over_it(make_hub: Any) -> None:
    hub = make_hub({"skipsrc.py": """
from hub.dag import DAG, PythonOperator
with DAG("skipsrc") as dag:
    src = PythonOperator.partial(task_id="src", python_callable=lambda x: [x]).expand(op_kwargs=[])
    PythonOperator.partial(task_id="m", python_callable=lambda x: x, trigger_rule="none_failed").expand(op_kwargs=src)
"""})
    run_pk = hub.trigger("skipsrc")
    hub.tick()
    assert {ti.task_id: (ti.map_index, ti.state) for ti in hub.tis(run_pk)} == {"src": (-1, "skipped"), "m": (-1, "skipped")}
    assert run_state(hub, run_pk) == "success"
