"""The outbox's HTTP path: large backlogs drain in ordered batches over real
HTTP (a small scripted server on loopback stands in for the hub; the real
hub endpoint is exercised in tests/hub/test_sync_api.py and tests/e2e), small
ones stay on MQTT, errors fall back to MQTT without breaking order, refused
items are set aside, the stream id protects the cursor, and an answer not
signed by a trusted hub key for that very request (a forged ack or cursor)
changes nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.queues import Outbox
from agent.sync import HttpPath, HubSyncClient, Sync, load_stream
from shared.requestsig import ANSWER_HEADER, HEADER, request_signature, sign_answer
from shared.signing import SigningKey
from shared.clock import SystemClock
from shared.envelope import Envelope, decode, encode
from shared.frames import unsigned_part
from shared.hlc import HLC
from shared.messages import Ack, Result

from .conftest import wait_until
from .test_sync import Wire

Policy = Callable[[dict[str, Any], list[str]], tuple[int, dict[str, Any]]]
#: The fake hub's signing key; the agent under test trusts it.
HUB_KEY = SigningKey.generate()


def ack_all(batch: dict[str, Any], ids: list[str]) -> tuple[int, dict[str, Any]]:
    return 200, {"assignment_ids": ids, "event_ids": [], "refused": [], "cursor": {"stream": batch["stream"], "seq": batch["last_seq"]}}


class FakeHubServer:
    """A real HTTP server on loopback answering sync batches by ``policy``."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.policy: Policy = ack_all
        #: How answers are signed: "hub" (properly), "none", "untrusted" (another key), "stale" (bound to an earlier request).
        self.signing = "hub"
        #: The methods whose answers are signed as ``signing`` says (the others properly).
        self.forge = {"GET", "POST"}
        self.cursor: dict[str, Any] = {"stream": None, "seq": None}
        self.lock = threading.Lock()
        self.gets = 0
        outer = self
        previous: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                request = self.headers[HEADER]
                signing = outer.signing if self.command in outer.forge else "hub"
                bound_to = previous[0] if signing == "stale" and previous else request
                previous[:] = [request]
                key = SigningKey.generate() if signing == "untrusted" else HUB_KEY
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if signing != "none":
                    self.send_header(ANSWER_HEADER, sign_answer(key, "dev-1", request_signature(bound_to), status, data))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                with outer.lock:
                    outer.gets += 1
                    cursor = dict(outer.cursor)
                self._answer(200, cursor)

            def do_POST(self) -> None:
                batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                ids = [decode(unsigned_part(e.encode())).body.assignment_id for e in batch["envelopes"]]  # type: ignore[union-attr]
                with outer.lock:
                    outer.batches.append(ids)
                    status, body = outer.policy(batch, ids)
                self._answer(status, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def sent(self) -> list[list[str]]:
        with self.lock:
            return [list(b) for b in self.batches]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeHubServer]:
    made = FakeHubServer()
    yield made
    made.close()


@pytest.fixture
def outbox(state_dir: Path) -> Iterator[Outbox]:
    queue = Outbox(state_dir / "outbox.sqlite3")
    yield queue
    queue.close()


@pytest.fixture
def make_sync(outbox: Outbox, state_dir: Path) -> Iterator[Callable[..., tuple[Sync, Wire]]]:
    loops: list[Sync] = []
    counts: list[str] = []  # every counter the loops bump, in order

    def build(url: str, threshold: int = 10, batch: int = 10, mqtt_up: bool = True, reported: list[str] | None = None) -> tuple[Sync, Wire]:
        wire = Wire()
        if not mqtt_up:
            wire.up.clear()

        def apply_ack(ack: Ack) -> None:
            sync.on_ack(ack.assignment_ids)

        path = HttpPath(
            HubSyncClient(url, "dev-1", SigningKey.generate(), timeout=5, hub_keys=lambda: {HUB_KEY.kid: HUB_KEY.public}),
            lambda item: encode(Envelope(item.result, sender="dev-1", hlc=item.hlc)),
            apply_ack, state_dir / "outbox.stream", threshold, batch, reported.append if reported is not None else None,
        )
        sync = Sync(outbox, wire.publish, wire.up.is_set, SystemClock(), resend_after=60, http=path, count=counts.append)
        sync.start()
        loops.append(sync)
        return sync, wire

    build.counts = counts  # type: ignore[attr-defined]
    yield build
    for sync in loops:
        sync.stop()


