"""The one paho-mqtt wrapper the hub and the agent both use.

It speaks MQTT 5 with a persistent session (``clean_start`` false and a
session expiry), so QoS 1 messages published while a peer is away wait in the
broker. Incoming messages are acknowledged manually: the callback thread only
puts them on a thread-safe queue, and the consumer calls :meth:`Inbound.ack`
after it has made the message durable. A crash before that ack leaves the
message with the broker, which redelivers it on the next connection.

paho notices a dead connection only when a PINGREQ goes unanswered for a
whole keepalive, up to two keepalives after the last byte came in: too slow
for a half-open link (a NAT entry or a peer that vanished without a FIN).
A watchdog thread therefore probes a link that has been silent for half a
keepalive with a QoS 1 publish on ``probe_topic`` (nobody subscribes; the
broker's PUBACK is the answer) and drops the socket when nothing at all
came in for another half keepalive. paho then reconnects as after any
lost connection. Busy links (heartbeats, acks) never need a probe.
"""

from __future__ import annotations

import logging
import math
import queue
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import OutpostError

log = logging.getLogger(__name__)


class _PollSelect:
    """Stands in for the ``select`` module inside paho, whose network loop
    calls ``select.select()``: that fails (paho reads the ValueError as a
    lost connection) once the socket's file descriptor is above FD_SETSIZE,
    1024, which a process with many open files reaches (the fleet simulator
    runs a thousand agents, each with its queue files, in one process).
    Same contract, done with ``poll()``, which has no such limit."""

    error = OSError

    @staticmethod
    def select(rlist: list[object], wlist: list[object], xlist: list[object], timeout: float | None = None) -> tuple[list[object], list[object], list[object]]:
        poller = select.poll()
        masks: dict[int, int] = {}
        for objects, mask in ((rlist, select.POLLIN), (wlist, select.POLLOUT)):
            for obj in objects:
                fd = _fileno(obj)
                masks[fd] = masks.get(fd, 0) | mask
        for fd, mask in masks.items():
            poller.register(fd, mask)
        # ceil: a timeout under a millisecond must not become a busy loop of zero-waits.
        ready = dict(poller.poll(None if timeout is None else math.ceil(timeout * 1000)))
        # As select() does: a hang-up or an error makes a socket readable (the read then tells).
        readable = [o for o in rlist if ready.get(_fileno(o), 0) & (select.POLLIN | select.POLLHUP | select.POLLERR | select.POLLNVAL)]
        writable = [o for o in wlist if ready.get(_fileno(o), 0) & (select.POLLOUT | select.POLLERR | select.POLLHUP)]
        return readable, writable, []


def _fileno(obj: object) -> int:
    fd = obj if isinstance(obj, int) else getattr(obj, "fileno", None)
    if fd is None:
        raise TypeError(f"{obj!r} has no file descriptor")  # what select() raises; paho expects it
    fd = fd if isinstance(fd, int) else fd()
    if fd < 0:
        raise ValueError("file descriptor cannot be a negative integer")
    return int(fd)


paho.select = _PollSelect  # type: ignore[attr-defined]


def _retrying_reconnect(reconnect: Callable[[], MQTTErrorCode]) -> Callable[[], MQTTErrorCode]:
    """paho's ``reconnect`` walks its queue of outgoing packets without a
    lock; a publish from another thread at that moment raises "deque mutated
    during iteration" out of the network thread, which then dies and the
    link never reconnects (seen with a thousand agents in one process).
    Everything reconnect did before the walk is safe to do again."""

    def retrying() -> MQTTErrorCode:
        for _ in range(10):
            try:
                return reconnect()
            except RuntimeError as exc:
                if "mutated during iteration" not in str(exc):
                    raise
        return reconnect()

    return retrying


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    username: str | None = None
    password: str | None = None
    keepalive: int = 30
    #: How long the broker keeps this client's session and queued QoS 1 messages.
    session_expiry: int = 7 * 24 * 3600
    #: TLS to the broker, verified against ``tls_ca`` or, without it, the
    #: system's CA store. ``tls_ca`` or ``tls_cert`` turn it on as well.
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    max_inflight: int = 100
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    #: Where the watchdog publishes its liveness probe (see the module
    #: docstring); None: no watchdog, paho's own keepalive only.
    probe_topic: str | None = None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass
