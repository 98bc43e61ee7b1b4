"""Drains the outbox to the hub: results are sent until the hub acknowledges them.

The rule (ARCHITECTURE.md, "Delivery contract", point 3): a result leaves the
outbox only when an ``ack`` naming its assignment id arrives; until then it
is sent again every ``resend_after`` seconds and after every reconnect. An
ack may instead name it in ``refused_ids`` (the hub will never apply it: an
assignment it never issued, or issued to another agent; malformed): it is
then set aside, status failed and kept for inspection, as is an item too
large to send at all. Sends
go oldest first, with at most ``window`` results in flight (claimed in the
outbox, sent, not yet acknowledged), so a device that was offline for days
catches up in order without flooding the broker. Each result travels with the
HLC stamp taken when its job finished, not the time of sending.

Large backlogs go over HTTP instead (:class:`HttpPath`, when ``hub_url`` is
set): once the outbox holds ``threshold`` items or more, this same thread
posts them to the hub's bulk endpoint in batches, oldest first, each batch
starting with every item still in flight over MQTT, and waits for each answer
(the hub commits, then acknowledges) before the next; items are read, not
claimed, so a batch costs one read and one commit. It keeps going until
the outbox is empty, then MQTT takes over again. Only one thread sends, so
the two paths never interleave; an item sent over MQTT and then in an HTTP
batch may reach the hub twice, which is harmless (results are unique per
assignment, events per id) and cannot reorder anything: an HTTP batch holds
every older unacknowledged item before the newer ones. An HTTP error falls
back to MQTT, and HTTP is tried again after a backoff (1 s doubling to 60 s;
5 minutes after 401/403, a configuration error); a reconnect of the MQTT link
ends the backoff (but not a 401/403 wait): the network is back.

Every answer the client acts on (the acknowledgement, the cursor) must be
signed by a hub key this device trusts and bound to the request it answers
(``Outpost-Answer-Signature``, shared/requestsig.py): an answer that does
not verify is a failed request like any other (nothing is dropped or
skipped, MQTT takes over, HTTP backs off), counted as ``security.bad_answer``
and reported to the hub. Without that, anyone in the path of a plain-HTTP
``hub_url`` could make the device drop results the hub never received.

The hub keeps a cursor per agent and outbox stream: the highest sequence
(litequeue message id) of a batch it committed. Before its first HTTP batch a
(re)started agent asks for it and marks its items up to it done, so a batch
the hub committed just before the agent was killed is not sent again. The
stream id lives next to the outbox (``outbox.stream``) and changes whenever
message ids might no longer grow (the outbox is empty at start, or the clock
is behind the newest id), so an old cursor never skips a new item.

Only the in-flight bookkeeping (last send time) lives in memory. After a
crash the outbox's claims return to ready at start-up and everything not
acknowledged is sent again: the hub applies results idempotently.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from agent.queues import Outbox, PendingResult
from shared.clock import Clock
from shared.errors import OutpostError, ProtocolError
from shared.files import atomic_write
from shared.messages import Ack
from shared.requestsig import ANSWER_HEADER, HEADER, sign_request, verify_answer
from shared.signing import PublicKey, SignatureError, SigningKey

log = logging.getLogger(__name__)

#: Longest the loop sleeps when nothing wakes it: a backstop only (it also
#: picks up items another process, ``outpost-agent emit``, put in the outbox).
#: A new item, an ack, a reconnect or a released claim wake it at once, and
#: the next resend deadline or HTTP retry sets the wake-up time otherwise.
IDLE_WAIT = 5.0
#: HTTP sync backoff after an error: first delay, longest delay, and the
#: delay after 401/403 (a configuration error no quick retry fixes).
HTTP_BACKOFF_FIRST = 1.0
HTTP_BACKOFF_MAX = 60.0
HTTP_BACKOFF_REFUSED = 300.0


class SyncRefused(OutpostError):
    """The hub answered an HTTP sync request with an error status."""

    code = "sync_refused"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status


class BadAnswer(OutpostError):
    """The hub's answer is not signed by a trusted hub key for this request."""

    code = "bad_answer"


