"""A hub assembled in-process on a real SQLite file, driven tick by tick
with a manual clock. The MQTT side is a recorder here (what would be
published); the real broker path is covered in tests/e2e.

Messages are signed as on the wire: ``HubHarness.send`` signs as the agent,
registering a test key for it on first use (``agent_keys``); ``send_raw``
sends bytes as they are, so unsigned input is refused like any other bad
input. The hub signs with a key ring in the test's folder (``keyring``)."""

from __future__ import annotations

import secrets
import threading
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hub import fleet
from hub.dagprocessor import SerializedDagBag
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.dispatcher import Dispatcher
from hub.events import EventBus
from hub.executor import LocalExecutor
from hub.hubkeys import LiveRing
from hub.identity import register_agent
from hub.ingest import Ingester
from hub.outbox import OutboxPublisher
from hub.security import Throttle
from hub.models import OutboxMessage, TaskInstance
from hub.scheduler import Scheduler, trigger_run
from shared.clock import ManualClock, utcnow
from shared.envelope import Envelope, decode
from shared.frames import AGENT_TO_HUB, HUB_TO_AGENT, open_frame, seal, sign_envelope, unsigned_part
from shared.hlc import HybridClock
from shared.signing import SigningKey
from shared.messages import JobTypeInfo, Message, Status
from shared.mqtt import Inbound
from shared.topics import events_topic, status_topic


@dataclass
class _Info:
    def wait_for_publish(self, timeout: float | None = None) -> None:
        return None

    def is_published(self) -> bool:
        return True


@dataclass
class RecordingLink:
    published: list[tuple[str, bytes]] = field(default_factory=list)
    connected: threading.Event = field(default_factory=threading.Event)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> _Info:
        self.published.append((topic, payload))
        return _Info()


@dataclass
class HubHarness:
    sessions: sessionmaker[Session]
    clock: ManualClock
    scheduler: Scheduler
    ingester: Ingester
    executor: LocalExecutor
    link: RecordingLink
    hub_queue: list[int]
    keyring: LiveRing
    agent_clocks: dict[str, HybridClock] = field(default_factory=dict)
    #: The test agents' device keys (registered with the hub on first send).
    agent_keys: dict[str, SigningKey] = field(default_factory=dict)
    _publisher: OutboxPublisher | None = None

    def agent_key(self, agent_id: str) -> SigningKey:
        """``agent_id``'s device key, registered with the hub on first use."""
        if agent_id not in self.agent_keys:
            key = SigningKey.generate()
            with transaction(self.sessions) as session:
                register_agent(session, agent_id, key.public, utcnow(self.clock), replace=True)
            self.agent_keys[agent_id] = key
        return self.agent_keys[agent_id]

    def use_key(self, agent_id: str, key: SigningKey) -> None:
        """Register ``key`` as ``agent_id``'s device key (replacing any)."""
        with transaction(self.sessions) as session:
            register_agent(session, agent_id, key.public, utcnow(self.clock), replace=True)
        self.agent_keys[agent_id] = key

    def publisher(self) -> OutboxPublisher:
        """The hub's outbox publisher on the recording link, signing with the harness's ring."""
        if self._publisher is None:
            self._publisher = OutboxPublisher(self.sessions, self.link, self.clock, keyring=self.keyring)  # type: ignore[arg-type]
        return self._publisher

    def open(self, payload: bytes) -> Envelope:
        """Verify a frame the hub published with its ring and decode it."""
        return open_frame(payload, HUB_TO_AGENT, {k.kid: k for k in self.keyring.ring().public_keys()}.get)

    def tick(self, rounds: int = 5) -> None:
        """Let the scheduler and the hub-task executor settle."""
        for _ in range(rounds):
            self.scheduler.tick()
            while self.hub_queue:
                self.executor.run_inline(self.hub_queue.pop(0))
            self.executor.run_callbacks_inline()

    def agent_online(self, agent_id: str, job_types: tuple[str, ...] = ("noop", "diagnostics.collect"), **labels: str) -> None:
        self.send(agent_id, Status("online", "0.1.0", agent_id, labels, tuple(JobTypeInfo(j, "1.0") for j in job_types)), topic=status_topic(agent_id))

    def send(self, agent_id: str, body: Message, topic: str | None = None, sender: str | None = None) -> None:
        self.send_raw(topic or events_topic(agent_id), self.frame(agent_id, body, sender))

    def sign(self, envelope: Envelope, agent_id: str | None = None) -> bytes:
        """``envelope`` signed with ``agent_id``'s key (default: its sender's)."""
        return sign_envelope(envelope, self.agent_key(agent_id or envelope.sender), AGENT_TO_HUB)

    def sign_raw(self, agent_id: str, data: bytes) -> bytes:
        """Any bytes (malformed JSON too) signed with ``agent_id``'s key."""
        return seal(data, self.agent_key(agent_id), AGENT_TO_HUB)

    def frame(self, agent_id: str, body: Message, sender: str | None = None) -> bytes:
        """``body`` from ``agent_id`` as a signed frame (as its agent would send it)."""
        clock = self.agent_clocks.setdefault(agent_id, HybridClock(agent_id, lambda: int(self.clock.now() * 1000)))
        envelope = Envelope(body, sender=sender or agent_id, hlc=clock.now(), issued_at=self.clock.now())
        return sign_envelope(envelope, self.agent_key(agent_id), AGENT_TO_HUB)

    def send_raw(self, topic: str, payload: bytes) -> None:
        self.ingester.process([Inbound(topic, payload, 1, False, 1)])

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> int:
        with transaction(self.sessions) as session:
            return trigger_run(session, dag_id, conf or {}, utcnow(self.clock)).id

    def tis(self, run_pk: int) -> list[TaskInstance]:
        with self.sessions() as session:
            return list(session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run_pk).order_by(TaskInstance.task_id, TaskInstance.map_index)))

    def assignments_sent(self) -> list[Envelope]:
        """Assign envelopes written to the outbox, oldest first."""
        with self.sessions() as session:
            rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
        return [decode(unsigned_part(r.payload)) for r in rows]

    def acks(self) -> list[Envelope]:
        return [self.open(p) for t, p in self.link.published if t.endswith("/ack")]