class Inbound:
    """A received message. Call :meth:`ack` once it is safely stored."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    _client: paho.Client | None = field(default=None, repr=False)

    def ack(self) -> None:
        if self._client is not None and self.qos > 0:
            self._client.ack(self.mid, self.qos)


def shut_down(client: paho.Client) -> None:
    """Stop ``client``'s network thread and close its wake-up socket pair.

    paho closes that pair only in ``Client.__del__``; when the client sits in
    a reference cycle (callbacks that refer back to their owner), the garbage
    collector may reach the sockets first and warn that they were never
    closed. ``loop_start`` makes a new pair, so a link can start again."""
    client.loop_stop()
    client._reset_sockets(sockpair_only=True)  # noqa: SLF001 (no public way)


def _authenticate(client: paho.Client, settings: MqttSettings) -> None:
    """Credentials and TLS, the same for every kind of connection."""
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls or settings.tls_ca or settings.tls_cert:
        # PROTOCOL_TLS_CLIENT verifies the certificate chain and the host name.
        client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key, tls_version=ssl.PROTOCOL_TLS_CLIENT)


class MqttLink:
    """A reconnecting MQTT 5 client with a persistent session.

    ``subscriptions`` are (topic filter, QoS) pairs, re-sent on every
    connect so a broker that lost the session still routes to us.
    ``on_connect`` callbacks run on the network thread after subscribing:
    keep them short (publish, set a flag).
    """

    def __init__(
        self,
        settings: MqttSettings,
        subscriptions: list[tuple[str, int]] | None = None,
        will: Will | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.subscriptions = list(subscriptions or [])
        self.inbound: queue.Queue[Inbound] = queue.Queue()
        self.connected = threading.Event()
        self._on_connect_hook = on_connect
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        _authenticate(client, settings)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        client.max_inflight_messages_set(settings.max_inflight)
        client.reconnect_delay_set(int(max(1, settings.reconnect_min)), int(settings.reconnect_max))
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_message = self._handle_message
        client.on_socket_open = self._handle_socket_open
        client.on_publish = self._handle_inbound_ack
        client.on_subscribe = self._handle_inbound_ack
        client.reconnect = _retrying_reconnect(client.reconnect)  # type: ignore[method-assign]
        self.client = client
        self._started = False
        #: time.monotonic() of the last packet from the broker, and of the
        #: unanswered probe (None: none outstanding).
        self._last_in = time.monotonic()
        self._probe_sent: float | None = None
        self._watchdog_stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        #: Connections the watchdog dropped (a test and a log read it).
        self.dropped_silent = 0

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Connect in the background; reconnects forever until :meth:`stop`."""
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry
        self.client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive,
            clean_start=False,
            properties=props,
        )
        self.client.loop_start()
        self._started = True
        if self.settings.probe_topic and self.settings.keepalive > 0:
            self._watchdog_stop.clear()
            self._watchdog = threading.Thread(target=self._watch, name=f"mqtt-watchdog-{self.settings.client_id}", daemon=True)
            self._watchdog.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, last_words: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Disconnect cleanly; optionally publish one retained message first
        (the agent's ``offline`` status, so the broker need not send the will)."""
        if not self._started:
            return
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout)
            self._watchdog = None
        if last_words is not None and self.connected.is_set():
            info = self.client.publish(last_words[0], last_words[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        shut_down(self.client)
        self._started = False
        self.connected.clear()

    # --- traffic -----------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> paho.MQTTMessageInfo:
        """Queue a publish. paho keeps unacknowledged QoS 1 messages in memory
        and resends them after a reconnect; durability beyond the process is
        the caller's job (the agent's outbox, the hub's outbox table)."""
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_and_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> bool:
        """Publish and wait for the broker's PUBACK. False on timeout or when
        the client is not connected."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            return False
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    # --- liveness ------------------------------------------------------------

    def _watch(self) -> None:
        half = self.settings.keepalive / 2
        # Worst case from the last byte in to the drop: a keepalive plus two ticks.
        tick = max(0.1, self.settings.keepalive / 20)
        while not self._watchdog_stop.wait(tick):
            try:
                self._check_liveness(time.monotonic(), half)
            except Exception:  # the watchdog must outlive a failed probe
                log.exception("mqtt liveness check failed")

    def _check_liveness(self, now: float, half: float) -> None:
        if not self.connected.is_set():
            self._probe_sent = None
            return
        if self._probe_sent is None:
            if now - self._last_in >= half:
                self._probe_sent = now
                self.client.publish(self.settings.probe_topic or "", b"", qos=1)
            return
        if now - self._probe_sent < half:
            return
        sock = self.client.socket()
        log.warning(
            "mqtt: nothing from %s:%s for %.1fs (probe unanswered); dropping the connection to reconnect",
            self.settings.host, self.settings.port, now - self._last_in,
        )
        self._probe_sent = None
        self.dropped_silent += 1
        if isinstance(sock, socket.socket):
            # paho's network thread then reads EOF and reconnects; closing
            # the socket under it instead would race with its select().
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _saw_inbound(self) -> None:
        self._last_in = time.monotonic()
        self._probe_sent = None

    def _handle_inbound_ack(self, *args: object) -> None:
        self._saw_inbound()

    # --- paho callbacks (network thread) -----------------------------------

    def _handle_connect(self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, properties: object) -> None:
        if reason.is_failure:
            log.warning("mqtt connect to %s:%s refused: %s", self.settings.host, self.settings.port, reason)
            return
        self._saw_inbound()
        log.info("mqtt connected to %s:%s as %s", self.settings.host, self.settings.port, self.settings.client_id)
        if self.subscriptions:
            client.subscribe(self.subscriptions)
        self.connected.set()
        if self._on_connect_hook is not None:
            try:
                self._on_connect_hook()
            except Exception:
                log.exception("on_connect hook failed")

    def _handle_disconnect(self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, properties: object) -> None:
        self.connected.clear()
        log.info("mqtt disconnected from %s:%s: %s", self.settings.host, self.settings.port, reason)

    @staticmethod
    def _handle_socket_open(client: paho.Client, userdata: object, sock: object) -> None:
        # Small QoS 1 exchanges (PUBLISH, PUBACK) otherwise meet Nagle's
        # algorithm and delayed ACKs: a 40 ms stall per round trip.
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _handle_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        self._saw_inbound()
        self.inbound.put(Inbound(msg.topic, msg.payload, msg.qos, msg.retain, msg.mid, client))


#: Put on the answer queue when the connection drops: no answer will come.
_CLOSED = b"\0closed"


class MqttRequestError(OutpostError):
    """A request/response exchange with the broker failed."""

    code = "mqtt_request_failed"


def request(
    settings: MqttSettings, topic: str, payload: bytes, response_topic: str, timeout: float = 10.0,
    accept: Callable[[bytes], bool] | None = None,
) -> bytes:
    """Publish ``payload`` on ``topic`` and return the first message that
    arrives on ``response_topic`` (a broker's control API, for example) and
    that ``accept`` accepts: the response topic may carry answers meant for
    other clients.

    A short-lived connection with a clean session: nothing is left queued at
    the broker for this client id afterwards. Raises :class:`MqttRequestError`
    naming the broker and the reason when the connection is refused (bad
    credentials), the subscription or the publish is not authorized, or no
    answer comes within ``timeout`` seconds."""
    where = f"{settings.host}:{settings.port}"
    who = settings.username or "(anonymous)"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=paho.MQTTv5)
    _authenticate(client, settings)
    # Refused connections must end the exchange, not be retried by paho.
    client.reconnect_delay_set(int(timeout) + 1, int(timeout) + 1)
    connected = threading.Event()
    refused: list[str] = []
    subscribed = threading.Event()
    granted: list[ReasonCode] = []
    answers: queue.Queue[bytes] = queue.Queue()

    def on_connect(_c: paho.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    def on_subscribe(_c: paho.Client, _u: object, _mid: int, reasons: list[ReasonCode], _p: object) -> None:
        granted.extend(reasons)
        subscribed.set()

    def on_disconnect(_c: paho.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        answers.put(_CLOSED)
        connected.set()
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect
    client.on_message = lambda _c, _u, msg: answers.put(msg.payload)
    deadline = time.monotonic() + timeout
    try:
        client.connect(settings.host, settings.port, keepalive=max(5, int(timeout) * 2), clean_start=True)
    except (OSError, ssl.SSLError) as exc:
        raise MqttRequestError(f"cannot reach the broker at {where}: {exc}") from None
    client.loop_start()
    try:
        if not connected.wait(max(0.0, deadline - time.monotonic())):
            raise MqttRequestError(f"the broker at {where} did not answer the connection within {timeout}s")
        if refused or not client.is_connected():
            reason = refused[0] if refused else "closed the connection"
            raise MqttRequestError(f"the broker at {where} refused the connection of {who!r}: {reason} (check the user name and password)")
        client.subscribe(response_topic, qos=1)
        if not subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise MqttRequestError(f"the broker at {where} did not acknowledge the subscription to {response_topic!r} within {timeout}s")
        if not client.is_connected():
            raise MqttRequestError(f"the broker at {where} closed the connection of {who!r} before acknowledging the subscription to {response_topic!r}")
        if not granted or granted[0].is_failure:
            reason = granted[0] if granted else "no reason code"
            raise MqttRequestError(f"the broker at {where} refused {who!r} the subscription to {response_topic!r}: {reason}")
        info = client.publish(topic, payload, qos=1)
        try:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise MqttRequestError(f"publishing to {topic!r} on {where} failed: {exc}") from None
        try:
            while True:
                answer = answers.get(timeout=max(0.0, deadline - time.monotonic()))
                if answer is _CLOSED:
                    raise MqttRequestError(f"the broker at {where} closed the connection of {who!r} before answering on {response_topic!r}")
                if accept is None or accept(answer):
                    return answer
        except queue.Empty:
            raise MqttRequestError(
                f"no answer on {response_topic!r} from the broker at {where} within {timeout}s "
                f"(is {who!r} allowed to publish to {topic!r}?)"
            ) from None
    finally:
        client.disconnect()
        shut_down(client)