class HubSyncClient:
    """The agent's side of the hub's ``/api/v1/agents/{agent_id}/sync``.
    Every request is signed with the device key and every answer checked
    against ``hub_keys()``, the hub keys the device trusts (shared/requestsig.py)."""

    def __init__(
        self, base_url: str, agent_id: str, key: SigningKey, timeout: float = 60.0, ca_file: str | None = None, clock: Callable[[], float] = time.time,
        *, hub_keys: Callable[[], Mapping[str, PublicKey]],
    ) -> None:
        # httpx logs every request at INFO: one line per batch says nothing the counters do not.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # A short connect timeout: a hub that cannot be reached (a link that is
        # still down) must not hold the only sending thread, and so the MQTT
        # path, for the whole read timeout a large batch may need.
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"), timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)), verify=ssl.create_default_context(cafile=ca_file) if ca_file else True,
        )
        self._prefix = httpx.URL(base_url.rstrip("/")).path.rstrip("/")
        self._path = f"/api/v1/agents/{agent_id}/sync"
        self._agent_id = agent_id
        self._key = key
        self._clock = clock
        self._hub_keys = hub_keys

    def _signed(self, method: str, body: bytes) -> dict[str, str]:
        return {HEADER: sign_request(self._key, self._agent_id, method, self._prefix + self._path, body, self._clock())}

    def cursor(self) -> dict[str, Any]:
        """The hub's cursor for this agent: ``stream`` and ``seq`` (or nulls)."""
        headers = self._signed("GET", b"")
        return self._check(self._client.get(self._path, headers=headers), headers[HEADER])

    def post(self, stream: str, first_seq: str, last_seq: str, envelopes: list[str]) -> dict[str, Any]:
        """Send one batch; returns the hub's answer once it committed it."""
        body = json.dumps({"stream": stream, "first_seq": first_seq, "last_seq": last_seq, "envelopes": envelopes}, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", **self._signed("POST", body)}
        return self._check(self._client.post(self._path, content=body, headers=headers), headers[HEADER])

    def close(self) -> None:
        self._client.close()

    def _check(self, response: httpx.Response, request_header: str) -> dict[str, Any]:
        if response.status_code != 200:
            try:
                doc = response.json()
            except ValueError:
                doc = None
            error = doc.get("error") if isinstance(doc, dict) else None
            message = error.get("message") if isinstance(error, dict) else response.text[:200]
            raise SyncRefused(response.status_code, str(message))
        # Checked before the body is even parsed: nothing unsigned is acted on.
        try:
            verify_answer(self._hub_keys(), self._agent_id, request_header, 200, response.content, response.headers.get(ANSWER_HEADER))
        except SignatureError as exc:
            raise BadAnswer(f"the hub's answer to {response.request.method} {self._path} is not trusted ({exc.code}): {exc}") from None
        try:
            doc = response.json()
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise SyncRefused(response.status_code, f"not a JSON object: {response.text[:200]}")
        return doc


@dataclass
class HttpPath:
    """What the outbox needs to drain over HTTP.

    ``encode(item)`` gives the envelope the MQTT path would publish for it;
    ``apply_ack`` is the daemon's MQTT ack handler, which every HTTP answer
    goes through too; ``stream_file`` holds the outbox stream id."""

    client: HubSyncClient
    encode: Callable[[PendingResult], bytes]
    apply_ack: Callable[[Ack], None]
    stream_file: Path
    threshold: int = 200
    batch: int = 500
    #: Told the detail of each answer that did not verify (the daemon reports it to the hub).
    on_bad_answer: Callable[[str], None] | None = None


def _uuid7_ms(message_id: str) -> int | None:
    try:
        return int(message_id.replace("-", "")[:12], 16)
    except ValueError:
        return None


def load_stream(path: Path, newest: str | None, now: float) -> tuple[str, str | None]:
    """The outbox stream id and the highest sequence ever sent over HTTP on
    it, from ``path``; a new stream when there is none, when the outbox is
    empty (``newest`` None) or when a stored id is stamped after ``now`` (the
    clock went back: new ids could sort before ones a cursor covers)."""
    doc: dict[str, Any] = {}
    try:
        loaded = json.loads(path.read_text())
        doc = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    stream, high = doc.get("stream"), doc.get("high_water")
    marks = [m for m in (newest, high) if isinstance(m, str)]
    stamps = [_uuid7_ms(m) for m in marks]
    behind = any(t is None or t > now * 1000 for t in stamps)
    if not isinstance(stream, str) or not stream or newest is None or behind:
        if behind:
            log.warning("the clock is behind the outbox's newest item; starting a new sync stream so no old cursor skips new items")
        stream, high = uuid.uuid4().hex, None
        atomic_write(path, json.dumps({"stream": stream, "high_water": None}).encode())
    return stream, high if isinstance(high, str) else None


@dataclass
class _InFlight:
    item: PendingResult
    sent_at: float | None = None  # time.monotonic() of the last send
    sends: int = 0


class Sync:
    """The outbox drain loop; see the module docstring.

    ``publish(item)`` sends one result and returns False when it could not
    (disconnected), or raises :class:`ProtocolError` (``PayloadTooLarge``)
    when the item can never be sent: it is then set aside (status failed,
    kept for inspection) and the items behind it go on. ``is_connected()``
    says whether sending is worth trying.
    """

    def __init__(
        self,
        outbox: Outbox,
        publish: Callable[[PendingResult], bool],
        is_connected: Callable[[], bool],
        clock: Clock,
        *,
        resend_after: float = 10.0,
        window: int = 100,
        count: Callable[[str], None] = lambda name: None,
        http: HttpPath | None = None,
    ) -> None:
        self.outbox = outbox
        self._publish = publish
        self._is_connected = is_connected
        self.clock = clock
        self.resend_after = resend_after
        self.window = window
        self._count = count
        self._lock = threading.Lock()
        self._in_flight: dict[str, _InFlight] = {}
        self._resend_requested = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._http = http
        self._http_retry_at = 0.0  # time.monotonic() before which HTTP is not tried
        self._http_delay = HTTP_BACKOFF_FIRST
        self._http_failures = 0  # in a row
        self._http_refused = False  # the last attempt got 401/403: a reconnect does not cut its wait
        self._http_batch_size = http.batch if http is not None else 0
        self._stream: str | None = None
        self._high_water: str | None = None
        self._resumed = False

    def start(self) -> None:
        if self._http is not None:
            self._stream, self._high_water = load_stream(self._http.stream_file, self.outbox.newest_message_id(), self.clock.now())
            self._resumed = False
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._http is not None:
            self._http.client.close()

    def wake(self) -> None:
        """A new result is in the outbox: look now."""
        self._wake.set()

    def resend_all(self) -> None:
        """Send everything in flight again (after a reconnect). The network
        is back, so a backlog that built up while it was away goes over HTTP
        now, not after the backoff its failed attempts meanwhile grew."""
        with self._lock:
            self._resend_requested = True
            if not self._http_refused:
                self._http_retry_at, self._http_delay = 0.0, HTTP_BACKOFF_FIRST
        self._wake.set()

    def on_ack(self, assignment_ids: Iterable[str]) -> int:
        """The hub committed these results: mark them done. Returns how many
        were still pending (repeated or unknown acks change nothing)."""
        ids = list(assignment_ids)
        changed = self.outbox.ack(ids, self.clock.now())
        with self._lock:
            for aid in ids:
                self._in_flight.pop(aid, None)
        self._count_n("results.acked", changed)
        self._wake.set()
        return changed

    def on_refused(self, assignment_ids: Iterable[str]) -> int:
        """The hub recorded these results as rejected and will never apply
        them (the ack's ``refused_ids``): set them aside (status failed, kept
        for inspection) instead of re-sending them. Returns how many changed."""
        ids = list(assignment_ids)
        changed = self.outbox.set_aside(ids, self.clock.now())
        with self._lock:
            for aid in ids:
                self._in_flight.pop(aid, None)
        if changed:
            log.warning("the hub refused %d result(s) for good (%s); set aside, see the hub's rejected messages", changed, ", ".join(ids[:5]))
        self._count_n("results.refused", changed)
        self._wake.set()
        return changed

    def pending(self) -> int:
        """Results not yet acknowledged (in flight or waiting)."""
        return self.outbox.depth()

    def in_flight(self) -> list[str]:
        with self._lock:
            return list(self._in_flight)

    def claims(self) -> list[PendingResult]:
        """The outbox claims this loop holds (in flight): the daemon renews their leases."""
        with self._lock:
            return [entry.item for entry in self._in_flight.values()]

    def alive(self) -> bool:
        """True while the drain thread runs (the watchdog's check)."""
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        timeout = 0.0  # the first pass at once: there may be a backlog
        while not self._stopping.is_set():
            self._wake.wait(timeout)
            # Cleared before the pass, so a wake() during it is not lost.
            self._wake.clear()
            try:
                timeout = self._step()
            except Exception:  # this thread must outlive any one bad item or error
                log.exception("sending the outbox failed; retrying")
                self._count("errors.sync")
                self._stopping.wait(1.0)
                timeout = 0.0

    def _step(self) -> float:
        """One pass; returns how long to sleep before the next unless woken."""
        if self._http is not None and time.monotonic() >= self._http_retry_at and self.outbox.depth() >= self._http.threshold:
            self._http_drain()
        if not self._is_connected():
            return self._http_wait()  # a reconnect wakes the loop (resend_all)
        with self._lock:
            if self._resend_requested:
                for entry in self._in_flight.values():
                    entry.sent_at = None
                self._resend_requested = False
        self._fill_window()
        now = time.monotonic()
        with self._lock:
            due = [e for e in self._in_flight.values() if e.sent_at is None or now - e.sent_at >= self.resend_after]
        for entry in due:  # oldest first: the dict keeps claim order
            if self._stopping.is_set():
                return IDLE_WAIT
            try:
                sent = self._publish(entry.item)
            except ProtocolError as exc:
                self._set_aside_unsendable(entry.item, exc)
                continue
            if not sent:
                return IDLE_WAIT  # disconnected meanwhile: the reconnect resends
            entry.sent_at = now
            entry.sends += 1
            self._count("results.sent" if entry.sends == 1 else "results.resent")
            log.debug("result %s sent (send %d)", entry.item.assignment_id, entry.sends)
        return self._next_wake()

    def _set_aside_unsendable(self, item: PendingResult, exc: ProtocolError) -> None:
        """An item ``publish`` can never send (over ``max_message_bytes``):
        parked as failed, kept for inspection, so the items behind it go on."""
        log.error("outbox item %s cannot be sent and is set aside (see outpost-agent queue ls): %s", item.assignment_id, exc)
        self.outbox.set_aside([item.assignment_id], self.clock.now())
        with self._lock:
            self._in_flight.pop(item.assignment_id, None)
        self._count("results.set_aside")

    def _next_wake(self) -> float:
        """Seconds to the next known due time: the earliest resend deadline
        of what is in flight, or the HTTP retry while a backlog waits for it."""
        now = time.monotonic()
        with self._lock:
            sent = [e.sent_at for e in self._in_flight.values() if e.sent_at is not None]
        wake = self._http_wait()
        if sent:
            wake = min(wake, max(0.0, min(sent) + self.resend_after - now))
        return wake

    def _http_wait(self) -> float:
        """Seconds to the end of the HTTP backoff (capped by IDLE_WAIT)."""
        if self._http is None:
            return IDLE_WAIT
        return max(0.0, min(IDLE_WAIT, self._http_retry_at - time.monotonic())) if self._http_retry_at > time.monotonic() else IDLE_WAIT

    # --- HTTP ------------------------------------------------------------

    def _http_drain(self) -> None:
        """Send batches until the outbox is empty; on an error, back off and
        leave the rest to MQTT for now."""
        try:
            if not self._resumed:
                self._resume()
            while not self._stopping.is_set() and self._http_batch():
                self._http_failures = 0
            self._http_delay = HTTP_BACKOFF_FIRST
        except (httpx.HTTPError, OutpostError) as exc:
            self._count("errors.http_sync")
            if isinstance(exc, BadAnswer):
                self._count("security.bad_answer")
                log.warning("SECURITY: %s; nothing was dropped, the outbox goes over MQTT", exc)
                if self._http is not None and self._http.on_bad_answer is not None:
                    self._http.on_bad_answer(str(exc))
            if isinstance(exc, SyncRefused) and exc.status == 413 and self._http_batch_size > 1:
                self._http_batch_size = max(1, self._http_batch_size // 2)
                log.warning("hub refused an HTTP sync batch as too large; trying %d items per batch (%s)", self._http_batch_size, exc)
                self._wake.set()  # the smaller batch at once
                return
            self._http_refused = isinstance(exc, SyncRefused) and exc.status in (401, 403)
            delay = HTTP_BACKOFF_REFUSED if self._http_refused else self._http_delay
            self._http_delay = min(self._http_delay * 2, HTTP_BACKOFF_MAX)
            self._http_retry_at = time.monotonic() + delay
            self._http_failures += 1
            # A device offline for days fails every minute: say so at the
            # start of a streak and then every tenth time, not each time.
            level = logging.WARNING if self._http_failures % 10 == 1 else logging.DEBUG
            log.log(level, "HTTP sync failed (%s, %d in a row); the outbox goes over MQTT, HTTP is tried again in %.0fs", exc, self._http_failures, delay)

    def _resume(self) -> None:
        """Skip what the hub committed before this process started (its
        cursor on our stream): a batch acknowledged too late for us to see."""
        assert self._http is not None
        cursor = self._http.client.cursor()
        seq = cursor.get("seq")
        if cursor.get("stream") == self._stream and isinstance(seq, str):
            keys = self.outbox.ack_through(seq, self.clock.now())
            with self._lock:
                for key in keys:
                    self._in_flight.pop(key, None)
            if keys:
                log.info("the hub had already committed %d outbox item(s) up to %s; marked done", len(keys), seq)
        self._resumed = True

    def _http_batch(self) -> bool:
        """Send the oldest pending items as one batch; False when there were none."""
        http = self._http
        assert http is not None and self._stream is not None
        # The oldest pending items, those in flight over MQTT included (they
        # are the oldest): no newer item may reach the hub before them.
        items = self.outbox.oldest(self._http_batch_size)
        if not items:
            return False
        keys: list[str] = []
        envelopes: list[str] = []
        for item in items:
            try:
                envelopes.append(http.encode(item).decode())
            except OutpostError as exc:  # too large to send at all: it would block everything behind it
                log.error("outbox item %s cannot be sent and is set aside: %s", item.assignment_id, exc)
                self.outbox.set_aside([item.assignment_id], self.clock.now())
                with self._lock:
                    self._in_flight.pop(item.assignment_id, None)
                continue
            keys.append(item.assignment_id)
        if not envelopes:
            return True
        last = items[-1].message_id
        if self._high_water is None or last > self._high_water:
            # Written before sending: a later start compares it with the clock.
            atomic_write(http.stream_file, json.dumps({"stream": self._stream, "high_water": last}).encode())
            self._high_water = last
        answer = http.client.post(self._stream, items[0].message_id, last, envelopes)
        http.apply_ack(Ack.from_dict(answer))
        refused = self._refused(answer, keys)
        if refused:
            self.outbox.set_aside(refused, self.clock.now())
        # The hub committed the whole batch (its cursor covers it): an item it
        # neither acknowledged nor refused has no id to acknowledge by.
        self.on_ack([k for k in keys if k not in refused])
        with self._lock:
            for key in refused:
                self._in_flight.pop(key, None)
        self._count_n("results.sent_http", len(keys))
        return True

    @staticmethod
    def _refused(answer: dict[str, Any], keys: list[str]) -> set[str]:
        refused: set[str] = set()
        for entry in answer.get("refused") or ():
            index = entry.get("index") if isinstance(entry, dict) else None
            if isinstance(index, int) and 0 <= index < len(keys):
                refused.add(keys[index])
                log.warning("the hub refused outbox item %s for good (%s: %s); set aside", keys[index], entry.get("code"), entry.get("detail"))
        return refused

    def _fill_window(self) -> None:
        while True:
            with self._lock:
                if len(self._in_flight) >= self.window:
                    return
            item = self.outbox.claim()
            if item is None:
                return
            with self._lock:
                self._in_flight[item.assignment_id] = _InFlight(item)

    def _count_n(self, name: str, n: int) -> None:
        for _ in range(n):
            self._count(name)
