"""End to end: hub processes, agent processes and a broker, all real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

SLOW_FLEET = """
from hub.dag import DAG, AgentOperator, PythonOperator, every_agent

def count(ti):
    return len([o for o in ti.xcom_pull("work") if o is not None])

with DAG("slow_fleet") as dag:
    work = AgentOperator(task_id="work", job_type="noop", params={"echo": "hi", "sleep": 2}, target=every_agent())
    work >> PythonOperator(task_id="count", python_callable=count)
"""


def assert_exactly_once(fleet: Any, run_pk: int) -> None:
    """One applied result per agent task instance, for the try that decided it."""
    tis, results = fleet.results(run_pk)
    agent_tis = [t for t in tis if t.kind == "agent"]
    keys = [(r.ti_id, r.try_number, r.agent_id) for r in results]
    assert len(keys) == len(set(keys))
    for ti in agent_tis:
        applied = [r for r in results if r.ti_id == ti.id and r.applied]
        assert len(applied) == 1, f"{ti.task_id}[{ti.map_index}] has {len(applied)} applied results"


def test_fleet_health_runs_on_three_agents_and_shows_in_api_and_cli(fleet: Any) -> None:
    f = fleet()
    f.start_all(3)
    run_pk = f.trigger("fleet_health")
    run = f.wait_run(run_pk)
    assert run["state"] == "success", run
    tasks = run["task_instances"]
    collect = sorted((t["map_index"], t["agent_id"], t["state"]) for t in tasks if t["task_id"] == "collect")
    assert collect == [(0, "agent-1", "success"), (1, "agent-2", "success"), (2, "agent-3", "success")]
    summary = next(t for t in tasks if t["task_id"] == "summarise")
    assert summary["output"]["devices"] == 3
    assert_exactly_once(f, run_pk)
    env = {**os.environ, "OUTPOST_TOKEN": f.token}
    cli = subprocess.run([str(Path(sys.executable).parent / "outpost"), "--hub", f.url, "runs", "show", str(run_pk), "-o", "json"], capture_output=True, text=True, timeout=30, env=env)
    assert cli.returncode == 0, cli.stderr
    assert '"success"' in cli.stdout and "agent-3" in cli.stdout


def test_agent_killed_mid_task_comes_back_and_the_run_completes_once(fleet: Any) -> None:
    f = fleet({"slow.py": SLOW_FLEET})
    f.start_all(3)
    run_pk = f.trigger("slow_fleet")
    f.wait(lambda: any(t["agent_id"] == "agent-2" and t["state"] == "running" for t in f.api("GET", f"/runs/{run_pk}")["task_instances"]), 20, "agent-2 to start")
    f.kill_agent("agent-2")
    time.sleep(0.5)
    f.start_agent("agent-2")
    run = f.wait_run(run_pk)
    assert run["state"] == "success", run
    assert next(t for t in run["task_instances"] if t["task_id"] == "count")["output"] == 3
    assert_exactly_once(f, run_pk)


def test_hub_killed_mid_run_loses_nothing_and_applies_nothing_twice(fleet: Any) -> None:
    f = fleet({"slow.py": SLOW_FLEET})
    f.start_all(3)
    run_pk = f.trigger("slow_fleet")
    f.wait(lambda: sum(t["state"] == "running" for t in f.api("GET", f"/runs/{run_pk}")["task_instances"]) >= 1, 20, "work to start")
    f.kill("scheduler")  # results arrive while the hub's ingestion is dead
    time.sleep(3)
    f.start_hub_role("scheduler")
    run = f.wait_run(run_pk)
    assert run["state"] == "success", run
    assert_exactly_once(f, run_pk)


def test_broker_killed_and_restarted_mid_run(fleet: Any) -> None:
    f = fleet({"slow.py": SLOW_FLEET})
    f.start_all(3)
    run_pk = f.trigger("slow_fleet")
    f.wait(lambda: sum(t["state"] in ("delivered", "running") for t in f.api("GET", f"/runs/{run_pk}")["task_instances"]) >= 1, 20, "work to be delivered")
    f.broker.restart(kill=True)
    run = f.wait_run(run_pk, timeout=90)
    assert run["state"] == "success", run
    assert_exactly_once(f, run_pk)


def test_hub_keeps_running_through_malformed_messages_and_records_them(fleet: Any) -> None:
    f = fleet()
    f.start_all(1)
    topic = "outpost/v1/agents/agent-1/events"
    for payload in (b"{garbage", b'{"v":1,"type":"selfdestruct","id":"x","from":"agent-1","hlc":"0000000000001.00000@agent-1","body":{}}', b"A" * 400_000):
        # a foreign peer: the broker's own client, not our code
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(f.broker.port), "-q", "1", "-t", topic, "-s"], input=payload, check=True, timeout=10)
    # Unsigned: refused before parsing, as security events (one record per
    # agent and code per 10 s); the oversized one before even that.
    f.wait(lambda: f.api("GET", "/rejected")["total"] >= 1 and f.api("GET", "/security-events")["total"] >= 1, 20, "refusals to be recorded")
    assert [r["code"] for r in f.api("GET", "/rejected")["items"]] == ["payload_too_large"]
    events = f.api("GET", "/security-events")
    assert events["counts"] == {"bad_signature": 1} and events["items"][0]["agent_id"] == "agent-1"
    metrics = httpx.get(f"{f.url}/api/v1/metrics", headers={"Authorization": f"Bearer {f.token}"}, timeout=10).text
    assert 'outpost_security_events_total{code="bad_signature",source="mqtt"} 1' in metrics
    run = f.wait_run(f.trigger("fleet_health"))
    assert run["state"] == "success"


PINNED = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("pinned") as dag:
    AgentOperator(task_id="work", job_type="noop", params={"echo": "late"}, target=on_agent("agent-2"))
"""


