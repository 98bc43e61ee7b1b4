"""Sync benchmark: a device's backlog of buffered results drained to the hub,
over the HTTP bulk endpoint and, for comparison, over MQTT.

Real parts throughout: a private Mosquitto, the hub's scheduler and API as
separate processes (``outpost-hub scheduler`` / ``api``) on SQLite, and the
agent as a ``python -m agent`` process. The hub issues the assignments (one
mapped agent task per phase); the device "ran them offline": its outbox is
filled with their results before it starts. Then the agent starts and the
clock runs until the hub holds every result and the outbox is empty.

Prints per phase: results per second, wall time, CPU seconds of the hub's
scheduler process (MQTT ingestion), of its API process (HTTP ingestion) and
of the agent, and the machine's load average.

Usage: python bench/sync.py [--http 100000] [--mqtt 20000] [--batch 500]

Figures on the 2-core development machine (shared, load average 1-1.4),
SQLite with synchronous FULL, agent outbox NORMAL, 100,000 results each:

* HTTP (batches of 500): 64.5 s, 1,550 results/s; CPU s: hub API 27.0, hub
  scheduler 25.7 (scheduling the finished task instances, not ingesting),
  agent 12.1.
* MQTT (window of 100): 149.9 s, 667 results/s; CPU s: hub scheduler 119.2
  (ingestion and scheduling), agent 67.5.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.publish as mqtt_publish
from paho.mqtt.client import MQTTv5

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.queues import Outbox  # noqa: E402
from hub.auth.bootstrap import ensure_admin  # noqa: E402
from hub.db import make_engine, make_sessionmaker  # noqa: E402
from hub.encryption import generate_key  # noqa: E402
from hub.identity import HubKeyring  # noqa: E402
from hub.standalone import LocalAgent, PrivateBroker, free_port, provision_device  # noqa: E402
from shared.clock import SystemClock, utcnow  # noqa: E402
from shared.envelope import Envelope  # noqa: E402
from shared.frames import AGENT_TO_HUB, sign_envelope  # noqa: E402
from shared.signing import SigningKey  # noqa: E402
from shared.hlc import HLC  # noqa: E402
from shared.messages import JobTypeInfo, Result, Status  # noqa: E402
from shared.topics import status_topic  # noqa: E402

# One mapped task per device, CHUNK instances per run: the hub expands a
# 10,000-wide map in seconds, a 100,000-wide one not within minutes.
DAG = """
from hub.dag import DAG, AgentOperator, on_agent
for agent_id in {agents!r}:
    with DAG(f"backlog_{{agent_id.replace('-', '_')}}", max_active_tasks=1_000_000, max_active_runs=1000) as dag:
        AgentOperator.partial(task_id="work", job_type="noop", target=on_agent(agent_id)).expand(params=[{{"echo": str(i)}} for i in range({chunk})])
    globals()[f"dag_{{agent_id.replace('-', '_')}}"] = dag
