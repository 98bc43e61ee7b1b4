"""A device that goes offline holding work, runs it offline, and returns
with a backlog: real hub processes (scheduler and API), a real broker, a
real agent process, both of its links (MQTT and HTTP) cut by fault proxies.

What an operator relies on: while it is away its tasks show
``device_offline`` (never failed); on return the backlog (results and log
chunks, more than ``http_sync_threshold`` items) drains over HTTP, every
result lands once, every try's log is readable, nothing is rejected."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hub.standalone import _die_with_parent
from tests.e2e.test_fleet import assert_exactly_once
from tests.faultproxy import FaultProxy

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

AGENT = "edge-1"
NOOPS, COMMANDS = 24, 12
THRESHOLD = 20
#: Scheduled ahead: delivered at once, run this long after the trigger,
#: after the links are cut: the device does all of it offline.
AHEAD = 6
#: Seconds the device stays away once its backlog is complete (a few HTTP
#: attempts fail meanwhile, each after http_sync_timeout).
STAY_AWAY = 10
DAG = f"""
from datetime import timedelta
from hub.dag import DAG, AgentOperator, on_agent
with DAG("away", max_active_tasks=100) as dag:
    AgentOperator.partial(task_id="work", job_type="noop", target=on_agent("{AGENT}"), not_before=timedelta(seconds={AHEAD})).expand(
        params=[{{"echo": i, "sleep": 0.1}} for i in range({NOOPS})])
    AgentOperator.partial(task_id="logged", job_type="command.run", target=on_agent("{AGENT}"), not_before=timedelta(seconds={AHEAD})).expand(
        params=[{{"argv": ["hostname"]}} for i in range({COMMANDS})])
"""


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


def pending(outbox: Path) -> dict[str, int]:
    """The device's outbox items not yet acknowledged, by kind."""
    counts = {"result": 0, "log": 0, "event": 0}
    for (data,) in query(outbox, 'SELECT data FROM "Queue" WHERE status IN (0, 1)'):
        kind = next(k for k in ("result", "log", "event") if k in json.loads(data))
        counts[kind] += 1
    return counts


def start_agent(folder: Path, broker_port: int, hub_url: str, agent_id: str = AGENT) -> subprocess.Popen[bytes]:
    """The agent as standalone starts it (hub_url, a registered device key), with
    short keepalive/reconnect times and a small HTTP threshold."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "agent.toml"
    config.touch(mode=0o600)
    config.write_text(
        f"hub_url = {json.dumps(hub_url)}\n"
        f'agent_id = "{agent_id}"\nstate_dir = {json.dumps(str(folder))}\n'
        f'broker_host = "127.0.0.1"\nbroker_port = {broker_port}\n'
        "heartbeat_interval = 1.0\nkeepalive = 5\nreconnect_max = 1\n"
        f"http_sync_threshold = {THRESHOLD}\nhttp_sync_timeout = 2.0\nconcurrency = 4\n"
        'sqlite_synchronous = "NORMAL"\ncommand_allowlist = ["hostname"]\n'
        '\n[labels]\nsite = "test"\n'
    )
    log = open(folder / "agent.log", "ab")
    try:
        return subprocess.Popen([*_die_with_parent(), sys.executable, "-m", "agent", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        log.close()


def test_a_device_offline_with_work_drains_its_backlog_over_http_on_return(fleet: Any) -> None:
    f = fleet({"away.py": DAG})
    f.config.write_text(f.config.read_text() + "agent_offline_after = 3.0\n")
    f.start_hub()
    db = f.root / "hub" / "hub.db"
    folder = f.root / "agents" / AGENT
    with FaultProxy(f.broker.port) as mqtt, FaultProxy(f.api_port) as http:
        f.provision(AGENT, folder)
        proc = start_agent(folder, mqtt.port, f"http://127.0.0.1:{http.port}")
        try:
            f.wait_agents_online(1, timeout=20)
            run_pk = f.trigger("away")
            total = NOOPS + COMMANDS
            f.wait(lambda: sum(t["state"] == "delivered" for t in f.api("GET", f"/runs/{run_pk}")["task_instances"]) == total, 5, "every try delivered ahead")
            cut = time.monotonic()
            mqtt.blackhole()
            http.blackhole()
            f.wait(lambda: f.api("GET", f"/agents/{AGENT}")["state"] == "offline", 15, "the hub to see the device offline")
            # It runs its work offline; the results and logs pile up in its outbox.
            f.wait(lambda: pending(folder / "outbox.sqlite3")["result"] == total, 30, "every job done on the device")
            backlog = pending(folder / "outbox.sqlite3")
            assert backlog["log"] >= COMMANDS and sum(backlog.values()) > THRESHOLD, backlog
            f.wait(lambda: {t["state"] for t in f.api("GET", f"/runs/{run_pk}")["task_instances"]} == {"device_offline"}, 10, "its tasks to show device_offline")
            assert query(db, "SELECT COUNT(*) FROM task_results")[0][0] == 0
            # Away a while longer with its backlog: its HTTP attempts fail and back off.
            time.sleep(STAY_AWAY)
            offline_for = time.monotonic() - cut

            back = time.monotonic()
            mqtt.pass_through()
            http.pass_through()
            run = f.wait_run(run_pk, timeout=40)
            drained = time.monotonic() - back
            f.wait(lambda: sum(pending(folder / "outbox.sqlite3").values()) == 0, 15, "the device's outbox to empty")
        finally:
            proc.terminate()
            proc.wait(10)
    agent_log = (folder / "agent.log").read_text(errors="replace")
    print(f"offline {offline_for:.1f}s with a backlog of {backlog}; run finished {drained:.1f}s after the links came back")

    assert run["state"] == "success", run
    assert sorted(t["output"]["echo"] for t in run["task_instances"] if t["task_id"] == "work") == list(range(NOOPS))
    assert_exactly_once(f, run_pk)
    # Over HTTP, all of it: the hub's sync cursor for this device counts every backlog item.
    [(stream, seq, items)] = query(db, "SELECT stream, seq, items FROM sync_cursors WHERE agent_id = ?", AGENT)
    assert stream and seq and items == sum(backlog.values()), (items, backlog)
    assert query(db, "SELECT COUNT(*) FROM rejected_messages") == [(0,)]
    for ti in run["task_instances"]:
        body = f.api("GET", f"/runs/{run_pk}/tasks/{ti['id']}/tries/{ti['try_number']}/log")
        if ti["task_id"] == "logged":
            [entry] = body["logs"]
            assert entry["complete"] and entry["agent_id"] == AGENT, body
            assert "$ hostname" in entry["text"] and "hostname ended" in entry["text"], entry["text"]
    assert "Traceback" not in agent_log, agent_log[-3000:]


RETARGET = """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("retarget", default_args={"retries": 0}) as dag:
    AgentOperator(task_id="work", job_type="noop", params={"echo": "done", "sleep": 8}, target=any_agent(), offline_grace=2)
