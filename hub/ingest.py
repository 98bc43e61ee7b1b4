"""Event ingestion: what agents report, applied to the metadata DB.

The MQTT callback only queues messages (``MqttLink.inbound``). This worker
takes them in batches, decodes and checks each, applies the batch in one
transaction (one savepoint per message, so one bad message never spoils the
others), commits, and only then sends result acknowledgements and PUBACKs.
A crash before the commit leaves every message un-acknowledged at the
broker, which redelivers them; results are unique on (task instance, try,
agent), so a redelivered result is recognised, acknowledged again and not
applied twice. The HTTP bulk sync route (``hub.api.routes.sync``) applies
an agent's outbox batches through the same :meth:`Ingester.apply`.

An ``agent_event`` (a device reporting a condition such as ``battery_low``)
becomes an asset event on ``agent-event://<name>``, once per device and
event id, and is acknowledged by id (``Ack.event_ids``). A ``log`` chunk
is stored once per (assignment, seq) by :mod:`hub.tasklogs` and acknowledged
as ``<assignment id>/<seq>`` (``Ack.log_ids``); ``progress`` updates the
running try and is never acknowledged (best effort).

Every message is a signed frame (``shared.frames``): before anything is
parsed, it is checked against the public key registered for the agent named
by the topic (``hub.identity.device_key``). An unknown or revoked agent, a
bad signature or a signed envelope naming another sender is not applied and
is recorded in ``security_events`` (``hub.security``), never acknowledged
(an ack or refusal would let a forger make the real device drop its work).
So are the security refusals devices report (``rejected`` events with a
``security.<code>`` code, source ``agent``). Acknowledgements sent to
devices are signed with the hub's current key (``hub.hubkeys``).

A replayed heartbeat or ``online`` status (stamped no later than the newest
one applied, ``hub.fleet.replay_of``) would fake liveness: it is not applied,
does not count as hearing from the agent, and is recorded as the security
event ``replayed``. Everything else a device sends is idempotent (results
unique per assignment, events per id, log chunks per seq), so a replay of it
changes nothing.

Bad input (undecodable, oversized, unknown type, a result for an assignment
the hub never made) is logged, counted and stored in ``rejected_messages``;
it never stops the worker.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from hub import asset_events, fleet, offline, reconcile, security, tasklogs
from hub import events as ev
from hub import identity as device_identity
from hub.assets import agent_event_uri
from hub.db import for_update, transaction
from hub.dispatcher import Dispatcher
from hub.events import EventBus
from hub.hubkeys import DEFAULT_TTL, LiveRing, sign_for
from hub.lifecycle import CALLBACKS_FLAG, finish_try, task_callback
from hub.models import AssetEvent, Assignment, DagRun, RejectedMessage, SecurityEvent, TaskInstance, TaskResult
from shared.clock import Clock, to_datetime, utcnow
from shared.envelope import Envelope, decode
from shared.errors import ClockSkew, OutpostError, ProtocolError
from shared.frames import AGENT_TO_HUB, unsigned_part, verify_frame
from shared.signing import PublicKey, SignatureError
from shared.hlc import HLC, HybridClock
from shared.messages import AGENT_EVENT_NAME_RE, MAX_AGENT_EVENT_PAYLOAD_BYTES, Accepted, Ack, AgentEvent, Heartbeat, LogChunk, Progress, Rejected, Result, Started, Status
from shared.mqtt import Inbound, MqttLink
from shared.states import FINISHED, TaskState
from shared.topics import ack_topic, parse

log = logging.getLogger(__name__)


#: Agent refusal codes that end the try: the device will not run it.
FINAL_REFUSALS = frozenset({"deadline_passed"})
#: Why a result can never be applied, whenever it is sent: answered in the
#: ack's ``refused_ids`` so the agent sets it aside. Not a race with the
#: hub's own commit: an assignment is committed before it is published, so
#: a result for it cannot arrive before it is visible. Errors that a hub
#: upgrade or a setting could cure (version, size, apply_error) are not here.
FINAL_RESULT_REFUSALS = frozenset({"unknown_assignment", "foreign_assignment", "invalid_message"})


class Reject(OutpostError):
    """A message that decoded but cannot be applied."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Batch:
    acks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: Agent events applied (or refused for good), acknowledged by event id.
    event_acks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: Log chunks stored (or refused for good), acknowledged as "<assignment id>/<seq>".
    log_acks: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    rejections: list[RejectedMessage] = field(default_factory=list)
    #: Security events to record with the batch.
    security: list[SecurityEvent] = field(default_factory=list)
    emitted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The messages refused, with their rejection (or security event) records.
    refused: list[tuple[Inbound, RejectedMessage | SecurityEvent]] = field(default_factory=list)
    #: Results refused for good (FINAL_RESULT_REFUSALS), per agent: the MQTT ack says so.
    refusals: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    #: Where the messages came from, as stored in ``rejected_messages.source``.
    source: str = "mqtt"

    def merge(self, other: _Batch) -> None:
        for agent_id, ids in other.acks.items():
            self.acks[agent_id].extend(ids)
        for agent_id, ids in other.event_acks.items():
            self.event_acks[agent_id].extend(ids)
        for agent_id, ids in other.log_acks.items():
            self.log_acks[agent_id].extend(ids)
        self.rejections.extend(other.rejections)
        self.security.extend(other.security)
        self.emitted.extend(other.emitted)
        self.refused.extend(other.refused)
        for agent_id, ids in other.refusals.items():
            self.refusals[agent_id].extend(ids)


