"""This device's MQTT session: subscriptions, status, inbound dispatch, events.

Built on :class:`shared.mqtt.MqttLink` (persistent MQTT 5 session, manual
PUBACK). The link only moves bytes: a consumer thread takes each inbound
message, decodes it (with the configured size limit), asks the daemon's
``admit`` whether it may be acted on, and hands it to the daemon's handlers.

Acknowledgement rule (STYLE-EXAMPLES.md rule 5): an ``assign`` message is
PUBACKed by ``on_assign`` itself, after the inbox commit. Cancel and ack
messages are PUBACKed here once their handler returned. Anything refused
(undecodable, oversized, unknown type, wrong sender, expired...) is logged,
counted as ``rejected.<code>``, reported as a ``rejected`` event and PUBACKed
so the broker does not redeliver it forever. A handler that raises leaves its
message unacknowledged; the broker redelivers it with the next session.

Everything received is a signed frame: ``open`` (agent.verify.open_message
with the trusted hub keys) verifies it before anything else; its security
refusals are counted as ``security.<code>`` and reported with the code
``security.<code>``. Everything sent is signed with the device key
(``shared.frames``, purpose ``agent-to-hub``), the will included: it is
signed once, when the link is built. The hub's key announcements arrive,
retained, on ``outpost/v1/hub/keys`` and go to ``on_keys``.

The status topic carries a retained ``online`` status, published on every
connect, and the MQTT Will is a retained ``offline`` status; a graceful
:meth:`AgentLink.stop` publishes ``offline`` itself before disconnecting.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from agent.config import AgentSettings
from agent.identity import hlc_floor_path, save_hlc_floor
from shared.envelope import Envelope
from shared.errors import ClockSkew, PayloadTooLarge, ProtocolError
from shared.frames import AGENT_TO_HUB, sign_envelope, unsigned_part
from shared.hlc import HLC, HybridClock
from shared.messages import Ack, Assign, Cancel, Heartbeat, Message, Rejected, Status
from shared.mqtt import Inbound, MqttLink, MqttSettings, Will
from shared.signing import SigningKey
from shared.topics import HUB_KEYS_TOPIC, ack_topic, assign_topic, events_topic, parse, probe_topic, status_topic

log = logging.getLogger(__name__)

_MQTT_OK = 0  # paho's MQTT_ERR_SUCCESS; the enum lives in paho, which only shared.mqtt imports
_DETAIL_MAX = 500
#: Put on the inbound queue by stop() to wake the consumer (never acknowledged).
_STOP = Inbound("", b"", 0, False, 0)
#: Refusal codes of security events start with it (agent.verify.SECURITY_PREFIX).
_SECURITY_PREFIX = "security."
#: Backstop for the consumer's blocking wait on the inbound queue.
_IDLE_WAIT = 30.0


class Refusal(Protocol):
    """What ``admit`` returns for a message that may not be acted on."""

    code: str
    detail: str
    assignment_id: str | None
    message_id: str | None


@dataclass(frozen=True)
class Handlers:
    """What the daemon plugs into the link.

    ``admit(envelope, topic_kind)`` returns None or a Refusal.
    ``on_assign(envelope, inbound)`` must call ``inbound.ack()`` once the
    assignment is durably stored. ``on_connect`` runs on the network thread
    after every (re)connect: keep it short.
    """

    admit: Callable[[Envelope, str], Refusal | None]
    on_assign: Callable[[Envelope, Inbound], None]
    on_cancel: Callable[[Envelope], None]
    on_ack: Callable[[Ack], None]
    on_connect: Callable[[], None]
    count: Callable[[str], None]
    #: Verify and decode a frame from the hub: the envelope, or a Refusal
    #: (raises ProtocolError for a signed frame that does not decode).
    open: Callable[[bytes], Envelope | Refusal]
    #: A key announcement frame arrived on the hub keys topic.
    on_keys: Callable[[bytes], None]


class AgentLink:
    """The agent's MQTT session and its inbound consumer thread."""

    def __init__(
        self, settings: AgentSettings, hlc: HybridClock, handlers: Handlers, online: Status, key: SigningKey,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.agent_id = settings.agent_id
        self._key = key
        self._now = now
        self.limit = settings.max_message_bytes
        self._hlc = hlc
        self._hlc_file = hlc_floor_path(settings)
        self._handlers = handlers
        self._online = online
        self._events_topic = events_topic(self.agent_id)
        self._status_topic = status_topic(self.agent_id)
        self._stopping = threading.Event()
        self._consumer: threading.Thread | None = None
        will = Will(self._status_topic, self._envelope(Status("offline")), qos=1, retain=True)
        self.mqtt = MqttLink(
            MqttSettings(
                host=settings.broker_host,
                port=settings.broker_port,
                client_id=self.agent_id,
                username=settings.broker_username,
                password=settings.broker_password,
                keepalive=settings.keepalive,
                reconnect_max=settings.reconnect_max,
                session_expiry=settings.session_expiry,
                tls=settings.broker_tls,
                tls_ca=settings.tls_ca,
                tls_cert=settings.tls_cert,
                tls_key=settings.tls_key,
                probe_topic=probe_topic(self.agent_id),
            ),
            subscriptions=[(assign_topic(self.agent_id), 1), (ack_topic(self.agent_id), 1), (HUB_KEYS_TOPIC, 1)],
            will=will,
            on_connect=self._connected,
        )

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (reconnecting forever) and start consuming."""
        self._stopping.clear()
        self._consumer = threading.Thread(target=self._consume, name=f"link-{self.agent_id}", daemon=True)
        self._consumer.start()
        self.mqtt.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop consuming, publish the offline status, disconnect. Messages
        received but not handled stay unacknowledged and come back later."""
        self._stopping.set()
        self.mqtt.inbound.put(_STOP)  # wakes the consumer, which blocks on the queue
        if self._consumer is not None:
            self._consumer.join(timeout)
        self.mqtt.stop(last_words=(self._status_topic, self._envelope(Status("offline"))), timeout=timeout)

    def alive(self) -> bool:
        """True while the inbound consumer thread runs (the watchdog's check)."""
        return self._consumer is not None and self._consumer.is_alive()

    def set_online_status(self, online: Status) -> None:
        """Replace the retained ``online`` status (new labels after a config
        reload) and publish it now when connected; else on the next connect."""
        self._online = online
        if self.connected:
            self.mqtt.publish(self._status_topic, self._envelope(online), qos=1, retain=True)

    @property
    def connected(self) -> bool:
        return self.mqtt.connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self.mqtt.wait_connected(timeout)

    # --- outbound ------------------------------------------------------------

    def send_event(self, message: Message, hlc: HLC | None = None) -> bool:
        """Publish an event (QoS 1) stamped with ``hlc`` (default: now).
        Returns False, sending nothing, while disconnected: paho would
        otherwise queue stale events in memory; durable things (results) are
        the outbox's job, the rest is best effort."""
        if not self.connected:
            return False
        try:
            data = self._envelope(message, hlc)
        except PayloadTooLarge as exc:
            log.error("%s event for %s not sent: %s", message.TYPE, getattr(message, "assignment_id", "-"), exc)
            return False
        return self.mqtt.publish(self._events_topic, data, qos=1).rc == _MQTT_OK

    def send_item(self, message: Message, hlc: HLC) -> bool:
        """Publish an outbox item like :meth:`send_event`, but raise
        :class:`PayloadTooLarge` when it is over ``max_message_bytes`` instead
        of returning False: such an item can never be sent, and the outbox
        must set it aside rather than wait for a reconnect that cannot help."""
        if not self.connected:
            return False
        return self.mqtt.publish(self._events_topic, self._envelope(message, hlc), qos=1).rc == _MQTT_OK

    def _envelope(self, message: Message, hlc: HLC | None = None) -> bytes:
        stamp = hlc or self._hlc.now()
        if isinstance(message, Heartbeat | Status):
            # The hub refuses a heartbeat or status not newer than the last it
            # applied (a replay): the stamp must outlive a restart on a device
            # whose clock went back (no RTC), so it is saved before it is sent.
            save_hlc_floor(self._hlc_file, stamp)
        envelope = Envelope(message, sender=self.agent_id, hlc=stamp, issued_at=round(self._now(), 3))
        return sign_envelope(envelope, self._key, AGENT_TO_HUB, self.limit)

    def _connected(self) -> None:
        self.mqtt.publish(self._status_topic, self._envelope(self._online), qos=1, retain=True)
        self._handlers.on_connect()

    # --- inbound -------------------------------------------------------------

    def _consume(self) -> None:
        while not self._stopping.is_set():
            try:
                # Long: stop() wakes it with _STOP, so an idle link costs nothing.
                inbound = self.mqtt.inbound.get(timeout=_IDLE_WAIT)
            except queue.Empty:
                continue
            if inbound is _STOP:
                continue
            try:
                self._handle(inbound)
            except Exception:
                # The agent never dies on one message; unacked, it comes back.
                log.exception("handling a message on %s failed; it stays unacknowledged", inbound.topic)
                self._handlers.count("errors.inbound")

    def _handle(self, inbound: Inbound) -> None:
        if inbound.topic == HUB_KEYS_TOPIC:
            if inbound.payload:  # an empty retained message clears the topic
                self._handlers.on_keys(inbound.payload)
            inbound.ack()
            return
        try:
            kind = parse(inbound.topic).kind
        except ValueError:
            kind = ""
        try:
            opened = self._handlers.open(inbound.payload)
        except ProtocolError as exc:
            self._refuse(inbound, exc.code, str(exc), _peek_id(unsigned_part(inbound.payload), self.limit))
            return
        if not isinstance(opened, Envelope):
            message_id = opened.message_id or _peek_id(unsigned_part(inbound.payload), self.limit)
            self._refuse(inbound, opened.code, opened.detail, message_id, opened.assignment_id)
            return
        envelope = opened
        refusal = self._handlers.admit(envelope, kind)
        if refusal is not None:
            self._refuse(inbound, refusal.code, refusal.detail, refusal.message_id or envelope.id, refusal.assignment_id)
            return
        try:
            self._hlc.update(envelope.hlc)
        except ClockSkew as exc:
            log.warning("not merging the clock of %s: %s", envelope.sender, exc)
        body = envelope.body
        if isinstance(body, Assign):
            self._handlers.on_assign(envelope, inbound)
            return
        if isinstance(body, Cancel):
            self._handlers.on_cancel(envelope)
        elif isinstance(body, Ack):
            self._handlers.on_ack(body)
        else:
            self._refuse(inbound, "unexpected_type", f"no handler for {envelope.type!r} messages", envelope.id)
            return
        inbound.ack()

    def _refuse(self, inbound: Inbound, code: str, detail: str, message_id: str | None, assignment_id: str | None = None) -> None:
        if code.startswith(_SECURITY_PREFIX):
            log.warning("SECURITY: refused message %s on %s: %s: %s", message_id or "(no id)", inbound.topic, code, detail)
            self._handlers.count(code)
        else:
            log.warning("rejected message %s on %s: %s: %s", message_id or "(no id)", inbound.topic, code, detail)
            self._handlers.count(f"rejected.{code}")
        self.send_event(Rejected(code, detail[:_DETAIL_MAX], message_id, assignment_id))
        inbound.ack()


def _peek_id(payload: bytes, limit: int) -> str | None:
    """The envelope id of a message that failed to decode, when readable."""
    if len(payload) > limit:
        return None
    try:
        doc: Any = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    value = doc.get("id") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None
