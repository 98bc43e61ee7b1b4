"""HTTP bulk sync end to end: a device's backlog of 10,000 results for
assignments the hub issued drains over HTTP; the hub's API process is killed
-9 in the middle and restarted, then the agent is killed -9 and restarted;
at the end the hub holds exactly one applied
result per assignment, committed in the device's outbox order, and the
device's outbox is empty."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import paho.mqtt.publish as mqtt_publish
import pytest
from paho.mqtt.client import MQTTv5

from agent.queues import Outbox
from hub.standalone import LocalAgent
from shared.envelope import Envelope
from shared.frames import AGENT_TO_HUB, sign_envelope
from shared.hlc import HLC
from shared.messages import JobTypeInfo, Result, Status
from shared.signing import SigningKey
from shared.topics import status_topic

pytestmark = pytest.mark.e2e

N = 10_000
AGENT = "agent-1"
DAG = f"""
from hub.dag import DAG, AgentOperator, on_agent
with DAG("backlog", max_active_tasks={N}) as dag:
    AgentOperator.partial(task_id="work", job_type="noop", target=on_agent("{AGENT}")).expand(params=[{{"echo": str(i)}} for i in range({N})])
"""


def query(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.mark.timeout(240)
def test_ten_thousand_buffered_results_sync_over_http_through_kill_9s_of_the_hub_api_and_the_agent(fleet: Any) -> None:
    f = fleet({"backlog.py": DAG})
    # No re-sends of the assignments while the test runs: the backlog is the subject.
    f.config.write_text(
        f.config.read_text().replace("redeliver_after = 3.0", "redeliver_after = 3600.0")
        + f"max_map_length = {N}\nagent_offline_after = 3600.0\ndefault_pool_slots = -1\n"
    )
    f.start_hub()
    # The device announces itself (as its status would) without a session
    # yet, so the assignments the hub sends now reach nobody: the device
    # "ran them offline" and only its results exist, buffered in its outbox.
    f.provision(AGENT)  # its key, registered; signed with it below
    device_key = SigningKey.load(f.root / "agents" / AGENT / "identity" / "device.key")
    status = Envelope(Status("online", "0.1.0", AGENT, {"site": "test"}, (JobTypeInfo("noop", "1.0"),)), sender=AGENT, hlc=HLC(int(time.time() * 1000), 0, AGENT))
    frame = sign_envelope(status, device_key, AGENT_TO_HUB)
    mqtt_publish.single(status_topic(AGENT), frame, qos=1, retain=True, hostname="127.0.0.1", port=f.broker.port, protocol=MQTTv5)
    f.wait_agents_online(1)
    run_pk = f.trigger("backlog")
    db = str(f.root / "hub" / "hub.db")
    started = time.monotonic()
    # About 15 s on an idle 2-core machine; much more under load (the hub's work, not sync's).
    f.wait(lambda: query(db, "SELECT COUNT(*) FROM assignments WHERE agent_id = ?", AGENT)[0][0] == N, 90, f"{N} assignments")
    issued = query(
        db,
        "SELECT a.id, a.try_number, t.map_index FROM assignments a JOIN task_instances t ON t.id = a.ti_id WHERE a.agent_id = ? ORDER BY t.map_index",
        AGENT,
    )
    # Published to nobody before the device connects; otherwise it would get
    # the rest of them and work on them during the drain.
    f.wait(lambda: query(db, "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")[0][0] == 0, 60, "every assignment published")
    print(f"{N} assignments issued in {time.monotonic() - started:.1f}s")

    agent_dir = f.root / "agents" / AGENT
    outbox = Outbox(agent_dir / "outbox.sqlite3", "NORMAL")
    wall = int(time.time() * 1000)
    for assignment_id, try_number, map_index in issued:
        outbox.put_result(Result(assignment_id, try_number, "success", {"i": map_index}), HLC(wall, map_index, AGENT))
    assert outbox.depth() == N
    outbox.close()

    agent = LocalAgent(AGENT, agent_dir)
    f.agents[AGENT] = agent
    agent.start(f.broker.port, {"site": "test"}, f.url)
    t0 = time.monotonic()

    def results() -> int:
        return int(query(db, "SELECT COUNT(*) FROM task_results")[0][0])

    f.wait(lambda: results() >= 1500, 40, "the HTTP drain to be under way")
    at_kill = results()
    f.kill("api")
    time.sleep(1.0)
    f.start_hub_role("api")
    # And the device side: kill -9 the agent mid-drain too, then start it again.
    f.wait(lambda: results() >= at_kill + 3000, 60, "the drain to resume")
    f.kill_agent(AGENT)
    at_agent_kill = results()
    agent.start(f.broker.port, {"site": "test"}, f.url)
    f.wait(lambda: results() >= N, 60, f"all {N} results at the hub")
    elapsed = time.monotonic() - t0
    # Let the last acknowledgements reach the outbox before stopping the agent.
    f.wait(lambda: _outbox_depth(agent_dir) == 0, 20, "the device's outbox to empty")
    agent.stop()
    log = (agent_dir / "agent.log").read_text()
    print(f"synced {N} results in {elapsed:.1f}s; hub API killed at {at_kill}, agent at {at_agent_kill}")

    rows = query(db, "SELECT r.assignment_id, r.applied, t.map_index FROM task_results r JOIN task_instances t ON t.id = r.ti_id ORDER BY r.id")
    assert len(rows) == N
    assert len({r[0] for r in rows}) == N
    assert all(r[1] for r in rows)
    # Committed in the device's order, across the kill and the MQTT fallback.
    assert [r[2] for r in rows] == list(range(N))
    states = dict(query(db, "SELECT state, COUNT(*) FROM task_instances WHERE run_pk = ? GROUP BY state", run_pk))
    assert states == {"success": N}
    assert _outbox_depth(agent_dir) == 0
    assert "HTTP sync failed" in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # The device ran nothing: it only synced. (On its return the hub sends it
    # again every assignment it never accepted, hub.offline; the device finds
    # each one done already and runs none of them.)
    assert " finished: " not in log, log[-3000:]


def _outbox_depth(agent_dir: Any) -> int:
    # Status 0 (ready) and 1 (claimed) are litequeue's pending states.
    return int(query(str(agent_dir / "outbox.sqlite3"), 'SELECT COUNT(*) FROM "Queue" WHERE status IN (0, 1)')[0][0])

