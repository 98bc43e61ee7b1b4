"""The fleet simulator against a real hub: 20 simulated devices (the real
agent code, in two processes) enrol over HTTPS with one multi-use token,
come online, and each runs its instance of a fan-out noop task; the
failing devices are the ones the seed picks, every time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

from agent import fleetsim
from hub.db import make_engine, make_sessionmaker
from hub.models import Agent, AuditRecord
from tests.broker.pki import Pki
from tests.e2e.conftest import Fleet
from tests.tlsfront import TlsFront

if TYPE_CHECKING:  # the fixture's type; several conftest modules exist, so never import it at run time
    from tests.conftest import Broker

FAN_OUT = """
from hub.dag import DAG, AgentOperator, every_agent
with DAG("sim_fan_out") as dag:
    AgentOperator(task_id="ping", job_type="noop", target=every_agent(fleet="sim"))
"""


def simulate(root: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(root.parent / "simulate.log", "ab")
    try:
        return subprocess.Popen([sys.executable, "-m", "agent", "simulate", "--root", str(root), *args], stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


@pytest.mark.timeout(120)
def test_twenty_simulated_devices_enrol_come_online_and_each_run_a_fan_out_task(tmp_path: Path, mosquitto: Broker) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "sim.py").write_text(FAN_OUT)
    hub = Fleet(tmp_path, mosquitto, dags)
    pki = Pki(tmp_path / "pki")
    root = tmp_path / "fleet"
    proc = None
    try:
        hub.start_hub()
        token = hub.api("POST", "/enrolment-tokens", json={"uses": 20, "expires": "1h"})["token"]
        with TlsFront(hub.api_port, pki.server_cert, pki.server_key) as front:
            proc = simulate(
                root, "--count", "20", "--hub", front.url, "--ca-file", str(pki.ca), "--enrolment-token", token,
                "--broker", f"127.0.0.1:{mosquitto.port}", "--label", "fleet=sim", "--hardware", "sim-v2", "--firmware", "1.2.0",
                "--fail-rate", "0.1", "--fail-seed", "3", "--processes", "2", "--wave", "5", "--duration", "100",
            )
            hub.wait_agents_online(20, timeout=60)
        online = hub.api("GET", "/agents", params={"state": "online"})["items"]
        ids = fleetsim.device_ids("sim", 20)
        assert sorted(a["agent_id"] for a in online) == ids
        run = hub.wait_run(hub.trigger("sim_fan_out"), timeout=60)
        assert run["state"] == "success"
        tis, results = hub.results(run["id"])
        assert sorted(t.agent_id or "" for t in tis) == ids and all(t.state == "success" for t in tis)
        assert len(results) == 20

        # Every device was enrolled with its own key, through the one token.
        engine = make_engine(hub.db_url)
        try:
            with make_sessionmaker(engine)() as session:
                keys = {a.agent_id: a.public_key for a in session.scalars(select(Agent))}
                uses = [r.detail["use"] for r in session.scalars(select(AuditRecord).where(AuditRecord.action == "agent.enrol", AuditRecord.success.is_(True)))]
        finally:
            engine.dispose()
        assert sorted(keys) == ids and len(set(keys.values())) == 20
        assert sorted(uses) == list(range(1, 21))
        for agent_id in ids:
            assert (root / agent_id / "identity" / "device.key").stat().st_mode & 0o077 == 0
            assert json.loads((root / agent_id / "device" / "device.json").read_text())["firmware_version"] == "1.2.0"

        # The failing devices: the seed's pick, written down, hooks in place.
        expected = fleetsim.failing_devices(ids, 0.1, 3)
        assert len(expected) == 2
        assert json.loads((root / fleetsim.FAILING_FILE).read_text())["devices"] == expected
        hooked = sorted(i for i in ids if (root / i / "device" / "hooks" / "health-check").exists())
        assert hooked == expected
        for agent_id in expected:
            hook = root / agent_id / "device" / "hooks" / "health-check"
            assert os.access(hook, os.X_OK) and subprocess.run([str(hook)], capture_output=True, timeout=10).returncode == 1

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 0
        proc = None
        hub.wait(lambda: not hub.api("GET", "/agents", params={"state": "online"})["items"], 30, "simulated devices to go offline")
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        hub.stop()


def test_failure_injection_is_deterministic_and_sized_by_the_rate() -> None:
    ids = fleetsim.device_ids("sim", 200)
    first = fleetsim.failing_devices(ids, 0.05, 7)
    assert len(first) == 10 and first == sorted(first) and set(first) <= set(ids)
    assert fleetsim.failing_devices(list(reversed(ids)), 0.05, 7) == first  # order of the ids does not matter
    assert fleetsim.failing_devices(ids, 0.05, 8) != first
    assert fleetsim.failing_devices(ids, 0.0, 7) == []
    assert fleetsim.failing_devices(ids, 1.0, 7) == ids
    assert ids[0] == "sim-00001" and ids[-1] == "sim-00200"


def test_a_device_root_carries_the_model_the_baseline_and_the_hook(tmp_path: Path) -> None:
    device = fleetsim.prepare_device(tmp_path / "d1", "d1", "board-x", "2.0.1", failing=True)
    assert json.loads((device / "device.json").read_text()) == {"hardware_model": "board-x", "firmware_version": "2.0.1", "serial": "d1"}
    assert (device / "hooks" / "health-check").exists()
    # A later run with another seed takes the hook away from a device no longer picked.
    fleetsim.prepare_device(tmp_path / "d1", "d1", "board-x", "2.0.1", failing=False)
    assert not (device / "hooks" / "health-check").exists()


def test_many_agents_in_one_process_stay_within_a_small_file_budget(tmp_path: Path, mosquitto: Broker) -> None:
    # In a child: the read pool size is process-wide and this process has
    # queues open. 80 agents take the sockets past FD_SETSIZE (1024), where
    # paho's select() would fail (shared/mqtt.py polls instead).
    script = f"""
