"""Fixtures for agent tests: a hub played by a raw paho client, agents to drive.

``HubPeer`` speaks the hub's side of the wire contract: it publishes assign,
cancel and ack envelopes with sender ``"hub"``, signed with ``HUB_KEY`` (which
the agents built here trust, setting ``hub_public_keys``) for this device,
numbered (``seq``) like the hub's, and collects what the agent publishes on
its events and status topics. ``make_agent`` builds an
in-process :class:`agent.daemon.Agent` on the test's ``mosquitto`` broker and
real SQLite files under ``state_dir``; ``spawn_agent`` runs ``python -m agent
run`` as a subprocess for kill tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentSettings
from agent.daemon import Agent
from agent.queues import Inbox, Outbox
from agent.runner import Runner
from shared.clock import Clock, SystemClock
from shared.envelope import Envelope, decode
from shared.frames import HUB_TO_AGENT, seal, sign_envelope, unsigned_part
from shared.hlc import HybridClock
from shared.messages import Ack, Assign, Cancel, Message, Result
from shared.mqtt import shut_down
from shared.signing import SigningKey
from shared.topics import ack_topic, assign_topic, events_topic, status_topic

AGENT_ID = "dev-1"
#: The test hub's signing key; agents built by these fixtures trust it.
HUB_KEY = SigningKey.generate()
REPO = Path(__file__).resolve().parents[2]


class HubPeer:
    """The hub's side of one agent's topics, for tests."""

    def __init__(self, port: int, agent_id: str = AGENT_ID) -> None:
        self.agent_id = agent_id
        self.hlc = HybridClock("hub", lambda: int(SystemClock().now() * 1000))
        self.key = HUB_KEY
        #: The last sequence number used (assign and cancel carry the next).
        self.seq = 0
        self.events: list[Envelope] = []
        self.statuses: list[tuple[Envelope, bool]] = []  # (status, retained)
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"hub-test-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        # Subscribe on every connect: after a broker restart the session is new.
        self.client.on_connect = lambda *args: self.client.subscribe([(events_topic(agent_id), 1), (status_topic(agent_id), 1)])
        self.client.reconnect_delay_set(1, 1)
        # A persistent session, like the real hub's: what the agent publishes
        # while this client reconnects (after a broker restart) waits for it.
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(5), "hub test client could not subscribe"

    def close(self) -> None:
        self.client.disconnect()
        shut_down(self.client)

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        # The agent's signatures are checked by the tests that are about them (test_signing.py).
        envelope = decode(unsigned_part(msg.payload))
        with self._cond:
            if msg.topic.endswith("/status"):
                self.statuses.append((envelope, bool(msg.retain)))
            else:
                self.events.append(envelope)
            self._cond.notify_all()

    # --- sending -------------------------------------------------------------

    def frame(self, body: Message, *, sender: str = "hub", expires_at: float | None = None, to: str | None = None,
              seq: int | None = None, key: SigningKey | None = None, envelope_id: str | None = None) -> bytes:
        """``body`` signed as the hub sends it: for this device (``to``), with
        the next sequence number on assign and cancel (``seq`` overrides)."""
        if seq is None and isinstance(body, Assign | Cancel):
            self.seq += 1
            seq = self.seq
        envelope = Envelope(
            body, sender=sender, hlc=self.hlc.now(), id=envelope_id or uuid.uuid4().hex, expires_at=expires_at,
            recipient=to or self.agent_id, seq=seq, issued_at=time.time(),
        )
        return sign_envelope(envelope, key or self.key, HUB_TO_AGENT)

    def sign_raw(self, data: bytes, key: SigningKey | None = None) -> bytes:
        """Any bytes (malformed JSON too) signed with the hub key."""
        return seal(data, key or self.key, HUB_TO_AGENT)

    def publish(self, body: Message | None = None, *, topic: str = "assign", sender: str = "hub",
                expires_at: float | None = None, raw: bytes | None = None, **signing: Any) -> str:
        """Publish a signed envelope (or ``raw`` bytes) on the agent's assign
        or ack topic; returns the envelope id. ``signing``: see :meth:`frame`."""
        envelope_id = uuid.uuid4().hex
        if raw is None:
            assert body is not None
            raw = self.frame(body, sender=sender, expires_at=expires_at, envelope_id=envelope_id, **signing)
        target = assign_topic(self.agent_id) if topic == "assign" else ack_topic(self.agent_id)
        self.client.publish(target, raw, qos=1).wait_for_publish(5)
        return envelope_id

    def assign(self, assignment_id: str, job_type: str = "noop", params: dict[str, Any] | None = None, **fields: Any) -> Assign:
        body = Assign(assignment_id, "dag", "run-1", "task", fields.pop("try_number", 1), job_type, params or {}, **fields)
        self.publish(body)
        return body

    def cancel(self, assignment_id: str, reason: str = "") -> None:
        self.publish(Cancel(assignment_id, reason))

    def ack(self, *assignment_ids: str) -> None:
        self.publish(Ack(tuple(assignment_ids)), topic="ack")

    # --- observing -----------------------------------------------------------

    def of(self, kind: str, assignment_id: str | None = None) -> list[Any]:
        """Bodies of the events of type ``kind`` received so far."""
        with self._cond:
            return [e.body for e in self.events if e.type == kind and (assignment_id is None or getattr(e.body, "assignment_id", None) == assignment_id)]

    def envelopes(self, kind: str) -> list[Envelope]:
        with self._cond:
            return [e for e in self.events if e.type == kind]

    def wait_for(self, kind: str, assignment_id: str | None = None, count: int = 1, timeout: float = 10.0) -> list[Any]:
        """Wait until ``count`` events of type ``kind`` arrived; returns them."""
        end = time.monotonic() + timeout
        with self._cond:
            while len(found := self.of(kind, assignment_id)) < count:
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"waited {timeout}s for {count} {kind!r} event(s) for {assignment_id}; got {[e.type for e in self.events]}")
                self._cond.wait(left)
            return found

    def wait_status(self, state: str, timeout: float = 10.0, since: int = 0) -> Envelope:
        """The latest ``state`` status among those received after the first ``since``."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                for envelope, _ in reversed(self.statuses[since:]):
                    if envelope.body.state == state:  # type: ignore[attr-defined]
                        return envelope
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {state!r} status within {timeout}s; got {[e.body for e, _ in self.statuses]}")
                self._cond.wait(left)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not met within {timeout}s")


