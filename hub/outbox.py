"""The outbox publisher: sends committed outbox rows to MQTT.

Rows are written by the scheduler in the same transaction as the state
change they announce. This loop publishes them in id order with QoS 1, waits
for the broker's PUBACK, and only then stamps ``published_at``. A crash
between publish and stamp re-sends the row: the agent's inbox is keyed by
assignment id, so at-least-once delivery never runs a task twice.

Rows are written unsigned (by the scheduler, the API, ingestion: none of
them need the key). Before its first publish each row is signed here
(``hub.hubkeys``): recipient, issue time, expiry and, for assign and cancel,
the device's next sequence number (``hub.identity.next_send_seq``), reserved
in the transaction that stores the signed bytes in the row. A re-publish of
that row sends the same bytes (the agent answers it as a duplicate); a
redelivery writes a new row and so goes out freshly signed with a new
sequence number. The publisher also keeps the hub's key announcement
retained on ``outpost/v1/hub/keys``, published again after every (re)connect
and whenever the key ring changed on disk.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import case, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from hub import hubkeys
from hub.db import transaction
from hub.errors import AgentNotFound
from hub.identity import next_send_seq
from hub.models import Assignment, OutboxMessage
from shared.clock import Clock, utcnow
from shared.envelope import decode
from shared.errors import OutpostError
from shared.hlc import HybridClock
from shared.messages import Assign, Cancel
from shared.mqtt import MqttLink
from shared.topics import HUB_KEYS_TOPIC, parse

log = logging.getLogger(__name__)


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
        """Each row's signed payload by id; unsigned rows are signed (and
        stored) first. A row that cannot be signed is dropped, logged."""
        payloads = {row.id: row.payload for row in rows if b"\n" in row.payload}
        unsigned = [row for row in rows if row.id not in payloads]
        if not unsigned:
            return payloads
        if self.keyring is None:
            raise RuntimeError("the outbox publisher has no key ring: it cannot sign messages to devices")
        table = OutboxMessage.__table__.c
        with transaction(self.sessions) as session:
            now = self.clock.now()
            for row in unsigned:
                try:
                    agent_id = parse(row.topic).agent_id
                    envelope = decode(row.payload, self.max_message_bytes)
                    seq = next_send_seq(session, agent_id) if isinstance(envelope.body, Assign | Cancel) else None
                    payload = hubkeys.resign(self.keyring, envelope, agent_id, now, ttl=self.message_ttl, seq=seq, limit=self.max_message_bytes)
                except AgentNotFound:
                    # Work for a device the hub has never heard of (a pinned
                    # target not yet registered): kept until it is.
                    log.warning("outbox: message %d waits: no agent %s is registered yet", row.id, row.topic.split("/")[3])
                    continue
                except (ValueError, OutpostError) as exc:
                    log.error("outbox: message %d on %s cannot be signed and is dropped: %s", row.id, row.topic, exc)
                    session.execute(update(OutboxMessage.__table__).where(table.id == row.id).values(published_at=utcnow(self.clock)))
                    continue
                session.execute(update(OutboxMessage.__table__).where(table.id == row.id).values(payload=payload))
                payloads[row.id] = payload
        return payloads

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