def test_work_for_an_offline_device_runs_when_it_returns(fleet: Any) -> None:
    f = fleet({"pinned.py": PINNED})
    f.start_all(2)
    f.agents["agent-2"].stop()  # a clean stop: it publishes offline, its broker session stays
    f.wait(lambda: f.api("GET", "/agents/agent-2")["state"] == "offline", 20, "agent-2 offline")
    run_pk = f.trigger("pinned")
    # Queued on a device that is away: shown as device offline, not failed (hub.offline).
    f.wait(lambda: f.api("GET", f"/runs/{run_pk}")["task_instances"][0]["state"] == "device_offline", 20, "the task to show device offline")
    time.sleep(4)  # longer than redeliver_after: the hub must not pile copies on an offline device
    assert f.api("GET", f"/runs/{run_pk}")["state"] == "running"
    f.start_agent("agent-2")
    run = f.wait_run(run_pk)
    assert run["state"] == "success"
    assert run["task_instances"][0]["output"] == {"echo": "late"}
    assert_exactly_once(f, run_pk)


BATTERY = """
from hub.sdk import DAG, AgentEvent, PythonOperator

def react(dag_run=None):
    return "dispatch a technician"

with DAG("on_battery_low", schedule=[AgentEvent("battery_low")]) as dag:
    PythonOperator(task_id="react", python_callable=react)
"""


def test_a_device_event_from_the_command_line_triggers_the_dag_scheduled_on_it(fleet: Any) -> None:
    f = fleet({"battery.py": BATTERY})
    f.start_all(1)
    agent = f.agents["agent-1"]
    emit = subprocess.run(
        [sys.executable, "-m", "agent", "emit", "battery_low", "--data", '{"level": 0.08}', "--config", str(agent.folder / "agent.toml")],
        capture_output=True, text=True, timeout=30,
    )
    assert emit.returncode == 0, emit.stderr
    f.wait(lambda: any(r["run_type"] == "asset_triggered" for r in f.api("GET", "/runs", params={"dag_id": "on_battery_low"})["items"]), 30, "the asset-triggered run")
    run_pk = next(r["id"] for r in f.api("GET", "/runs", params={"dag_id": "on_battery_low"})["items"])
    assert f.wait_run(run_pk)["state"] == "success"
    events = f.api("GET", "/assets/events", params={"uri": "agent-event://battery_low"})["items"]
    assert [(e["source_agent_id"], e["extra"]) for e in events] == [("agent-1", {"level": 0.08})]
    # The hub acknowledged it: the device's outbox lets it go.
    def outbox_depth() -> int:
        listing = subprocess.run([sys.executable, "-m", "agent", "queue", "ls", "--config", str(agent.folder / "agent.toml"), "-o", "json"],
                                 capture_output=True, text=True, timeout=30)
        return int(json.loads(listing.stdout)["outbox"]["depth"])

    f.wait(lambda: outbox_depth() == 0, 20, "the event to be acknowledged")