@contextmanager
def fresh_pg_database(prefix: str = "outpost_test") -> Iterator[str]:
    """A new PostgreSQL database, dropped afterwards. No server is a failure."""
    import psycopg

    name = f"{prefix}_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at 127.0.0.1:5432 as user postgres ({exc})")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_db_url() -> Iterator[str]:
    with fresh_pg_database() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The scheduler and ingestion contract runs on both stores: SQLite (the
    embedded default) and PostgreSQL (production); a fresh database per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.db'}"
    else:
        with fresh_pg_database("outpost_sched") as url:
            yield url


@pytest.fixture
def make_hub(tmp_path: Path, manual_clock: ManualClock, hub_db_url: str) -> Iterator[Any]:
    engines = []

    def build(dags: dict[str, str], **scheduler_options: Any) -> HubHarness:
        folder = tmp_path / "dags"
        folder.mkdir(exist_ok=True)
        for name, text in dags.items():
            (folder / name).write_text(text)
        url = hub_db_url
        upgrade(url)
        engine = make_engine(url)
        engines.append(engine)
        sessions = make_sessionmaker(engine)
        events = EventBus()
        hlc = HybridClock("hub", lambda: int(manual_clock.now() * 1000))
        bag = SerializedDagBag(folder)  # parsed in another process, as in the hub
        queue: list[int] = []
        executor = LocalExecutor(sessions, manual_clock, events)
        link = RecordingLink()
        scheduler = Scheduler(sessions, bag, Dispatcher(hlc, 256 * 1024), manual_clock, events, queue.append, **scheduler_options)
        keyring = LiveRing(tmp_path / "hub-keys")
        # Every security event recorded: tests count them.
        ingester = Ingester(sessions, link, manual_clock, hlc, events, keyring=keyring, security_throttle=Throttle(every=0))  # type: ignore[arg-type]
        scheduler.parse_dags(utcnow(manual_clock), force=True)
        return HubHarness(sessions, manual_clock, scheduler, ingester, executor, link, queue, keyring)

    yield build
    for engine in engines:
        engine.dispose()


__all__ = ["HubHarness", "fleet"]
