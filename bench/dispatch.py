"""Dispatch benchmark: the real standalone stack (private Mosquitto, hub,
K agent processes) moving no-op agent tasks.

Prints, for this machine:
* wide: 1 -> N no-op agent tasks -> 1 hub task, over K agents: wall time
  from trigger to run end, and agent task instances completed per second;
* chain: M no-op agent tasks one after another: wall time, per-link time;
* latency: trigger to start of a single agent task, p50/p99 over R runs;
* peak RSS (VmHWM) of the hub process and of each agent process.

Usage: python bench/dispatch.py [--tasks 200] [--agents 3] [--chain 50] [--runs 30]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

WIDE = """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("bench_wide") as dag:
    start = PythonOperator(task_id="start", python_callable=lambda: None)
    end = PythonOperator(task_id="end", python_callable=lambda: None)
    for i in range({n}):
        start >> AgentOperator(task_id=f"noop_{{i}}", job_type="noop", target=any_agent()) >> end
"""
CHAIN = """
from hub.dag import DAG, AgentOperator, chain, any_agent
with DAG("bench_chain") as dag:
    chain(*[AgentOperator(task_id=f"link_{{i}}", job_type="noop", target=any_agent()) for i in range({n})])
"""
ONE = """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("bench_one") as dag:
    AgentOperator(task_id="one", job_type="noop", target=any_agent())
"""


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def vmhwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--chain", type=int, default=50)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--only-wide", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="outpost-bench-"))
    dags = root / "dags"
    dags.mkdir()
    (dags / "wide.py").write_text(WIDE.format(n=args.tasks))
    (dags / "chain.py").write_text(CHAIN.format(n=args.chain))
    (dags / "one.py").write_text(ONE)
    port = 18080 + os.getpid() % 1000
    hub = subprocess.Popen(
        [sys.executable, "-m", "hub", "--log-level", "WARNING", "standalone", "--state-dir", str(root / "state"), "--agents", str(args.agents),
         "--port", str(port), "--no-demo", "--dags-folder", str(dags)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = None
    assert hub.stdout is not None
    for line in hub.stdout:
        if "Dashboard:" in line:
            url = line.split("Dashboard: ")[1].split("/ ")[0].strip().rstrip("/")
            break
    if url is None:
        print("hub did not start", file=sys.stderr)
        return 1
    # Standalone writes an admin API token on its first run, once it printed the URL.
    token_file = root / "state" / "hub" / "admin-token"
    deadline = time.monotonic() + 30
    while not token_file.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    api = httpx.Client(base_url=f"{url}/api/v1", timeout=30, headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
    try:
        deadline = time.monotonic() + 60
        while len(api.get("/agents", params={"state": "online"}).json()["items"]) < args.agents:
            if time.monotonic() > deadline:
                raise SystemExit("agents did not come online")
            time.sleep(0.2)

        def run(dag_id: str) -> tuple[float, dict]:
            # Poll the light run list, not the run with all its task instances:
            # the benchmark must not be what loads the hub. Wall time comes
            # from the hub's own stamps (trigger to end).
            run_id = api.post(f"/dags/{dag_id}/runs", json={"conf": {}}).json()["id"]
            while True:
                rows = api.get("/runs", params={"dag_id": dag_id, "limit": 1}).json()["items"]
                if rows and rows[0]["id"] == run_id and rows[0]["state"] in ("success", "failed"):
                    break
                time.sleep(0.02)
            body = api.get(f"/runs/{run_id}").json()
            wall = ts(body["ended_at"]) - ts(body["created_at"])
            if body["state"] != "success":
                raise SystemExit(f"{dag_id} run failed: {body}")
            return wall, body

        run("bench_one")  # warm-up: imports, first connections
        wall, body = run("bench_wide")
        agent_tis = [t for t in body["task_instances"] if t["kind"] == "agent"]
        span = max(ts(t["ended_at"]) for t in agent_tis) - min(ts(t["queued_at"]) for t in agent_tis)
        print(f"wide  1 -> {args.tasks} noop -> 1 over {args.agents} agents: {wall:.2f} s trigger-to-end; "
              f"{len(agent_tis) / span:.0f} agent tasks/s (first queued to last done: {span:.2f} s)")

        if args.only_wide:
            return 0
        wall, body = run("bench_chain")
        print(f"chain of {args.chain} noop agent tasks: {wall:.2f} s ({wall / args.chain * 1000:.1f} ms per link)")

        latencies = []
        for _ in range(args.runs):
            _, body = run("bench_one")
            ti = body["task_instances"][0]
            latencies.append((ts(ti["started_at"]) - ts(body["created_at"])) * 1000)
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
        print(f"trigger-to-start latency over {args.runs} runs: p50 {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms")

        agents = [p for p in children(hub.pid) if "agent" in Path(f"/proc/{p}/cmdline").read_text()]
        print(f"peak RSS: hub {vmhwm_mb(hub.pid):.1f} MB; agents " + ", ".join(f"{vmhwm_mb(p):.1f}" for p in agents) + " MB")
    finally:
        hub.send_signal(signal.SIGINT)
        hub.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