def read_retained(port: int, topic: str, timeout: float = 5.0) -> bytes | None:
    """What the broker retains on ``topic`` (None when nothing)."""
    got: list[bytes] = []
    done = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"peek-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv5)

    def on_message(c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        if msg.retain:
            got.append(msg.payload)
        done.set()

    client.on_message = on_message
    client.on_subscribe = lambda *args: threading.Timer(0.5, done.set).start()
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    done.wait(timeout)
    client.disconnect()
    shut_down(client)
    return got[-1] if got else None


@pytest.fixture
def hub(mosquitto: Any) -> Iterator[HubPeer]:
    peer = HubPeer(mosquitto.port)
    yield peer
    peer.close()


@pytest.fixture
def settings_for(mosquitto: Any, state_dir: Path) -> Callable[..., AgentSettings]:
    def build(**overrides: Any) -> AgentSettings:
        values: dict[str, Any] = {
            "agent_id": AGENT_ID, "state_dir": state_dir, "broker_port": mosquitto.port,
            "heartbeat_interval": 0.5, "result_resend_after": 0.5, "sqlite_synchronous": "NORMAL",
            "hub_public_keys": (HUB_KEY.public.to_text(),),
        }
        values.update(overrides)
        return AgentSettings(**values)

    return build


@pytest.fixture
def make_agent(settings_for: Callable[..., AgentSettings], hub: HubPeer) -> Iterator[Callable[..., Agent]]:
    """Build and start agents; each is stopped at teardown if still running.

    Returns once the hub saw the agent's new online status: the agent
    publishes it after subscribing, so from then on nothing the hub sends
    can arrive before the agent's subscriptions exist."""
    started: list[Agent] = []

    def build(clock: Clock | None = None, registry: Any = None, **overrides: Any) -> Agent:
        agent = Agent(settings_for(**overrides), clock=clock, registry=registry)
        seen = len(hub.statuses)
        agent.start()
        started.append(agent)
        hub.wait_status("online", since=seen)
        return agent

    yield build
    for agent in started:
        if not agent._stopping.is_set():
            agent.stop(timeout=2)


@pytest.fixture
def spawn_agent(mosquitto: Any, state_dir: Path, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start ``python -m agent run`` subprocesses; killed at teardown.
    ``extra`` adds TOML lines to the config file (``tmp_path / "agent.toml"``),
    ``env`` adds environment variables; the log is ``tmp_path / "agent-<n>.log"``."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Any] = []
    config = tmp_path / "agent.toml"
    base = (
        f'agent_id = "{AGENT_ID}"\nstate_dir = "{state_dir}"\nbroker_port = {mosquitto.port}\n'
        'heartbeat_interval = 0.5\nresult_resend_after = 0.5\nlog_level = "DEBUG"\n'
        f'hub_public_keys = ["{HUB_KEY.public.to_text()}"]\n'
    )
    config.write_text(base)

    def spawn(extra: str = "", env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        if extra:
            config.write_text(base + extra)
        # Not the test runner's systemd notify socket either: only one a test passes.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(("OUTPOST_AGENT_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        env = {**inherited, **(env or {})}
        log = open(tmp_path / f"agent-{len(procs)}.log", "wb")  # noqa: SIM115 - closed at teardown
        logs.append(log)
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
    for log in logs:
        log.close()


class RunnerParts:
    """A :class:`agent.runner.Runner` on real queue files in ``state_dir``,
    driven by a test (tests/agent/test_runner.py, test_exec.py): the test
    puts assignments in the inbox and reads results from the outbox."""

    #: How long ``result`` waits by default.
    result_timeout = 5.0

    def __init__(self, state_dir: Path, clock: Any, registry: Any, command_allowlist: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.registry = registry
        self.command_allowlist = list(command_allowlist)
        self.inbox = Inbox(state_dir / "inbox.sqlite3")
        self.outbox = Outbox(state_dir / "outbox.sqlite3")
        self.hlc = HybridClock("dev-1", lambda: int(clock.now() * 1000))
        self.events: list[Any] = []
        self.announced: list[str] = []
        self.runners: list[Runner] = []

    def runner(self, start: bool = True, **options: Any) -> Runner:
        runner = Runner(
            self.inbox, self.outbox, self.registry, self.clock, self.hlc.now, self.state_dir / "work",
            {"agent_version": "0.1.0", "command_allowlist": self.command_allowlist, "state_dir": str(self.state_dir)},
            on_event=self.events.append, on_result=self.announced.append, **options,
        )
        if start:
            runner.start()
        self.runners.append(runner)
        return runner

    def put_assign(self, body: Assign) -> Assign:
        self.inbox.put(body)
        for runner in self.runners:
            runner.wake()
        return body

    def result(self, aid: str, timeout: float | None = None) -> Result:
        wait_until(lambda: self.outbox.has(aid), timeout or self.result_timeout, f"a result for {aid}")
        entry = self.outbox.get(aid)
        assert entry is not None
        return Result.from_dict(entry.data["result"])

    def close(self) -> None:
        for runner in self.runners:
            runner.stop(2)
        self.inbox.close()
        self.outbox.close()