def fill(outbox: Outbox, n: int) -> list[str]:
    ids = [f"a-{i:03d}" for i in range(n)]
    for i, aid in enumerate(ids):
        outbox.put_result(Result(aid, 1, "success", i), HLC(1000, i, "dev-1"))
    return ids


def test_a_small_backlog_stays_on_mqtt(outbox: Outbox, server: FakeHubServer, make_sync: Any) -> None:
    ids = fill(outbox, 3)
    _sync, wire = make_sync(server.url, threshold=10)
    wait_until(lambda: wire.ids() == ids, what="MQTT sends")
    time.sleep(0.3)
    assert server.sent() == []


def test_a_large_backlog_drains_over_http_in_order_in_batches(outbox: Outbox, server: FakeHubServer, make_sync: Any) -> None:
    ids = fill(outbox, 25)
    _sync, wire = make_sync(server.url, threshold=10, batch=10, mqtt_up=False)
    wait_until(lambda: outbox.depth() == 0, what="outbox drained")
    assert server.sent() == [ids[:10], ids[10:20], ids[20:]]
    assert wire.sent == []


def test_an_http_error_falls_back_to_mqtt_and_the_next_batch_starts_with_what_mqtt_has_in_flight(
    outbox: Outbox, server: FakeHubServer, make_sync: Any,
) -> None:
    ids = fill(outbox, 150)
    calls = {"n": 0}

    def fail_once(batch: dict[str, Any], sent: list[str]) -> tuple[int, dict[str, Any]]:
        calls["n"] += 1
        if calls["n"] == 1:
            return 503, {"error": {"code": "database_unavailable", "message": "try later"}}
        return ack_all(batch, sent)

    server.policy = fail_once
    _sync, wire = make_sync(server.url, threshold=10, batch=120)
    wait_until(lambda: outbox.depth() == 0, timeout=15, what="outbox drained")
    batches = server.sent()
    # MQTT carried the first claimed items in order while HTTP waited out its backoff...
    assert wire.ids()[:100] == ids[:100]
    # ...and the next HTTP batch began with the oldest of them: no newer item
    # reached the hub over HTTP before an older one still in flight.
    assert batches[0] == ids[:120] and batches[1][0] == ids[0]
    assert [i for b in batches[1:] for i in b] == ids


def test_refused_items_are_set_aside_and_never_sent_again(outbox: Outbox, server: FakeHubServer, make_sync: Any) -> None:
    ids = fill(outbox, 12)

    def refuse_second(batch: dict[str, Any], sent: list[str]) -> tuple[int, dict[str, Any]]:
        status, body = ack_all(batch, [i for i in sent if i != ids[1]])
        body["refused"] = [{"index": sent.index(ids[1]), "code": "unknown_assignment", "detail": "never issued"}] if ids[1] in sent else []
        return status, body

    server.policy = refuse_second
    make_sync(server.url, threshold=10, batch=20, mqtt_up=False)
    wait_until(lambda: outbox.depth() == 0, what="outbox drained")
    assert outbox.get(ids[1]).status == "failed"  # type: ignore[union-attr]
    assert all(outbox.get(i).status == "done" for i in ids if i != ids[1])  # type: ignore[union-attr]
    assert len(server.sent()) == 1


