"""Everything on one machine: a private broker, the hub, and N local agents.

``outpost-hub standalone`` is the first thing a newcomer runs. It starts a
private Mosquitto on a free loopback port (its data in the state folder),
one hub process (scheduler, ingestion, publisher, API, dashboard) and N
agents as separate ``python -m agent`` processes, each with its own state
folder and queue files. Agents are never imported here: the hub must not
depend on agent code.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from hub import demo_fleet
from hub import events as ev
from hub import rollout_queries
from hub.artifacts import ArtifactStore
from hub.auth.bootstrap import AdminLogin, ensure_admin
from hub.auth.keys import load_or_create_secret_key
from hub.config import HubSettings
from hub.db import transaction
from hub.encryption import ensure_key_file
from hub.errors import Conflict
from hub.identity import register_agent
from hub.models import Agent, DagRun, RolloutRecord, TaskInstance
from hub.runtime import HubRuntime
from hub.scheduler import trigger_run
from shared.clock import utcnow
from shared.files import atomic_write
from shared.signing import PublicKey, SigningKey
from shared.states import RunState

log = logging.getLogger(__name__)

#: The Fernet key standalone generates in <state-dir>/hub/ when none is configured.
FERNET_KEY_FILE = "fernet.key"


def _die_with_parent() -> list[str]:
    """A command prefix that has Linux send the child SIGTERM when its parent
    dies, even by kill -9, so no broker or agent is left behind holding ports
    and files (util-linux ``setpriv``; nothing where it is missing). An exec
    wrapper, not ``preexec_fn``, which is unsafe once threads run. The signal
    follows the spawning *thread*: spawn from the main thread."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv and sys.platform.startswith("linux") else []


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class BrokerMissing(RuntimeError):
    pass


