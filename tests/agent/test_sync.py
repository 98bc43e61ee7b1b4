"""The outbox drain loop: results are sent until acknowledged, oldest first.

The loop's collaborators are injected callables; here ``publish`` records what
would go on the wire and can be switched to failing, as when the link drops.
The end-to-end version over a real broker is in test_daemon.py.
"""

from __future__ import annotations

import threading
import time

import pytest

from agent.queues import Outbox, PendingResult
from agent.sync import Sync
from shared.hlc import HLC
from shared.messages import Result

from .conftest import wait_until


class Wire:
    def __init__(self) -> None:
        self.sent: list[PendingResult] = []
        self.up = threading.Event()
        self.up.set()
        self.lock = threading.Lock()

    def publish(self, item: PendingResult) -> bool:
        if not self.up.is_set():
            return False
        with self.lock:
            self.sent.append(item)
        return True

    def ids(self) -> list[str]:
        with self.lock:
            return [item.assignment_id for item in self.sent]


@pytest.fixture
def outbox(state_dir):
    queue = Outbox(state_dir / "outbox.sqlite3")
    yield queue
    queue.close()


@pytest.fixture
def wire():
    return Wire()


@pytest.fixture
def make_sync(outbox, wire, manual_clock):
    loops: list[Sync] = []

    def build(resend_after: float = 30.0, window: int = 100) -> Sync:
        sync = Sync(outbox, wire.publish, wire.up.is_set, manual_clock, resend_after=resend_after, window=window)
        sync.start()
        loops.append(sync)
        return sync

    yield build
    for sync in loops:
        sync.stop()


def put(outbox: Outbox, aid: str, wall_ms: int = 1000) -> None:
    outbox.put_result(Result(aid, 1, "success", aid), HLC(wall_ms, 0, "dev-1"))


def test_results_are_sent_oldest_first_with_their_finish_stamp(outbox, wire, make_sync):
    for i in range(5):
        put(outbox, f"a-{i}", wall_ms=1000 + i)
    make_sync()
    wait_until(lambda: len(wire.sent) == 5, what="five sends")
    assert wire.ids() == [f"a-{i}" for i in range(5)]
    assert [item.hlc.wall_ms for item in wire.sent] == [1000 + i for i in range(5)]


def test_result_is_resent_until_acknowledged_then_never_again(outbox, wire, make_sync):
    sync = make_sync(resend_after=0.2)
    put(outbox, "a-1")
    sync.wake()
    wait_until(lambda: wire.ids().count("a-1") >= 3, what="re-sends")
    assert outbox.depth() == 1  # still not done: no ack yet
    assert sync.on_ack(["a-1"]) == 1
    assert outbox.depth() == 0 and sync.pending() == 0
    sent = len(wire.sent)
    time.sleep(0.5)
    assert len(wire.sent) == sent


def test_ack_for_another_result_does_not_complete_this_one(outbox, wire, make_sync):
    sync = make_sync()
    put(outbox, "a-1")
    put(outbox, "a-2")
    sync.wake()
    wait_until(lambda: len(wire.sent) == 2)
    assert sync.on_ack(["a-2", "not-mine"]) == 1
    assert sync.in_flight() == ["a-1"] and outbox.depth() == 1


def test_reconnect_resends_everything_in_flight_at_once(outbox, wire, make_sync):
    sync = make_sync(resend_after=60)
    put(outbox, "a-1")
    put(outbox, "a-2")
    sync.wake()
    wait_until(lambda: len(wire.sent) == 2)
    sync.resend_all()
    wait_until(lambda: wire.ids() == ["a-1", "a-2", "a-1", "a-2"], what="resend in order")


def test_nothing_is_sent_while_disconnected_and_all_of_it_after(outbox, wire, make_sync):
    wire.up.clear()
    sync = make_sync()
    put(outbox, "a-1")
    sync.wake()
    time.sleep(0.5)
    assert wire.sent == [] and outbox.depth() == 1
    wire.up.set()
    sync.resend_all()
    wait_until(lambda: wire.ids() == ["a-1"], what="send after reconnect")


def test_in_flight_window_bounds_unacknowledged_sends(outbox, wire, make_sync):
    for i in range(5):
        put(outbox, f"a-{i}")
    sync = make_sync(window=2)
    wait_until(lambda: len(wire.sent) == 2)
    time.sleep(0.3)
    assert wire.ids() == ["a-0", "a-1"]
    sync.on_ack(["a-0"])
    wait_until(lambda: wire.ids() == ["a-0", "a-1", "a-2"], what="window slides by one")


def test_results_left_in_flight_by_a_dead_process_are_sent_again(state_dir, wire, manual_clock):
    first = Outbox(state_dir / "outbox.sqlite3")
    put(first, "a-1")
    assert first.claim() is not None  # in flight when the process died
    first.close()
    second = Outbox(state_dir / "outbox.sqlite3")
    second.release_expired_claims(0)  # what the daemon does at start-up
    sync = Sync(second, wire.publish, wire.up.is_set, manual_clock)
    sync.start()
    try:
        wait_until(lambda: wire.ids() == ["a-1"], what="resend after restart")
    finally:
        sync.stop()
        second.close()


def test_a_result_the_hub_refuses_for_good_is_set_aside_and_never_sent_again(outbox, wire, make_sync):
    sync = make_sync(resend_after=0.2)
    put(outbox, "stray")
    put(outbox, "a-1")
    sync.wake()
    wait_until(lambda: wire.ids().count("stray") >= 2, what="re-sends")
    assert sync.on_refused(["stray"]) == 1
    assert sync.on_refused(["stray"]) == 0  # a repeated refusal changes nothing
    entry = outbox.get("stray")
    assert entry is not None and entry.status == "failed" and entry.data["result"]["output"] == "stray"  # kept for inspection
    assert sync.in_flight() == ["a-1"] and outbox.depth() == 1
    sent = wire.ids().count("stray")
    wait_until(lambda: wire.ids().count("a-1") >= 3, what="the other result still re-sent")
    assert wire.ids().count("stray") == sent


def test_an_idle_loop_sleeps_until_the_next_resend_is_due(outbox, wire, make_sync):
    """No polling: nothing in flight, nothing is looked at; one result in
    flight is re-sent at its deadline, not earlier."""
    sync = make_sync(resend_after=0.6)
    time.sleep(0.3)
    put(outbox, "a-1")
    time.sleep(0.3)
    assert wire.ids() == []  # not woken: only IDLE_WAIT would find it
    sync.wake()
    wait_until(lambda: wire.ids() == ["a-1"], what="the send")
    first = time.monotonic()
    wait_until(lambda: wire.ids().count("a-1") == 2, what="the re-send")
    assert 0.5 <= time.monotonic() - first <= 1.5
