"""A hub assembled in-process on a real SQLite file, driven tick by tick
with a manual clock. The MQTT side is a recorder here (what would be
published); the real broker path is covered in tests/e2e."""

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
from hub.ingest import Ingester
from hub.models import OutboxMessage, TaskInstance
from hub.scheduler import Scheduler, trigger_run
from shared.clock import ManualClock, utcnow
from shared.envelope import Envelope, decode, encode
from shared.hlc import HybridClock
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
    agent_clocks: dict[str, HybridClock] = field(default_factory=dict)

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
        clock = self.agent_clocks.setdefault(agent_id, HybridClock(agent_id, lambda: int(self.clock.now() * 1000)))
        payload = encode(Envelope(body, sender=sender or agent_id, hlc=clock.now()))
        self.send_raw(topic or events_topic(agent_id), payload)

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
        return [decode(r.payload) for r in rows]

    def acks(self) -> list[Envelope]:
        return [decode(p) for t, p in self.link.published if t.endswith("/ack")]


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
        ingester = Ingester(sessions, link, manual_clock, hlc, events)  # type: ignore[arg-type]
        scheduler.parse_dags(utcnow(manual_clock), force=True)
        return HubHarness(sessions, manual_clock, scheduler, ingester, executor, link, queue)

    yield build
    for engine in engines:
        engine.dispose()


__all__ = ["HubHarness", "fleet"]
