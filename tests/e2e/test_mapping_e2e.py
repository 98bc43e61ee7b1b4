"""End to end: dynamic task mapping with real hub processes (hub tasks in
worker processes that import the DAG file), real agents and a real broker."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.e2e

MAPPED = """
from hub.dag import DAG, AgentOperator, any_agent
from hub.taskflow import task

@task
def targets():
    return [{"echo": f"host-{i}"} for i in range(5)]

@task
def double(x):
    return x * 2

@task
def gather(pings, doubled):
    return {"echoes": [p["echo"] for p in pings], "doubled": doubled}

with DAG("mapped_e2e") as dag:
    pings = AgentOperator.partial(task_id="ping", job_type="noop", target=any_agent()).expand(params=targets())
    gather(pings.output, double.expand(x=[1, 2, 3]))
"""


def test_mapped_agent_and_hub_tasks_run_and_gather_in_order(fleet: Any) -> None:
    f = fleet({"mapped.py": MAPPED})
    f.start_all(2)
    run_pk = f.trigger("mapped_e2e")
    run = f.wait_run(run_pk)
    assert run["state"] == "success", run
    tasks = run["task_instances"]
    pings = sorted((t["map_index"], t["state"]) for t in tasks if t["task_id"] == "ping")
    assert pings == [(i, "success") for i in range(5)]
    assert {t["agent_id"] for t in tasks if t["task_id"] == "ping"} == {"agent-1", "agent-2"}
    gathered = next(t for t in tasks if t["task_id"] == "gather")
    assert gathered["output"] == {"echoes": [f"host-{i}" for i in range(5)], "doubled": [2, 4, 6]}
