"""Real processes: a private Mosquitto, the hub's scheduler and API processes,
agents as ``python -m agent`` processes. Kill them with -9, restart them.

``Fleet.api`` authenticates as an admin: ``Fleet.token`` is an admin API
token made in the hub's database on first use (pass it to the ``outpost``
CLI as ``OUTPOST_TOKEN``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from hub.db import make_engine, make_sessionmaker
from hub.identity import HubKeyring
from hub.models import TaskInstance, TaskResult
from hub.standalone import LocalAgent, provision_device
from shared.clock import SystemClock, utcnow
from tests.conftest import Broker, free_port, stop_process, wait_port
from tests.hub.api_harness import TEST_SECRET_KEY, make_token

pytestmark = pytest.mark.e2e


@dataclass
class Fleet:
    root: Path
    broker: Broker
    dags: Path
    api_port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    agents: dict[str, LocalAgent] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = self.root / "hub.toml"
        self.config.write_text(
            f'state_dir = "{self.root / "hub"}"\n'
            f'dags_folder = "{self.dags}"\n'
            f"broker_port = {self.broker.port}\n"
            f"api_port = {self.api_port}\n"
            "redeliver_after = 3.0\n"
            "scheduler_interval = 0.2\n"
            # The hub refuses to start without one (hub.encryption).
            f'fernet_keys = "{Fernet.generate_key().decode()}"\n'
            f'secret_key = "{TEST_SECRET_KEY}"\n'
        )
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.db_url = f"sqlite:///{self.root / 'hub' / 'hub.db'}"

    # --- processes ---------------------------------------------------------

    def start_hub(self) -> None:
        self.start_hub_role("scheduler")
        self.start_hub_role("api")
        wait_port(self.api_port, 20)

    def start_hub_role(self, role: str) -> None:
        log = open(self.root / f"hub-{role}.log", "ab")
        self.procs[role] = subprocess.Popen([sys.executable, "-m", "hub", role, "--config", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if role == "scheduler":
            self._wait_for_schema()

    _connects: int = 0

    def _wait_for_schema(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.log("scheduler").count("mqtt connected") > self._connects:
                self._connects += 1
                return
            time.sleep(0.1)
        raise AssertionError(f"scheduler did not connect:\n{self.log('scheduler')}")

    def start_all(self, agents: int = 3) -> None:
        """Hub processes and ``agents`` agents (agent-1...), all online."""
        self.start_hub()
        for i in range(1, agents + 1):
            self.start_agent(f"agent-{i}")
        self.wait_agents_online(agents)

    def kill(self, role: str) -> None:
        proc = self.procs.pop(role)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def log(self, role: str) -> str:
        path = self.root / f"hub-{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def provision(self, agent_id: str, folder: Path | None = None) -> None:
        """The device key, the hub keys it trusts and its registration with
        the hub (the hub processes made the ring and the schema at start)."""
        engine = make_engine(self.db_url)
        try:
            ring = HubKeyring.load(self.root / "hub" / "keys")
            provision_device(folder or self.root / "agents" / agent_id, agent_id, make_sessionmaker(engine), ring.public_keys(), utcnow(SystemClock()))
        finally:
            engine.dispose()

    def start_agent(self, agent_id: str, *, hub_url: str | None = None, extra: dict[str, Any] | None = None, **labels: str) -> LocalAgent:
        agent = self.agents.get(agent_id) or LocalAgent(agent_id, self.root / "agents" / agent_id)
        if agent_id not in self.agents:
            self.provision(agent_id, agent.folder)
        agent.start(self.broker.port, labels or {"site": "test"}, hub_url=hub_url, extra=extra)
        self.agents[agent_id] = agent
        return agent

    def kill_agent(self, agent_id: str) -> None:
        proc = self.agents[agent_id].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for agent in self.agents.values():
            agent.stop(timeout=5)
        for proc in self.procs.values():
            stop_process(proc)

    # --- API ---------------------------------------------------------------

    _token: str | None = None

    @property
    def token(self) -> str:
        """An admin API token (made once the scheduler has migrated the database)."""
        if self._token is None:
            engine = make_engine(self.db_url)
            try:
                self._token = make_token(make_sessionmaker(engine))
            finally:
                engine.dispose()
        return self._token

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        response = httpx.request(method, f"{self.url}/api/v1{path}", timeout=10, headers=headers, **kwargs)
        response.raise_for_status()
        return response.json()

    def wait_agents_online(self, count: int, timeout: float = 30) -> None:
        self.wait(lambda: len(self.api("GET", "/agents", params={"state": "online"})["items"]) >= count, timeout, "agents online")

    def trigger(self, dag_id: str) -> int:
        return int(self.api("POST", f"/dags/{dag_id}/runs", json={"conf": {}})["id"])

    def wait_run(self, run_pk: int, timeout: float = 60) -> dict[str, Any]:
        self.wait(lambda: self.api("GET", f"/runs/{run_pk}")["state"] in ("success", "failed"), timeout, f"run {run_pk} to finish")
        return self.api("GET", f"/runs/{run_pk}")

    def wait(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (httpx.HTTPError, KeyError) as exc:
                last_error = exc
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what} (last error: {last_error})\n--- scheduler log tail ---\n{self.log('scheduler')[-3000:]}")

    # --- the database, read directly for exactly-once checks ---------------

    def results(self, run_pk: int) -> tuple[list[TaskInstance], list[TaskResult]]:
        engine = make_engine(self.db_url)
        try:
            with make_sessionmaker(engine)() as session:
                tis = list(session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run_pk)))
                results = list(session.scalars(select(TaskResult).where(TaskResult.ti_id.in_([t.id for t in tis]))))
        finally:
            engine.dispose()
        return tis, results


@pytest.fixture
def fleet(tmp_path: Path, mosquitto: Broker) -> Iterator[Any]:
    def build(dags: dict[str, str] | None = None) -> Fleet:
        folder = tmp_path / "dags"
        folder.mkdir(exist_ok=True)
        for name, text in (dags or {}).items():
            (folder / name).write_text(text)
        if not dags:
            examples = Path(__file__).resolve().parents[2] / "hub" / "example_dags"
            for path in examples.glob("*.py"):
                (folder / path.name).write_text(path.read_text())
        made = Fleet(tmp_path, mosquitto, folder)
        fleets.append(made)
        return made

    fleets: list[Fleet] = []
    yield build
    for made in fleets:
        made.stop()