@dataclass
class Ingester:
    sessions: sessionmaker[Session]
    link: MqttLink
    clock: Clock
    hlc: HybridClock
    events: EventBus
    max_message_bytes: int = 256 * 1024
    batch_size: int = 500
    counters: Counter[str] = field(default_factory=Counter)
    #: Seconds a device clock may be off before the agent is flagged (hub.fleet).
    max_clock_skew: float = 300.0
    #: Agents flagged for clock skew: their stamps do not move the hub's
    #: clock. None until read from the DB (at the first batch).
    untrusted_clocks: set[str] | None = None
    #: Signs the acknowledgements; required to publish them (the HTTP sync
    #: route's ingester answers in HTTP and publishes nothing).
    keyring: LiveRing | None = None
    #: Lifetime of a signed ack (seconds).
    message_ttl: float = DEFAULT_TTL
    #: At most one security event record per (agent, source, code) this often.
    security_throttle: security.Throttle = field(default_factory=security.Throttle)
    #: An oversize inventory comes with every heartbeat: recorded once per agent per 10 minutes.
    inventory_throttle: security.Throttle = field(default_factory=lambda: security.Throttle(every=600.0))

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                first = self.link.inbound.get(timeout=0.5)
            except queue.Empty:
                continue
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self.link.inbound.get_nowait())
                except queue.Empty:
                    break
            self._process_with_retry(batch, stop)

    def _process_with_retry(self, batch: list[Inbound], stop: threading.Event) -> None:
        if not self._retry_while_db_down(lambda: self.process(batch), stop):
            # Something in the batch breaks every attempt: apply its messages
            # one by one so a single poison message holds up nothing else.
            for msg in batch:
                if not self._retry_while_db_down(lambda m=msg: self.process([m]), stop):  # type: ignore[misc]
                    self._set_aside(msg)

    def _retry_while_db_down(self, attempt: Callable[[], None], stop: threading.Event) -> bool:
        """Run ``attempt``, retrying while the DB is unreachable or locked
        (nothing was acknowledged, so holding the messages loses nothing).
        False if it failed for any other reason."""
        delay = 0.2
        while not stop.is_set():
            try:
                attempt()
                return True
            except OperationalError:
                log.exception("ingest: database error; retrying in %.1fs", delay)
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
            except Exception:
                log.exception("ingest: processing failed")
                return False
        return True  # stopping: the broker redelivers what was not acknowledged

    def _set_aside(self, msg: Inbound) -> None:
        """A message that cannot be processed at all: recorded (if even that
        works), counted, and acknowledged so it is not redelivered forever."""
        self.counters["rejected.unprocessable"] += 1
        try:
            with transaction(self.sessions) as session:
                session.add(_rejection(msg.topic, None, "unprocessable", "the message failed every attempt to apply it; see the hub log", msg.payload, utcnow(self.clock)))
        except Exception:
            log.exception("ingest: could not even record the unprocessable message on %s", msg.topic)
        msg.ack()

    def process(self, batch: list[Inbound]) -> None:
        """Apply a batch of inbound messages, then acknowledge them."""
        out = self.apply(batch)
        self._send_acks(out.acks, out.event_acks, out.log_acks, out.refusals)
        for msg in batch:
            msg.ack()
        self.announce(out)

    def apply(self, batch: list[Inbound], *, source: str = "mqtt", in_transaction: Callable[[Session], None] | None = None) -> _Batch:
        """Decode, check and apply ``batch`` in order in one transaction and
        commit; returns what to acknowledge (``acks``, ``event_acks`` per
        agent) and what was refused. Acknowledges nothing itself: the MQTT
        path publishes acks (``process``), the HTTP sync route answers them.
        ``in_transaction`` runs last inside the same transaction (the HTTP
        sync cursor commits with the items it covers)."""
        if self.untrusted_clocks is None:
            with self.sessions() as session:
                self.untrusted_clocks = fleet.flagged_clocks(session)
        out = _Batch(source=source)
        decoded: list[tuple[Inbound, str, Envelope]] = []
        keys = self._device_keys(batch)
        for msg in batch:
            item = self._decode(msg, out, keys)
            if item is not None:
                decoded.append(item)
        with transaction(self.sessions) as session:
            now = utcnow(self.clock)
            try:
                # The fast path: the whole batch in one savepoint.
                attempt = _Batch(source=source)
                with session.begin_nested():
                    self._apply_all(session, decoded, now, attempt)
                out.merge(attempt)
            except OperationalError:
                raise
            except Exception:
                # Something in the batch failed (another hub process applied
                # a result first, or a bug): redo it one message at a time so
                # only the culprit is set aside.
                for item in decoded:
                    self._apply_one_isolated(session, item, now, out)
            for record in out.rejections:
                record.received_at = now
                session.add(record)
            for event in out.security:
                event.at = now
                session.add(event)
            if session.info.pop(CALLBACKS_FLAG, False):
                out.emitted.append((ev.CALLBACKS_REQUESTED, {}))  # the workers run them now, not at their next poll
            if in_transaction is not None:
                in_transaction(session)
        return out

    def announce(self, out: _Batch) -> None:
        """Tell the rest of the hub what a committed batch changed."""
        for name, data in out.emitted:
            self.events.emit(name, **data)
        for record in out.rejections:
            self.events.emit(ev.MESSAGE_REJECTED, code=record.code, agent_id=record.agent_id)
        for event in out.security:
            self.events.emit(ev.SECURITY_EVENT, code=event.code, agent_id=event.agent_id, source=event.source)

    def _apply_one_isolated(self, session: Session, item: tuple[Inbound, str, Envelope], now: datetime, out: _Batch) -> None:
        msg, agent_id, envelope = item
        attempt = _Batch(source=out.source)
        try:
            with session.begin_nested():
                self._apply_all(session, [item], now, attempt)
            out.merge(attempt)
        except IntegrityError:
            if isinstance(envelope.body, Result):
                self.counters["result.duplicate"] += 1
                out.acks[agent_id].append(envelope.body.assignment_id)
            elif isinstance(envelope.body, AgentEvent):  # another hub process applied it first
                self.counters["agent_event.duplicate"] += 1
                out.event_acks[agent_id].append(envelope.body.event_id)
            elif isinstance(envelope.body, LogChunk):  # another hub process stored it first
                self.counters["log.duplicate"] += 1
                out.log_acks[agent_id].append(f"{envelope.body.assignment_id}/{envelope.body.seq}")
        except OperationalError:
            raise
        except Exception as exc:  # a bug must cost one message, not the worker
            log.exception("ingest: applying %s from %s failed", envelope.type, agent_id)
            self._reject(out, msg, agent_id, "apply_error", f"{type(exc).__name__}: {exc}")

    def _apply_all(self, session: Session, items: list[tuple[Inbound, str, Envelope]], now: datetime, out: _Batch) -> None:
        # Load every row the batch touches with three queries, not three per message.
        ids = {env.body.assignment_id for _m, _a, env in items if isinstance(env.body, Accepted | Started | Result | Rejected | Progress | LogChunk) and env.body.assignment_id}
        # Row locks (PostgreSQL): another hub process may be applying this
        # agent's other events right now; without them a late "accepted"
        # could overwrite a committed "success".
        assignments = {a.id: a for a in session.scalars(for_update(select(Assignment).where(Assignment.id.in_(ids)).order_by(Assignment.id), session))} if ids else {}
        ti_ids = {a.ti_id for a in assignments.values()}
        tis = {t.id: t for t in session.scalars(for_update(select(TaskInstance).where(TaskInstance.id.in_(ti_ids)).order_by(TaskInstance.id), session))} if ti_ids else {}
        known = set(session.scalars(select(TaskResult.assignment_id).where(TaskResult.assignment_id.in_(ids)))) if ids else set()
        # Held until the batch is applied: the session's identity map is weak,
        # and finish_try looks each result's run up by key, which otherwise
        # costs a SELECT and an autoflush per result.
        runs = list(session.scalars(select(DagRun).where(DagRun.id.in_({t.run_pk for t in tis.values()})))) if tis else []
        seen: set[str] = set()
        fresh: dict[str, tuple[HLC, fleet.ClockReading]] = {}
        for msg, agent_id, envelope in items:
            replay = fleet.replay_of(session, agent_id, envelope)
            if replay is not None:
                if msg.retain:
                    # The broker's retained status, delivered again on (re)subscribe: old news, not an attack.
                    self.counters["status.retained_stale"] += 1
                else:
                    self._security(out, msg, agent_id, "replayed", replay)
                continue  # proves nothing: no last_seen, no clock reading
            try:
                self._apply(session, agent_id, envelope, now, out, assignments, tis, known)
            except Reject as exc:
                self._reject(out, msg, agent_id, exc.code, str(exc))
                if exc.code in FINAL_RESULT_REFUSALS and isinstance(envelope.body, Result):
                    out.refusals[agent_id].append(envelope.body.assignment_id)
            seen.add(agent_id)
            # Stamped when sent (a will or a retained status is older news).
            if not msg.retain and (isinstance(envelope.body, Heartbeat) or (isinstance(envelope.body, Status) and envelope.body.state == "online")):
                if agent_id not in fresh or envelope.hlc > fresh[agent_id][0]:
                    fresh[agent_id] = (envelope.hlc, fleet.ClockReading.of(envelope))
        if seen:
            fleet.touch(session, seen, now)
        if fresh:
            self._observe_clocks(session, fresh, now, out)
        session.flush()
        del runs

    # --- decoding ----------------------------------------------------------

    def _device_keys(self, batch: list[Inbound]) -> dict[str, device_identity.DeviceKey]:
        """The registered key (or standing) of every agent the batch's topics name."""
        ids = set()
        for msg in batch:
            try:
                ids.add(parse(msg.topic).agent_id)
            except ValueError:
                continue
        if not ids:
            return {}
        with self.sessions() as session:
            return {agent_id: device_identity.device_key(session, agent_id) for agent_id in ids}

    def _verify(self, msg: Inbound, agent_id: str, out: _Batch, keys: dict[str, device_identity.DeviceKey]) -> bytes | None:
        """The signed JSON of ``msg`` if it verifies with ``agent_id``'s key; else None (recorded)."""
        device = keys.get(agent_id)
        if device is None or device.key is None:
            standing = device.standing if device is not None else "unknown"
            code = "revoked_agent" if standing == "revoked" else "unknown_agent"
            why = "was revoked" if standing == "revoked" else "is not registered (no public key; pre-register it: outpost-hub agents register)"
            self._security(out, msg, agent_id, code, f"agent {agent_id!r} {why}; its message is not applied")
            return None
        key: PublicKey = device.key

        try:
            data, _kid = verify_frame(msg.payload, AGENT_TO_HUB, lambda kid: key if kid == key.kid else None, self.max_message_bytes)
        except SignatureError as exc:
            self._security(out, msg, agent_id, exc.code, f"{exc} (agent {agent_id!r}, registered key {key.kid})")
            return None
        return data

    def _security(self, out: _Batch, msg: Inbound, agent_id: str | None, code: str, detail: str) -> None:
        self.counters[f"security.{code}"] += 1
        record = security.event(utcnow(self.clock), agent_id, out.source, code, detail, unsigned_part(msg.payload))
        out.refused.append((msg, record))
        if self.security_throttle.allow(agent_id or "", out.source, code):
            log.warning("SECURITY: %s on %s (%s): %s", code, msg.topic, out.source, detail)
            out.security.append(record)

    def _decode(self, msg: Inbound, out: _Batch, keys: dict[str, device_identity.DeviceKey]) -> tuple[Inbound, str, Envelope] | None:
        try:
            topic = parse(msg.topic)
        except ValueError as exc:
            self._reject(out, msg, None, "bad_topic", str(exc))
            return None
        if topic.kind not in ("events", "status"):
            self._reject(out, msg, topic.agent_id, "bad_topic", f"hub does not consume {topic.kind!r} topics")
            return None
        if topic.kind == "status" and not msg.payload:
            return None  # a cleared retained status: nothing to apply
        if len(msg.payload) > self.max_message_bytes:
            self._reject(out, msg, topic.agent_id, "payload_too_large", f"payload of {len(msg.payload)} bytes exceeds the limit of {self.max_message_bytes}")
            return None
        data = self._verify(msg, topic.agent_id, out, keys)
        if data is None:
            return None
        try:
            envelope = decode(data, self.max_message_bytes)
        except ProtocolError as exc:
            self._reject(out, msg, topic.agent_id, exc.code, str(exc))
            if exc.code in FINAL_RESULT_REFUSALS:
                malformed = _malformed_result_id(data, topic.agent_id)
                if malformed is not None:
                    out.refusals[topic.agent_id].append(malformed)
            return None
        if envelope.sender != topic.agent_id:
            # Signed with this agent's key, yet naming another sender: a device bug or a forgery attempt.
            self._security(out, msg, topic.agent_id, "sender_mismatch", f"envelope sender {envelope.sender!r} published on {topic.agent_id!r}'s topic")
            return None
        expected = (Status,) if topic.kind == "status" else (Accepted, Started, Result, Heartbeat, Rejected, AgentEvent, Progress, LogChunk)
        if not isinstance(envelope.body, expected):
            self._reject(out, msg, topic.agent_id, "unexpected_type", f"{envelope.type!r} is not valid on a {topic.kind} topic")
            return None
        try:
            ahead = envelope.hlc.wall_ms / 1000 - self.clock.now()
            if topic.agent_id in (self.untrusted_clocks or ()) or ahead > self.max_clock_skew:
                raise ClockSkew(f"stamp {envelope.hlc} is {ahead:+.1f}s off the hub's clock (max_clock_skew {self.max_clock_skew:g}s, or the agent is flagged); not merged")
            self.hlc.update(envelope.hlc)
        except ClockSkew as exc:
            # Reported, never trusted: the message still applies, but its
            # stamp does not move the hub's clock (and so every agent's).
            self.counters["clock_skew"] += 1
            if self.counters["clock_skew"] % 100 == 1:
                log.warning("agent %s: %s", topic.agent_id, exc)
        return msg, topic.agent_id, envelope

    def _check_inventory(self, agent_id: str, envelope: Envelope, out: _Batch) -> None:
        """An inventory fleet.py will not store is reported (the message itself still applies)."""
        problem = fleet.inventory_problem(getattr(envelope.body, "inventory", {}))
        if problem is None:
            return
        self.counters["rejected.inventory_too_large"] += 1
        if self.inventory_throttle.allow(agent_id):
            log.warning("agent %s: %s", agent_id, problem)
            out.rejections.append(_rejection("", agent_id, "inventory_too_large", problem, envelope.id.encode(), source=out.source))

    def _reject(self, out: _Batch, msg: Inbound, agent_id: str | None, code: str, detail: str) -> None:
        self.counters[f"rejected.{code}"] += 1
        log.warning("rejected message on %s (%s): %s", msg.topic, code, detail)
        record = _rejection(msg.topic, agent_id, code, detail, msg.payload, source=out.source)
        out.rejections.append(record)
        out.refused.append((msg, record))

    # --- applying ----------------------------------------------------------

    def _apply(
        self, session: Session, agent_id: str, envelope: Envelope, now: datetime, out: _Batch,
        assignments: dict[str, Assignment], tis: dict[int, TaskInstance], known: set[str],
    ) -> None:
        body = envelope.body
        self.counters[f"received.{envelope.type}"] += 1
        if isinstance(body, Status | Heartbeat) and body.inventory:
            self._check_inventory(agent_id, envelope, out)
        if isinstance(body, Status):
            heard = fleet.last_heard(session, agent_id)
            if fleet.apply_status(session, agent_id, body, envelope.hlc, now) or body.state == "online":
                self._offline_hook(session, agent_id, body.state, now, out, last_heard=heard)
            # Always an event: a reconnect may bring new labels or job types.
            out.emitted.append((ev.AGENT_CHANGED, {"agent_id": agent_id, "state": body.state}))
            return
        if isinstance(body, Heartbeat):
            heard = fleet.last_heard(session, agent_id)
            if fleet.apply_heartbeat(session, agent_id, body, now, envelope.hlc):
                out.emitted.append((ev.AGENT_CHANGED, {"agent_id": agent_id, "state": "online"}))
                self._offline_hook(session, agent_id, "online", now, out, body.running, heard)
            return
        if isinstance(body, AgentEvent):
            self._apply_agent_event(session, agent_id, body, now, out)
            return
        if isinstance(body, Rejected) and body.code.startswith(security.AGENT_PREFIX):
            # The device refused something claiming to come from the hub.
            code = body.code[len(security.AGENT_PREFIX):] or "unknown"
            self.counters[f"agent_security.{code}"] += 1
            if self.security_throttle.allow(agent_id, "agent", code):
                out.security.append(security.event(now, agent_id, "agent", code, body.detail, body.message_id or ""))
            return
        if isinstance(body, Rejected):
            self.counters[f"agent_rejected.{body.code}"] += 1
            out.rejections.append(_rejection("", agent_id, body.code, body.detail, (body.message_id or "").encode(), source="agent"))
            if body.assignment_id:
                self._apply_refusal(agent_id, body, assignments, tis, now, out)
            return
        if isinstance(body, LogChunk):
            # Acknowledged even when refused: a bad chunk must not block the device's outbox.
            out.log_acks[agent_id].append(f"{body.assignment_id}/{body.seq}")
        assignment = assignments.get(body.assignment_id)
        if assignment is None:
            raise Reject("unknown_assignment", f"{envelope.type} for assignment {body.assignment_id!r}, which this hub never issued")
        if assignment.agent_id != agent_id:
            raise Reject("foreign_assignment", f"assignment {assignment.id} belongs to {assignment.agent_id!r}, not {agent_id!r}")
        ti = tis.get(assignment.ti_id)
        # A cancelled assignment (its task was cleared, marked or timed out)
        # no longer decides anything, even while the try number still matches.
        current = ti is not None and ti.try_number == assignment.try_number and ti.state not in FINISHED and ti.state != TaskState.UP_FOR_RETRY and assignment.state != "cancelled"
        if isinstance(body, Accepted):
            if assignment.state in ("pending", "sent"):
                assignment.state, assignment.accepted_at = "accepted", now
            if current and ti is not None and ti.state in (TaskState.QUEUED, TaskState.DEVICE_OFFLINE):
                ti.state = TaskState.DELIVERED
                out.emitted.append((ev.TASK_STATE_CHANGED, {"ti_id": ti.id, "state": "delivered"}))
        elif isinstance(body, Started):
            if assignment.state in ("pending", "sent", "accepted"):
                assignment.state = "started"
            if current and ti is not None and ti.state in (TaskState.QUEUED, TaskState.DELIVERED, TaskState.DEVICE_OFFLINE):
                first_start = ti.state != TaskState.DEVICE_OFFLINE
                ti.state, ti.started_at = TaskState.RUNNING, now
                tasklogs.reset_progress(ti)
                out.emitted.append((ev.TASK_STATE_CHANGED, {"ti_id": ti.id, "state": "running"}))
                # An agent task's on_execute_callback: when the device starts it.
                if first_start:
                    task_callback(session, ti, TaskState.RUNNING, now)
        elif isinstance(body, Result):
            self._apply_result(session, agent_id, envelope, body, assignment, ti if current else None, now, out, known)
        elif isinstance(body, Progress):
            tasklogs.apply_progress(ti if current and ti is not None and ti.state == TaskState.RUNNING else None, body)
        elif isinstance(body, LogChunk):
            try:
                stored = tasklogs.apply_chunk(session, agent_id, body, assignment, now)
            except ValueError as exc:
                raise Reject("bad_log_chunk", str(exc)) from None
            self.counters["log.stored" if stored else "log.duplicate"] += 1

    def _apply_refusal(self, agent_id: str, body: Rejected, assignments: dict[str, Assignment], tis: dict[int, TaskInstance], now: datetime, out: _Batch) -> None:
        """The device refused an assignment (its deadline passed before it
        arrived, say): that try is over and will not be run there."""
        assignment = assignments.get(body.assignment_id or "")
        # Only a refusal that means "this device will never run it", and only
        # before the device accepted it: a refused stray copy of an assignment
        # the device already holds must not fail the real one.
        if body.code not in FINAL_REFUSALS or assignment is None or assignment.agent_id != agent_id or assignment.state not in ("pending", "sent"):
            return
        assignment.state, assignment.finished_at = "finished", now
        ti = tis.get(assignment.ti_id)
        if ti is None or ti.try_number != assignment.try_number or ti.state in FINISHED or ti.state == TaskState.UP_FOR_RETRY:
            return
        error = {"code": body.code, "message": f"{agent_id} refused the assignment: {body.detail}", "retryable": False}
        state = finish_try(ti, success=False, now=now, error=error)
        out.emitted.append((ev.RESULT_APPLIED, {"ti_id": ti.id, "state": str(state)}))

    def _apply_result(
        self, session: Session, agent_id: str, envelope: Envelope, body: Result, assignment: Assignment,
        ti: TaskInstance | None, now: datetime, out: _Batch, known: set[str],
    ) -> None:
        out.acks[agent_id].append(body.assignment_id)
        if body.assignment_id in known:
            self.counters["result.duplicate"] += 1
            return
        known.add(body.assignment_id)
        error = body.error.to_dict() if body.error else None
        session.add(
            TaskResult(
                ti_id=assignment.ti_id, try_number=assignment.try_number, agent_id=agent_id, assignment_id=assignment.id,
                status=body.status, output=body.output, error=error,
                started_at=_device_time(body.started_at), finished_at=_device_time(body.finished_at),
                hlc=str(envelope.hlc), received_at=now, applied=ti is not None, received_hlc=str(self.hlc.now()),
            )
        )
        assignment.state, assignment.finished_at = "finished", now
        if ti is None:
            # The hub already decided this try (given up, cancelled, cleared,
            # marked, or another success came first): the conflict rule decides.
            self.counters["result.late"] += 1
            late_ti = session.get(TaskInstance, assignment.ti_id)
            if late_ti is not None:
                # The flag as stored, not this process's cache: another hub
                # process (MQTT ingestion vs the HTTP sync route) may have set it.
                trusted = lambda agent: fleet.clock_trusted(session, agent)  # noqa: E731
                for record in reconcile.reconcile(session, late_ti, now, self.hlc, out.emitted, trusted=trusted):
                    self.counters[f"conflict.{record.rule}"] += 1
            return
        if ti.started_at is None:
            ti.started_at = now
        state = finish_try(ti, success=body.status == "success", now=now, output=body.output, error=error)
        self.counters[f"result.{state}"] += 1
        out.emitted.append((ev.RESULT_APPLIED, {"ti_id": ti.id, "state": str(state)}))

    def clock_trusted(self, agent_id: str) -> bool:
        """Whether this agent's stamps may explain its results in conflict
        records (``hub.reconcile``): not while its clock is flagged as skewed."""
        return agent_id not in (self.untrusted_clocks or ())

    def _offline_hook(
        self, session: Session, agent_id: str, state: str, now: datetime, out: _Batch, running: tuple[str, ...] | None = None, last_heard: datetime | None = None,
    ) -> None:
        # Offline operation (hub.offline): device_offline work, and on return
        # the assignments re-sent from the DB, never from the broker's session.
        changes = offline.agent_state_changed(session, agent_id, state, now, Dispatcher(self.hlc, self.max_message_bytes), running, last_heard)
        out.emitted.extend(changes.events())

    def _observe_clocks(self, session: Session, fresh: dict[str, tuple[HLC, fleet.ClockReading]], now: datetime, out: _Batch) -> None:
        for change in fleet.observe_clocks(session, {agent_id: reading for agent_id, (_hlc, reading) in fresh.items()}, now, self.max_clock_skew):
            untrusted = self.untrusted_clocks if self.untrusted_clocks is not None else set()
            self.untrusted_clocks = untrusted
            if change.flagged:
                untrusted.add(change.agent_id)
                log.warning("agent %s: clock is %+.1fs off the hub's (max_clock_skew %gs); flagged, its times are not trusted", change.agent_id, change.skew, self.max_clock_skew)
            else:
                untrusted.discard(change.agent_id)
                log.info("agent %s: clock back within max_clock_skew (%+.1fs); flag cleared", change.agent_id, change.skew)
            self.counters["clock_skew.flagged" if change.flagged else "clock_skew.cleared"] += 1
            out.emitted.append((ev.AGENT_CLOCK_SKEW, {"agent_id": change.agent_id, "skew": change.skew, "flagged": change.flagged}))

    def _apply_agent_event(self, session: Session, agent_id: str, body: AgentEvent, now: datetime, out: _Batch) -> None:
        """A device reported a condition: an asset event on
        ``agent-event://<name>`` with the device and its payload, applied
        once per (device, event id). A malformed event is refused for good
        and acknowledged, so it does not block the device's outbox."""
        out.event_acks[agent_id].append(body.event_id)
        if not 1 <= len(body.event_id) <= 128 or not body.event_id.isprintable():
            raise Reject("bad_event_id", f"agent event id {body.event_id[:64]!r} is not 1-128 printable characters")
        if not AGENT_EVENT_NAME_RE.fullmatch(body.name):
            raise Reject("bad_event_name", f"agent event name {body.name[:64]!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        size = len(json.dumps(body.payload))
        if size > MAX_AGENT_EVENT_PAYLOAD_BYTES:
            raise Reject("event_too_large", f"agent event {body.name!r}: payload of {size} bytes is over {MAX_AGENT_EVENT_PAYLOAD_BYTES}; send a reference")
        key = asset_events.agent_event_key(agent_id, body.event_id)
        if session.scalar(select(AssetEvent.id).where(AssetEvent.source_event_id == key)) is not None:
            self.counters["agent_event.duplicate"] += 1
            return
        uri = agent_event_uri(body.name)
        event = asset_events.record_asset_event(session, uri, now, extra=body.payload, source_agent_id=agent_id, source_event_id=key)
        self.counters["agent_event.applied"] += 1
        out.emitted.append((ev.ASSET_UPDATED, {"uri": uri, "event_id": event.id}))

    @staticmethod
    def ack_of(out: _Batch, agent_id: str) -> Ack:
        """Everything ``out`` acknowledges to one agent, as one ``Ack`` (the
        HTTP sync route answers with it; MQTT sends it in chunks)."""
        return Ack(tuple(out.acks.get(agent_id, ())), event_ids=tuple(out.event_acks.get(agent_id, ())), log_ids=tuple(out.log_acks.get(agent_id, ())))

    def _send_acks(
        self, acks: dict[str, list[str]], event_acks: dict[str, list[str]] | None = None, log_acks: dict[str, list[str]] | None = None,
        refusals: dict[str, list[str]] | None = None,
    ) -> None:
        event_acks, log_acks, refusals = event_acks or {}, log_acks or {}, refusals or {}
        for agent_id in dict.fromkeys([*acks, *event_acks, *log_acks, *refusals]):
            ids, events, logs, refused = acks.get(agent_id, []), event_acks.get(agent_id, []), log_acks.get(agent_id, []), refusals.get(agent_id, [])
            for start in range(0, max(len(ids), len(events), len(logs), len(refused)), 200):
                body = Ack(
                    tuple(ids[start:start + 200]), event_ids=tuple(events[start:start + 200]), log_ids=tuple(logs[start:start + 200]),
                    refused_ids=tuple(refused[start:start + 200]),
                )
                if self.keyring is None:
                    raise RuntimeError("this ingester has no key ring: it cannot sign acknowledgements")
                frame = sign_for(self.keyring, body, agent_id, self.hlc.now(), self.clock.now(), ttl=self.message_ttl, limit=self.max_message_bytes)
                # Not through the DB outbox: an ack that gets lost is simply
                # sent again when the agent re-sends the result.
                self.link.publish(ack_topic(agent_id), frame, qos=1)


def _malformed_result_id(payload: bytes, agent_id: str) -> str | None:
    """The assignment id of a result envelope from ``agent_id`` that failed to
    decode as one (so it never will), when it names one; else None."""
    try:
        doc: Any = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("type") != "result" or doc.get("from") != agent_id or not isinstance(doc.get("body"), dict):
        return None
    aid = doc["body"].get("assignment_id")
    return aid if isinstance(aid, str) and 0 < len(aid) <= 128 else None


def _text(value: str, limit: int) -> str:
    # PostgreSQL text cannot hold NUL; a device's strings can. Keep them visible.
    return value.replace("\x00", "\\x00")[:limit]


def _rejection(topic: str, agent_id: str | None, code: str, detail: str, payload: bytes, now: datetime | None = None, source: str = "mqtt") -> RejectedMessage:
    """A rejection record whose every field fits its column on any backend."""
    return RejectedMessage(
        source=source, topic=_text(topic, 300), agent_id=_text(agent_id, 128) if agent_id else None, code=_text(code, 50),
        detail=_text(detail, 2000), excerpt=_text(payload[:512].decode("utf-8", "backslashreplace"), 2048), received_at=now,
    )


def _device_time(value: float | None) -> datetime | None:
    if value is None:
        return None
    try:
        return to_datetime(value)
    except (OverflowError, OSError, ValueError):
        return None