"""


def test_work_re_targeted_past_offline_grace_then_the_first_device_returns_with_success(fleet: Any) -> None:
    """Real processes, docs/conflicts.md's `collect` example: edge-1 is cut
    off while running the job, the hub re-targets it to edge-2 after
    offline_grace, edge-1 finishes offline and returns first with its
    success. The instance keeps edge-1's success, edge-2's try is
    cancelled (its job stopped on the device), one device_success_wins
    record, nothing rejected."""
    f = fleet({"retarget.py": RETARGET})
    f.config.write_text(f.config.read_text() + "agent_offline_after = 3.0\n")
    f.start_hub()
    db = f.root / "hub" / "hub.db"
    with FaultProxy(f.broker.port) as mqtt:
        f.provision("edge-1")
        first = start_agent(f.root / "agents" / "edge-1", mqtt.port, f.url, "edge-1")
        procs = [first]
        try:
            f.wait_agents_online(1, timeout=20)
            run_pk = f.trigger("retarget")
            f.wait(lambda: f.api("GET", f"/runs/{run_pk}")["task_instances"][0]["state"] == "running", 10, "edge-1 running the job")
            assert f.api("GET", f"/runs/{run_pk}")["task_instances"][0]["agent_id"] == "edge-1"
            mqtt.blackhole()
            # Only now a second device: the work can go nowhere else before.
            f.provision("edge-2")
            procs.append(start_agent(f.root / "agents" / "edge-2", f.broker.port, f.url, "edge-2"))
            f.wait(lambda: f.api("GET", f"/runs/{run_pk}")["task_instances"][0]["state"] == "device_offline", 10, "device_offline")
            f.wait(lambda: (ti := f.api("GET", f"/runs/{run_pk}")["task_instances"][0])["agent_id"] == "edge-2" and ti["state"] == "running", 15, "re-targeted to edge-2")
            # edge-1 finishes offline (8 s), before edge-2 can, and comes back.
            f.wait(lambda: pending(f.root / "agents" / "edge-1" / "outbox.sqlite3")["result"] == 1, 15, "edge-1's result in its outbox")
            mqtt.pass_through()
            run = f.wait_run(run_pk, timeout=30)
            f.wait(lambda: query(db, "SELECT COUNT(*) FROM task_results")[0][0] == 2, 20, "edge-2's report of its stopped try")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(10)
    assert run["state"] == "success", run
    [ti] = run["task_instances"]
    assert (ti["state"], ti["output"], ti["try_number"]) == ("success", {"echo": "done"}, 2)
    results = query(db, "SELECT agent_id, try_number, status, applied FROM task_results ORDER BY id")
    assert results[0] == ("edge-1", 1, "success", 1) and results[1][:2] == ("edge-2", 2) and results[1][3] == 0, results
    assert query(db, "SELECT state FROM assignments ORDER BY created_at") == [("finished",), ("finished",)]
    conflicts = f.api("GET", "/conflicts")
    assert [(c["rule"], c["agent_id"], c["overridden"]["kind"]) for c in conflicts["items"]] == [("device_success_wins", "edge-1", "offline_grace")]
    assert query(db, "SELECT COUNT(*) FROM rejected_messages") == [(0,)]
