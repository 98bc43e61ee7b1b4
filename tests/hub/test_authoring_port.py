"""A worked example in the style of an Airflow DAG (TaskFlow, params,
default_args, an agent fan-out fed by an XComArg, a branch, a task group and
a join), run end to end: the DAG file is parsed in the DAG processor, agents
answer over the (recorded) MQTT side, hub tasks run in the executor."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from hub.models import Assignment, DagRun
from shared.messages import Accepted, Result, Started

DISK_REPORT = '''
from datetime import timedelta

from hub.sdk import AgentOperator, EmptyOperator, Param, dag, every_agent, task, task_group


@dag(
    schedule=None,
    params={"min_free_mb": Param(500, type="integer", minimum=1, description="Alert below this")},
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    tags=["fleet"],
)
def disk_report():
    """Which devices run low on disk?"""

    @task
    def limit(params=None) -> int:
        return params["min_free_mb"]

    limit_mb = limit()
    probe = AgentOperator(
        task_id="probe", job_type="noop", target=every_agent(site="plant"),
        params={"echo": {"limit_mb": limit_mb, "day": "{{ ds }}"}},
    )

    @task
    def low_devices(reports, limit_mb) -> list:
        return sorted(r["agent"] for r in reports if r["free_mb"] < limit_mb)

    @task.branch
    def route(low) -> str:
        return "alert" if low else "all_good"

    @task_group
    def alert(low):
        @task
        def page(devices) -> str:
            return "paged about " + ", ".join(devices)

        @task
        def ticket(devices) -> int:
            return len(devices)

        page(low)
        ticket(low)

    low = low_devices(probe.output, limit_mb)
    done = EmptyOperator(task_id="done", trigger_rule="none_failed_min_one_success")
    route(low) >> [alert(low), EmptyOperator(task_id="all_good")] >> done


disk_report()
'''


def answer(hub: Any, free_mb: dict[str, int]) -> None:
    for env in hub.assignments_sent():
        body = env.body
        with hub.sessions() as session:
            agent_id = session.get(Assignment, body.assignment_id).agent_id
        hub.send(agent_id, Accepted(body.assignment_id))
        hub.send(agent_id, Started(body.assignment_id, hub.clock.now()))
        hub.send(agent_id, Result(body.assignment_id, body.try_number, "success", {"agent": agent_id, "free_mb": free_mb[agent_id]}))


def test_ported_airflow_style_dag_runs_end_to_end(make_hub: Any) -> None:
    hub = make_hub({"disk_report.py": DISK_REPORT})
    for agent in ("dev-a", "dev-b"):
        hub.agent_online(agent, site="plant")
    hub.agent_online("elsewhere", site="office")
    run_pk = hub.trigger("disk_report", {"min_free_mb": 300})
    hub.tick()
    sent = [e.body for e in hub.assignments_sent()]
    assert len(sent) == 2
    assert all(b.params == {"echo": {"limit_mb": 300, "day": "2026-01-01"}} for b in sent)
    answer(hub, {"dev-a": 120, "dev-b": 900})
    hub.tick(8)
    states = {(ti.task_id, ti.map_index): ti.state for ti in hub.tis(run_pk)}
    assert states == {
        ("limit", -1): "success", ("probe", 0): "success", ("probe", 1): "success", ("low_devices", -1): "success",
        ("route", -1): "success", ("alert.page", -1): "success", ("alert.ticket", -1): "success",
        ("all_good", -1): "skipped", ("done", -1): "success",
    }
    outputs = {ti.task_id: ti.output for ti in hub.tis(run_pk)}
    assert outputs["low_devices"] == ["dev-a"] and outputs["route"] == "alert"
    assert outputs["alert.page"] == "paged about dev-a" and outputs["alert.ticket"] == 1
    with hub.sessions() as session:
        run = session.scalars(select(DagRun).where(DagRun.id == run_pk)).one()
        assert (run.state, run.params) == ("success", {"min_free_mb": 300})


def test_the_documented_taskflow_example_runs(make_hub: Any) -> None:
    """The example of docs/dags.md's TaskFlow section, as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "dags.md").read_text()
    example = text.split("## TaskFlow, XComs and task groups", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    hub = make_hub({"disk_report.py": example})
    for agent in ("dev-a", "dev-b"):
        hub.agent_online(agent)
    run_pk = hub.trigger("disk_report")
    hub.tick()
    assert [e.body.params for e in hub.assignments_sent()] == [{"echo": {"limit_mb": 500, "day": "2026-01-01"}}] * 2
    answer(hub, {"dev-a": 900, "dev-b": 800})
    hub.tick(8)
    states = {ti.task_id: ti.state for ti in hub.tis(run_pk)}
    assert (states["route"], states["alert.page"], states["all_good"], states["done"]) == ("success", "skipped", "success", "success")
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "success"