def test_a_batch_the_hub_finds_too_large_is_split(outbox: Outbox, server: FakeHubServer, make_sync: Any) -> None:
    ids = fill(outbox, 20)

    def at_most_four(batch: dict[str, Any], sent: list[str]) -> tuple[int, dict[str, Any]]:
        if len(sent) > 4:
            return 413, {"error": {"code": "batch_too_large", "message": "over sync_max_batch_items (4)"}}
        return ack_all(batch, sent)

    server.policy = at_most_four
    make_sync(server.url, threshold=10, batch=20, mqtt_up=False)
    wait_until(lambda: outbox.depth() == 0, timeout=15, what="outbox drained")
    accepted = [b for b in server.sent() if len(b) <= 4]
    assert [i for b in accepted for i in b] == ids


def test_the_stream_survives_a_restart_but_not_an_empty_outbox_or_a_clock_behind(outbox: Outbox, state_dir: Path) -> None:
    path = state_dir / "outbox.stream"
    now = time.time()
    fill(outbox, 1)
    newest = outbox.newest_message_id()
    first, high = load_stream(path, newest, now)
    assert high is None
    assert load_stream(path, newest, now + 5)[0] == first  # a restart
    assert load_stream(path, None, now)[0] != first  # empty outbox: nothing to protect, start afresh
    second = load_stream(path, newest, now)[0]
    assert load_stream(path, newest, now - 3600)[0] != second  # the clock went back an hour
    path.write_text("garbage")
    assert load_stream(path, newest, now)[0]



@pytest.mark.parametrize("signing", ["none", "untrusted", "stale"])
def test_an_ack_not_signed_by_the_hub_for_this_request_drops_nothing(
    outbox: Outbox, server: FakeHubServer, make_sync: Any, signing: str,
) -> None:
    """Someone in the path of a plain-HTTP hub_url answers a batch with 'all
    committed': unsigned, signed by a key the device does not trust, or with
    the signature of a genuine answer to an earlier request. The device drops
    nothing, counts and reports it, and the items go over MQTT instead."""
    ids = fill(outbox, 12)
    server.signing = signing
    server.forge = {"POST"}  # the cursor (GET, the first request) is answered properly
    reported: list[str] = []
    _sync, wire = make_sync(server.url, threshold=10, batch=20, reported=reported)
    wait_until(lambda: "security.bad_answer" in make_sync.counts, what="the forged answer refused")
    wait_until(lambda: wire.ids() == ids, what="the items sent over MQTT instead")
    assert server.gets == 1 and server.sent()[0] == ids
    assert outbox.depth() == 12
    assert not any(outbox.get(i).status == "done" for i in ids)  # type: ignore[union-attr]
    assert "results.acked" not in make_sync.counts
    assert reported and "not trusted" in reported[0]


def test_a_forged_cursor_skips_nothing_and_the_hubs_own_does(outbox: Outbox, server: FakeHubServer, make_sync: Any, state_dir: Path) -> None:
    """The cursor tells a restarted agent what the hub already has; a forged
    one covering the whole outbox must not make it skip anything."""
    ids = fill(outbox, 12)
    stream, _ = load_stream(state_dir / "outbox.stream", outbox.newest_message_id(), time.time())
    server.cursor = {"stream": stream, "seq": outbox.newest_message_id()}
    server.signing = "untrusted"
    make_sync(server.url, threshold=10, batch=20, mqtt_up=False)
    wait_until(lambda: "security.bad_answer" in make_sync.counts, what="the forged cursor refused")
    assert outbox.depth() == 12 and server.sent() == []
    assert not any(outbox.get(i).status == "done" for i in ids)  # type: ignore[union-attr]

    # The same cursor signed by the hub is applied after the backoff: all it covers is done, nothing is posted.
    server.signing = "hub"
    wait_until(lambda: outbox.depth() == 0, timeout=15, what="the signed cursor applied")
    assert server.sent() == [] and all(outbox.get(i).status == "done" for i in ids)  # type: ignore[union-attr]
