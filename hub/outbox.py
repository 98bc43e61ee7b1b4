"""The outbox publisher: sends committed outbox rows to MQTT.

Rows are written by the scheduler in the same transaction as the state
change they announce. This loop publishes them in id order with QoS 1, waits
for the broker's PUBACK, and only then stamps ``published_at``. A crash
between publish and stamp re-sends the row: the agent's inbox is keyed by
assignment id, so at-least-once delivery never runs a task twice.

Rows are written unsigned (by the scheduler, the API, ingestion: none of
them need the key) and signed here as they are published (``hub.hubkeys``):
recipient, issue time, expiry and, for assign and cancel, the device's next
sequence number. Sequence numbers come from the database (``agents.send_seq``),
reserved ``SEQ_BLOCK`` at a time per agent and process in a transaction of
their own, so numbers are never used twice, even by several hub processes
(a crash only leaves a gap, which devices accept), and the usual publish
writes nothing before it goes out: it never waits for the scheduler's write
transaction. Every publish of a row, a re-publish of one the broker did not
confirm too, is signed afresh with a new sequence number; the device
answers a copy of an assignment it holds as a duplicate. The publisher also keeps the hub's key announcement
retained on ``outpost/v1/hub/keys``, published again after every (re)connect
and whenever the key ring changed on disk.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import case, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from hub import hubkeys
from hub.db import transaction
from hub.errors import AgentNotFound
from hub.models import Assignment, OutboxMessage
from shared.clock import Clock, utcnow
from shared.envelope import Envelope, decode
from shared.errors import OutpostError
from shared.hlc import HybridClock
from shared.messages import Assign, Cancel
from shared.mqtt import MqttLink
from shared.topics import HUB_KEYS_TOPIC, parse

log = logging.getLogger(__name__)

#: Sequence numbers a publisher reserves per agent at a time (far below any
#: device's replay window, so numbers used out of order by several hub
#: processes are all still accepted).
SEQ_BLOCK = 64


@dataclass
class OutboxPublisher:
    sessions: sessionmaker[Session]
    link: MqttLink
    clock: Clock
    batch_size: int = 500
    puback_timeout: float = 10.0
    #: Published rows are kept this long for inspection, then deleted.
    keep_published: float = 3600.0
    #: Signs every row before it is published (signing is not optional: an
    #: agent refuses anything unsigned).
    keyring: hubkeys.LiveRing | None = None
    #: Lifetime of a signed message (the envelope's ``exp`` = issue time + this).
    message_ttl: float = hubkeys.DEFAULT_TTL
    max_message_bytes: int = 256 * 1024
    hlc: HybridClock | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _announced: tuple[int, bool] | None = None
    #: Sequence numbers reserved for this process, per agent: (next, last).
    _seqs: dict[str, tuple[int, int]] = field(default_factory=dict)

    def wake(self) -> None:
        self._wake.set()

    def run_forever(self, stop: threading.Event, idle_wait: float = 1.0) -> None:
        cleaned = 0
        while not stop.is_set():
            if not self.link.connected.is_set():
                self.link.connected.wait(idle_wait)
                continue
            try:
                sent = self.flush_once()
                cleaned += sent
                if cleaned >= 10_000:
                    self.prune()
                    cleaned = 0
            except Exception:
                log.exception("outbox publish failed; retrying")
                sent = 0
            if not sent:
                self._wake.wait(idle_wait)
                self._wake.clear()

    def flush(self) -> None:
        """Publish until no unpublished row is left (tests, shutdown)."""
        while self.flush_once():
            pass

    def flush_once(self) -> int:
        """Publish one batch; returns how many rows the broker confirmed.

        No transaction is held while waiting for PUBACKs, so ingestion and
        the scheduler keep writing meanwhile. Two hub processes may then
        both send a row now and then; the receiving inbox deduplicates."""
        self.announce_keys()
        with self.sessions() as session:
            stmt = select(OutboxMessage.id, OutboxMessage.topic, OutboxMessage.payload, OutboxMessage.qos, OutboxMessage.retain, OutboxMessage.assignment_id)
            rows = session.execute(stmt.where(OutboxMessage.published_at.is_(None)).order_by(OutboxMessage.id).limit(self.batch_size)).all()
        if not rows:
            return 0
        payloads = self._sign(rows)
        rows = [row for row in rows if row.id in payloads]
        if not rows:
            return 0
        infos = [(row, self.link.publish(row.topic, payloads[row.id], qos=row.qos, retain=row.retain)) for row in rows]
        confirmed = []
        for row, info in infos:
            try:
                info.wait_for_publish(self.puback_timeout)
            except (RuntimeError, ValueError):
                pass
            if info.is_published():
                confirmed.append(row)
        with transaction(self.sessions) as session:
            now = utcnow(self.clock)
            # Plain UPDATEs on the tables: loading the rows as ORM objects, or
            # ORM-enabled updates (which also search the identity map), cost
            # more than the rest of the step.
            outbox, assignments = OutboxMessage.__table__.c, Assignment.__table__.c
            session.execute(update(OutboxMessage.__table__).where(outbox.id.in_([r.id for r in rows])).values(attempts=outbox.attempts + 1))
            if confirmed:
                session.execute(update(OutboxMessage.__table__).where(outbox.id.in_([r.id for r in confirmed])).values(published_at=now))
            sent_ids = [row.assignment_id for row in confirmed if row.assignment_id]
            if sent_ids:
                # Conditional: ingestion may have moved an assignment on
                # (accepted, finished) since it was read; never move it back.
                session.execute(
                    update(Assignment.__table__)
                    .where(assignments.id.in_(sent_ids))
                    .values(send_count=assignments.send_count + 1, last_sent_at=now, state=case((assignments.state == "pending", "sent"), else_=assignments.state))
                )
        if len(confirmed) < len(rows):
            log.warning("outbox: %d of %d messages not confirmed by the broker; will retry", len(rows) - len(confirmed), len(rows))
        return len(confirmed)

    def _sign(self, rows: list) -> dict[int, bytes]:  # type: ignore[type-arg]
        """Each row's signed payload by id, signed now, in memory. A row that
        cannot be signed is dropped (logged); one for an agent that is not
        registered yet waits."""
        payloads = {row.id: row.payload for row in rows if b"\n" in row.payload}
        unsigned = [row for row in rows if row.id not in payloads]
        if not unsigned:
            return payloads
        if self.keyring is None:
            raise RuntimeError("the outbox publisher has no key ring: it cannot sign messages to devices")
        ready: list[tuple[int, str, Envelope]] = []
        broken: list[int] = []
        for row in unsigned:
            try:
                ready.append((row.id, parse(row.topic).agent_id, decode(row.payload, self.max_message_bytes)))
            except (ValueError, OutpostError) as exc:
                log.error("outbox: message %d on %s cannot be signed and is dropped: %s", row.id, row.topic, exc)
                broken.append(row.id)
        wanted = Counter(agent_id for _id, agent_id, env in ready if isinstance(env.body, Assign | Cancel))
        missing = self._reserve(wanted, broken)
        now = self.clock.now()
        for row_id, agent_id, envelope in ready:
            if agent_id in missing:
                continue
            seq = self._next_seq(agent_id) if isinstance(envelope.body, Assign | Cancel) else None
            payloads[row_id] = hubkeys.resign(self.keyring, envelope, agent_id, now, ttl=self.message_ttl, seq=seq, limit=self.max_message_bytes)
        return payloads

    def _reserve(self, wanted: Counter[str], broken: list[int]) -> set[str]:
        """Make sure each agent in ``wanted`` has that many sequence numbers
        reserved; returns the agents that are not registered (their work
        waits). One transaction, and only when a block ran out: the common
        publish writes nothing before it goes out, so it never waits for the
        scheduler's write transaction."""
        short = {a: n for a, n in wanted.items() if self._seq_left(a) < n}
        missing: set[str] = set()
        if not short and not broken:
            return missing
        with transaction(self.sessions) as session:
            if broken:
                table = OutboxMessage.__table__.c
                session.execute(update(OutboxMessage.__table__).where(table.id.in_(broken)).values(published_at=utcnow(self.clock)))
            for agent_id, n in short.items():
                size = max(SEQ_BLOCK, n)
                try:
                    last = hubkeys.reserve_send_seqs(session, agent_id, size)
                except AgentNotFound:
                    # Work for a device the hub has never heard of (a pinned
                    # target not yet registered): kept until it is.
                    log.warning("outbox: messages for %s wait: no such agent is registered yet", agent_id)
                    missing.add(agent_id)
                    continue
                self._seqs[agent_id] = (last - size + 1, last)
        return missing

    def _seq_left(self, agent_id: str) -> int:
        first, last = self._seqs.get(agent_id, (1, 0))
        return last - first + 1

    def _next_seq(self, agent_id: str) -> int:
        first, last = self._seqs[agent_id]
        self._seqs[agent_id] = (first + 1, last)
        return first

    def announce_keys(self, force: bool = False) -> bool:
        """Publish the key announcement (retained) when it was not yet on
        this connection or the ring changed on disk. True when published."""
        if self.keyring is None or self.hlc is None:
            return False
        ring = self.keyring.ring()
        state = (self.keyring.generation, self.link.connected.is_set())
        if not force and state == self._announced:
            return False
        frame = hubkeys.announcement(ring, self.keyring.folder, self.hlc.now(), self.clock.now(), self.max_message_bytes)
        self.link.publish(HUB_KEYS_TOPIC, frame, qos=1, retain=True)
        self._announced = state
        return True

    def prune(self) -> None:
        cutoff = utcnow(self.clock) - timedelta(seconds=self.keep_published)
        with transaction(self.sessions) as session:
            session.execute(delete(OutboxMessage).where(OutboxMessage.published_at < cutoff))