@dataclass
class PrivateBroker:
    """A Mosquitto of our own on loopback, data kept in ``folder``. The same
    port is reused across :meth:`restart`, so clients reconnect to it (the
    fault tests kill and restart it this way)."""

    folder: Path
    port: int = 0
    #: Seconds between persistence saves; tests that kill -9 the broker use 1.
    autosave_interval: int = 5
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
        if binary is None:
            raise BrokerMissing("mosquitto is not installed. Install it (Debian/Ubuntu: apt-get install mosquitto; macOS: brew install mosquitto) or run ./dev demo, which installs it.")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            "# Written by Outpost: a private broker on loopback.\n"
            f"listener {self.port} 127.0.0.1\n"
            # Stay the user we are: the broker's files live in our state folder.
            f"user {getpass.getuser()}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.folder}/\n"
            f"autosave_interval {self.autosave_interval}\n"
            "max_queued_messages 100000\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.folder}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
        )
        self.proc = subprocess.Popen([*_die_with_parent(), binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}; see {self.folder / 'mosquitto.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop(kill=True)
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout}s")

    def stop(self, kill: bool = False) -> None:
        """Stop it (SIGTERM, then SIGKILL after 10 s), or kill -9 it at once."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()


def provision_device(state_dir: Path, agent_id: str, sessions: Any, hub_keys: list[PublicKey], now: datetime) -> None:
    """Make a local device's identity the way an operator would with
    ``outpost-agent keygen`` and ``outpost-agent trust add`` on the device
    and ``outpost-hub agents register`` on the hub, through the agent's
    documented file layout (``<state_dir>/identity/``: ``device.key``,
    ``hub-keys.json``; the hub does not import the agent)."""
    identity_dir = state_dir / "identity"
    key = SigningKey.load_or_create(identity_dir / "device.key")
    texts = [k.to_text() for k in hub_keys]
    atomic_write(identity_dir / "hub-keys.json", json.dumps({"keys": texts}, indent=2).encode() + b"\n", mode=0o600)
    try:
        with transaction(sessions) as session:
            register_agent(session, agent_id, key.public, now, replace=True)
    except Conflict as exc:  # revoked on purpose: it stays so
        log.warning("local agent %s not registered: %s", agent_id, exc)


@dataclass
class LocalAgent:
    agent_id: str
    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, broker_port: int, labels: dict[str, str], hub_url: str | None = None, extra: dict[str, Any] | None = None) -> None:
        """Write the agent's config and start it. With ``hub_url`` its large
        outbox backlogs sync over HTTP and firmware downloads come from the
        hub, signed with its device key (:meth:`device_key`, which the hub
        must have registered). ``extra``: more top-level settings (JSON values)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "agent.toml"
        label_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in labels.items())
        http_lines = f"hub_url = {json.dumps(hub_url)}\n" if hub_url else ""
        http_lines += "".join(f"{key} = {json.dumps(value)}\n" for key, value in (extra or {}).items())
        config.touch(mode=0o600)
        config.chmod(0o600)
        config.write_text(
            "# Written by outpost-hub standalone.\n"
            + http_lines
            + f'agent_id = "{self.agent_id}"\n'
            f"state_dir = {json.dumps(str(self.folder))}\n"
            'broker_host = "127.0.0.1"\n'
            f"broker_port = {broker_port}\n"
            "heartbeat_interval = 5.0\n"
            "sqlite_synchronous = \"NORMAL\"\n"
            'command_allowlist = ["uptime", "df", "hostname"]\n'
            f"\n[labels]\n{label_lines}\n"
        )
        log_file = open(self.folder / "agent.log", "ab")
        self.proc = subprocess.Popen(
            [*_die_with_parent(), sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log_file.close()

    def device_key(self) -> PublicKey:
        """The agent's device key, made in its state folder where the agent
        reads it (agent/identity.py's layout): standalone pre-registers its
        local agents instead of enrolling them."""
        return SigningKey.load_or_create(self.folder / "identity" / "device.key").public
    def provision(self, sessions: Any, hub_keys: list[PublicKey], now: datetime) -> None:
        provision_device(self.folder, self.agent_id, sessions, hub_keys, now)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Standalone:
    state_dir: Path
    agents: int = 3
    api_port: int = 8080
    config_file: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = self.state_dir.resolve()
        self.broker = PrivateBroker(self.state_dir / "broker")
        self.local_agents = [LocalAgent(f"agent-{i}", self.state_dir / "agents" / f"agent-{i}") for i in range(1, self.agents + 1)]
        self.runtime: HubRuntime | None = None
        self.admin: AdminLogin | None = None

    def start(self) -> HubRuntime:
        self.broker.start()
        port = self.api_port
        if port and not port_free("127.0.0.1", port):
            log.warning("port %d is taken; the dashboard will use another one", port)
            port = free_port()
        overrides = {"state_dir": self.state_dir / "hub", "broker_port": self.broker.port, "api_port": port, **self.overrides}
        settings = HubSettings.load(self.config_file, **overrides)
        if not settings.fernet_keys:
            # No configuration for the demo: a key of its own in the state
            # folder (0600), reused by later runs so stored secrets stay readable.
            settings = settings.model_copy(update={"fernet_keys": ensure_key_file(self.state_dir / "hub" / FERNET_KEY_FILE)})
        if not settings.secret_key:
            # The demo needs no configuration: a random key made on first run and
            # kept (0600) in the state folder, so sessions survive a restart.
            settings = settings.model_copy(update={"secret_key": load_or_create_secret_key(self.state_dir / "hub" / "secret-key")})
        self.runtime = HubRuntime(settings)
        self.runtime.start()
        # First run: an admin with a random password, and an admin token for the CLI.
        self.admin = ensure_admin(self.runtime.sessions, self.state_dir / "hub", utcnow(self.runtime.clock))
        # Pre-registered local devices (their keys, the hub keys they trust): the
        # demo's agents sign what they send, over MQTT and HTTP, like enrolled ones.
        # The demo's firmware release (hub.demo_fleet): its devices trust the
        # demo release key, and the last of three or more fails its health check
        # so the firmware_rollout example shows an automatic rollback.
        key = demo_fleet.release_key(self.state_dir)
        demo_fleet.publish_demo_release(ArtifactStore.from_settings(settings, self.runtime.sessions, self.runtime.clock), key, self.state_dir, self.runtime.clock)
        extra = {"release_public_keys": [key.public.to_text()]}
        for i, agent in enumerate(self.local_agents):
            demo_fleet.prepare_device_root(agent.folder / "device", healthy=len(self.local_agents) < 3 or i < len(self.local_agents) - 1)
            agent.provision(self.runtime.sessions, self.runtime.keyring.ring().public_keys(), utcnow(self.runtime.clock))
            agent.start(self.broker.port, {"site": "demo", "rack": f"r{i % 2 + 1}"}, self.runtime.api_url, extra=extra)
        return self.runtime

    def stop(self) -> None:
        for agent in self.local_agents:
            agent.stop()
        if self.runtime is not None:
            self.runtime.stop()
        self.broker.stop()

    def wait_for_agents(self, timeout: float = 60.0) -> int:
        assert self.runtime is not None
        deadline = time.monotonic() + timeout
        online = 0
        while time.monotonic() < deadline:
            with self.runtime.sessions() as session:
                online = session.scalar(select(func.count()).select_from(Agent).where(Agent.state == "online", Agent.agent_id.in_([a.agent_id for a in self.local_agents]))) or 0
            if online >= len(self.local_agents):
                return online
            for agent in self.local_agents:
                if agent.proc is not None and agent.proc.poll() is not None:
                    raise RuntimeError(f"{agent.agent_id} exited with {agent.proc.returncode}; see {agent.folder / 'agent.log'}")
            time.sleep(0.2)
        return online

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> int:
        assert self.runtime is not None
        with transaction(self.runtime.sessions) as session:
            run = trigger_run(session, dag_id, conf or {}, utcnow(self.runtime.clock))
            run_pk = run.id
        self.runtime.events.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
        return run_pk

    def wait_for_run(self, run_pk: int, timeout: float = 120.0) -> DagRun:
        assert self.runtime is not None
        deadline = time.monotonic() + timeout
        while True:
            with self.runtime.sessions() as session:
                run = session.get(DagRun, run_pk)
                assert run is not None
                if run.state in (RunState.SUCCESS, RunState.FAILED) or time.monotonic() > deadline:
                    return run
            time.sleep(0.1)

    def rollouts_of(self, run_pk: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Summaries (hub.rollout_queries) of the rollouts in run ``run_pk``,
        once the engine recorded them finished (its pass after the run's last
        device reported) or ``timeout`` passed."""
        assert self.runtime is not None
        deadline = time.monotonic() + timeout
        while True:
            with self.runtime.sessions() as session:
                records = session.scalars(select(RolloutRecord.id).where(RolloutRecord.run_pk == run_pk)).all()
                found = [rollout_queries.get_rollout(session, rollout_id) for rollout_id in records]
            if all(r["finished_at"] for r in found) or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def describe_run(self, run_pk: int) -> list[TaskInstance]:
        assert self.runtime is not None
        with self.runtime.sessions() as session:
            return list(session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run_pk).order_by(TaskInstance.task_id, TaskInstance.map_index)))