import os, sys, threading, time
from pathlib import Path
from agent import fleetsim, queues
from agent.config import load_settings
from agent.daemon import Agent
from shared.signing import SigningKey
fleetsim.raise_file_limit(); queues.set_read_pool_size(1); threading.stack_size(fleetsim.STACK_SIZE)
hub = SigningKey.generate().public.to_text()
agents = [Agent(load_settings(None, env={{}}, overrides={{"agent_id": f"fd-{{i}}", "state_dir": str(Path(r"{tmp_path}") / f"a{{i}}"),
          "broker_port": {mosquitto.port}, "hub_public_keys": [hub], "concurrency": 1}})) for i in range(80)]
base = len(os.listdir("/proc/self/fd"))
for a in agents: a.start()
end = time.monotonic() + 30
while not all(a.link.connected for a in agents) and time.monotonic() < end: time.sleep(0.05)
time.sleep(1)
print(len(os.listdir("/proc/self/fd")), threading.active_count(), sum(a.link.connected for a in agents))
for a in agents: a.stop(2)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    fds, threads, connected = map(int, done.stdout.split())
    assert connected == 80
    assert 1024 < fds <= 80 * 18 + 20, f"{fds} open files for 80 agents"
    assert threads <= 80 * 8 + 5, f"{threads} threads for 80 agents"


def test_the_per_process_job_cap_runs_jobs_one_after_another(tmp_path: Path) -> None:
    import threading
    import time

    from agent import jobhost
    from firmware_jobs.noop import Noop

    spans: dict[str, list[float]] = {}

    def run(name: str) -> None:
        spec = jobhost.Spec(name, Noop, {"sleep": 0.4, "echo": name}, tmp_path / name, None, {}, jobhost.Limits())
        (tmp_path / name).mkdir()
        hooks = jobhost.Hooks(started=lambda pid: spans.setdefault(name, []).append(time.monotonic()))
        outcome, timed_out = jobhost.run(spec, hooks, timeout=30, abort=threading.Event(), grace=1.0)
        spans[name].append(time.monotonic())
        assert outcome.kind == "ok" and outcome.output == {"echo": name} and not timed_out

    jobhost.limit_jobs(1)
    try:
        threads = [threading.Thread(target=run, args=(f"job-{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        jobhost.limit_jobs(None)
    assert len(spans) == 3 and all(len(s) == 2 for s in spans.values())
    ordered = sorted(spans.values())
    # Each job's process started only after the one before had finished.
    assert all(later[0] >= earlier[1] for earlier, later in zip(ordered, ordered[1:]))


def test_simulated_devices_trust_the_release_key_and_download_from_the_enrolment_url(tmp_path: Path) -> None:
    import argparse

    from shared.signing import SigningKey

    parser = argparse.ArgumentParser()
    fleetsim.add_arguments(parser)
    ca = tmp_path / "ca.pem"
    ca.write_text("not read here\n")
    release = SigningKey.generate().public.to_text()
    args = parser.parse_args(["--count", "2", "--root", str(tmp_path / "fleet"), "--hub", "https://hub.test:8443", "--ca-file", str(ca), "--release-key", release])
    settings = fleetsim.Simulator(args, fleetsim.device_ids("sim", 2), set()).settings("sim-00001")
    assert settings.hub_url == "https://hub.test:8443" and settings.hub_ca == str(ca)
    assert list(settings.release_public_keys) == [release]
    # Without --hub (devices enrolled by an earlier run) there is no download URL.
    bare = parser.parse_args(["--count", "2", "--root", str(tmp_path / "fleet")])
    settings = fleetsim.Simulator(bare, fleetsim.device_ids("sim", 2), set()).settings("sim-00001")
    assert settings.hub_url is None and not settings.release_public_keys
