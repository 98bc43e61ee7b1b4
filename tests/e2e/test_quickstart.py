"""The README's first command: ``outpost-hub standalone`` brings up a broker,
the hub and three agents, runs fleet_health, and Ctrl-C stops it all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.e2e


def standalone(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hub", "standalone", "--state-dir", str(tmp_path / "state"), "--port", "0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_standalone_runs_the_fleet_demo_and_reports_success(tmp_path: Path) -> None:
    proc = standalone(tmp_path, "--exit-after-demo")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "Dashboard: http://127.0.0.1:" in out
    assert "3 agent(s) online" in out
    assert out.count(": success") >= 4  # three collect instances and the summary
    assert "Run 1 of fleet_health: success" in out
    # Then the staged firmware update: agent-3's image fails its health check and rolls back, within the threshold.
    assert "update[2] on agent-3: failed" in out and "rolled back to slot a (1.0.0)" in out
    assert "Rollout 1 (update): completed; 1 failed, 2 succeeded" in out
    assert "Run 2 of firmware_rollout: success" in out
    for agent in ("agent-1", "agent-2", "agent-3"):
        folder = tmp_path / "state" / "agents" / agent
        assert (folder / "inbox.sqlite3").exists() and (folder / "outbox.sqlite3").exists()


def test_ctrl_c_stops_broker_hub_and_agents(tmp_path: Path) -> None:
    proc = standalone(tmp_path, "--no-demo")
    assert proc.stdout is not None
    url = None
    login = ""
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if "Dashboard:" in line:
            url = line.split("Dashboard: ")[1].split()[0].rstrip("/")
        if line.startswith("Log in as admin"):
            login = line
        if "Press Ctrl-C" in line or time.monotonic() > deadline:
            break
    assert url is not None
    assert httpx.get(f"{url}/api/v1/healthz", timeout=5).status_code == 200
    # No configuration, yet protected: a generated secret key, an admin with a
    # random password (printed), and an admin token the CLI can use.
    hub_dir = tmp_path / "state" / "hub"
    password = (hub_dir / "admin-password").read_text().strip()
    assert f"password {password} " in login and len(password) >= 12
    for name in ("secret-key", "admin-password", "admin-token"):
        assert (hub_dir / name).stat().st_mode & 0o777 == 0o600, name
    assert httpx.get(f"{url}/api/v1/dags", timeout=5).status_code == 401
    token = (hub_dir / "admin-token").read_text().strip()
    assert httpx.get(f"{url}/api/v1/dags", headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code == 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_TOKEN")}
    cli = subprocess.run([sys.executable, "-m", "hub.ctl", "--hub", url, "dags", "list"], capture_output=True, text=True, timeout=30, env={**env, "OUTPOST_TOKEN_FILE": str(hub_dir / "admin-token")})
    assert cli.returncode == 0 and "fleet_health" in cli.stdout, cli.stderr
    children = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()]
    assert len(children) >= 4  # mosquitto and three agents
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    assert "Stopping agents, hub and broker" in rest
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children), [p for p in children if alive(p)]


def test_kill_9_of_standalone_leaves_no_broker_or_agent_behind(tmp_path: Path) -> None:
    proc = standalone(tmp_path, "--no-demo")
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Press Ctrl-C" in line:
            break
    children = [int(p) for p in subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout.split()]
    assert len(children) >= 4
    proc.kill()
    proc.communicate(timeout=10)
    deadline = time.monotonic() + 15
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in children)