"""

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def query(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=60) as conn:
        return conn.execute(sql, args).fetchall()


def wait(condition: Any, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (sqlite3.Error, httpx.HTTPError):
            pass
        time.sleep(poll)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", type=int, default=100_000, help="backlog synced over HTTP (0: skip)")
    parser.add_argument("--mqtt", type=int, default=20_000, help="backlog synced over MQTT for comparison (0: skip)")
    parser.add_argument("--batch", type=int, default=500, help="items per HTTP batch (agent http_sync_batch)")
    parser.add_argument("--chunk", type=int, default=10_000, help="assignments per run the hub issues (sizes are rounded up to a multiple)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the clean-up below
    os.environ["OUTPOST_AGENT_HTTP_SYNC_BATCH"] = str(args.batch)  # the agents inherit it
    sizes = {a: -(-n // args.chunk) * args.chunk for a, n in (("dev-http", args.http), ("dev-mqtt", args.mqtt)) if n}

    root = Path(tempfile.mkdtemp(prefix="outpost-bench-sync-"))
    (root / "dags").mkdir()
    (root / "dags" / "backlog.py").write_text(DAG.format(agents=list(sizes), chunk=args.chunk))
    broker = PrivateBroker(root / "broker")
    broker.start()
    api_port = free_port()
    config = root / "hub.toml"
    config.write_text(
        f'state_dir = "{root / "hub"}"\ndags_folder = "{root / "dags"}"\nbroker_port = {broker.port}\napi_port = {api_port}\nfernet_keys = "{generate_key()}"\n'
        f'secret_key = "{secrets.token_urlsafe(48)}"\nmax_map_length = {args.chunk}\nredeliver_after = 86400.0\n'
        "agent_offline_after = 86400.0\ndefault_pool_slots = -1\nsqlite_synchronous = \"FULL\"\n"
    )
    url = f"http://127.0.0.1:{api_port}"
    db = root / "hub" / "hub.db"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    agents: list[LocalAgent] = []
    try:
        for role in ("scheduler", "api"):
            log = open(root / f"hub-{role}.log", "ab")
            procs[role] = subprocess.Popen([sys.executable, "-m", "hub", role, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
            log.close()
            if role == "scheduler":
                wait(lambda: "mqtt connected" in (root / "hub-scheduler.log").read_text(), 60, "the scheduler")
        wait(lambda: httpx.get(f"{url}/api/v1/healthz", timeout=2).status_code == 200, 60, "the API")
        # An admin API token, made in the database as standalone's first run does.
        engine = make_engine(f"sqlite:///{db}")
        ensure_admin(make_sessionmaker(engine), root / "hub", utcnow(SystemClock()))
        engine.dispose()
        API_AUTH["Authorization"] = f"Bearer {(root / 'hub' / 'admin-token').read_text().strip()}"
        print(f"machine: {os.cpu_count()} CPUs, load average {loadavg()} at start; state in {root}", flush=True)

        for agent_id, n in sizes.items():
            issue(broker, url, db, agent_id, n, args.chunk)
        # Every assignment published (to nobody) before any device connects:
        # one that connected earlier would receive the rest and work on them.
        wait(lambda: query(db, "SELECT COUNT(*) FROM outbox WHERE published_at IS NULL")[0][0] == 0, 1800, "the hub to publish every assignment", poll=1.0)
        for agent_id, n in sizes.items():
            fill(root, db, agent_id)
        for agent_id, n in sizes.items():
            over_http = agent_id == "dev-http"
            agent = LocalAgent(agent_id, root / "agents" / agent_id)
            agents.append(agent)
            before = {role: cpu_seconds(p.pid) for role, p in procs.items()}
            load_before = loadavg()
            start = time.monotonic()
            if over_http:
                agent.start(broker.port, {"site": "bench"}, url)
            else:
                agent.start(broker.port, {"site": "bench"})
            assert agent.proc is not None
            done = lambda: query(db, "SELECT COUNT(*) FROM task_results WHERE agent_id = ?", agent_id)[0][0] >= n  # noqa: E731
            wait(done, 3600, f"{n} results from {agent_id}", poll=0.2)
            wall = time.monotonic() - start
            wait(lambda: outbox_depth(root, agent_id) == 0, 120, "the outbox to empty", poll=0.1)
            agent_cpu = cpu_seconds(agent.proc.pid)
            after = {role: cpu_seconds(p.pid) for role, p in procs.items()}
            agent.stop()
            log_text = (agent.folder / "agent.log").read_text()
            applied = query(db, "SELECT COUNT(*), COUNT(DISTINCT assignment_id) FROM task_results WHERE agent_id = ?", agent_id)[0]
            print(
                f"{'HTTP' if over_http else 'MQTT'}: {n} results in {wall:.1f}s = {n / wall:,.0f} results/s; "
                f"CPU s: hub scheduler {after['scheduler'] - before['scheduler']:.1f}, hub api {after['api'] - before['api']:.1f}, agent {agent_cpu:.1f}; "
                f"applied {applied[0]} ({applied[1]} distinct); load {load_before} -> {loadavg()}; "
                f"HTTP errors in agent log: {log_text.count('HTTP sync failed')}",
                flush=True,
            )
    finally:
        for agent in agents:
            agent.stop()
        for proc in procs.values():
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
    return 0


#: The admin token's header for API calls (set once the hub is up).
API_AUTH: dict[str, str] = {}


def issue(broker: PrivateBroker, url: str, db: Path, agent_id: str, n: int, chunk: int) -> None:
    """The device announces itself with no MQTT session yet, so the
    assignments the hub sends reach nobody: it ran them offline."""
    # Provisioned as standalone does it (device key, trusted hub keys, registration).
    folder = db.parent.parent / "agents" / agent_id
    engine = make_engine(f"sqlite:///{db}")
    provision_device(folder, agent_id, make_sessionmaker(engine), HubKeyring.load(db.parent / "keys").public_keys(), utcnow(SystemClock()))
    engine.dispose()
    key = SigningKey.load(folder / "identity" / "device.key")
    status = Envelope(Status("online", "0.1.0", agent_id, {"site": "bench"}, (JobTypeInfo("noop", "1.0"),)), sender=agent_id, hlc=HLC(int(time.time() * 1000), 0, agent_id))
    mqtt_publish.single(status_topic(agent_id), sign_envelope(status, key, AGENT_TO_HUB), qos=1, retain=True, hostname="127.0.0.1", port=broker.port, protocol=MQTTv5)
    wait(lambda: any(a["agent_id"] == agent_id for a in httpx.get(f"{url}/api/v1/agents", params={"state": "online"}, headers=API_AUTH, timeout=5).json()["items"]), 30, f"{agent_id} online")
    started = time.monotonic()
    for k in range(1, n // chunk + 1):
        # One run at a time: a trigger waits for the database while the
        # scheduler expands a run in one long transaction.
        response = httpx.post(f"{url}/api/v1/dags/backlog_{agent_id.replace('-', '_')}/runs", json={"conf": {}}, headers=API_AUTH, timeout=600)
        response.raise_for_status()
        wait(lambda: query(db, "SELECT COUNT(*) FROM assignments WHERE agent_id = ?", agent_id)[0][0] >= k * chunk, 3600, f"{k * chunk} assignments for {agent_id}", poll=1.0)
    print(f"{agent_id}: hub issued {n} assignments in {time.monotonic() - started:.1f}s", flush=True)


def fill(root: Path, db: Path, agent_id: str) -> None:
    issued = query(
        db,
        "SELECT a.id, a.try_number, t.map_index FROM assignments a JOIN task_instances t ON t.id = a.ti_id WHERE a.agent_id = ? ORDER BY t.run_pk, t.map_index",
        agent_id,
    )
    started = time.monotonic()
    outbox = Outbox(root / "agents" / agent_id / "outbox.sqlite3", "NORMAL")
    wall = int(time.time() * 1000)
    for assignment_id, try_number, map_index in issued:
        outbox.put_result(Result(assignment_id, try_number, "success", {"i": map_index}), HLC(wall, map_index % 100_000, agent_id))
    outbox.close()
    print(f"{agent_id}: outbox filled with {len(issued)} results in {time.monotonic() - started:.1f}s", flush=True)


def outbox_depth(root: Path, agent_id: str) -> int:
    return int(query(root / "agents" / agent_id / "outbox.sqlite3", 'SELECT COUNT(*) FROM "Queue" WHERE status IN (0, 1)')[0][0])


if __name__ == "__main__":
    raise SystemExit(main())
