"""Drains the outbox to the hub: results are sent until the hub acknowledges them.

The rule (ARCHITECTURE.md, "Delivery contract", point 3): a result leaves the
outbox only when an ``ack`` naming its assignment id arrives; until then it
is sent again every ``resend_after`` seconds and after every reconnect. Sends
go oldest first, with at most ``window`` results in flight (claimed in the
outbox, sent, not yet acknowledged), so a device that was offline for days
catches up in order without flooding the broker. Each result travels with the
HLC stamp taken when its job finished, not the time of sending.

Only the in-flight bookkeeping (last send time) lives in memory. After a
crash the outbox's claims return to ready at start-up and everything not
acknowledged is sent again: the hub applies results idempotently.

Only MQTT is used for now; the HTTP bulk path for large backlogs is a later
issue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from agent.queues import Outbox, PendingResult
from shared.clock import Clock

log = logging.getLogger(__name__)

#: How often the loop looks for work when nothing wakes it.
POLL = 0.2


@dataclass
class _InFlight:
    item: PendingResult
    sent_at: float | None = None  # time.monotonic() of the last send
    sends: int = 0


class Sync:
    """The outbox drain loop; see the module docstring.

    ``publish(item)`` sends one result and returns False when it could not
    (disconnected); ``is_connected()`` says whether sending is worth trying.
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

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="sync", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wake(self) -> None:
        """A new result is in the outbox: look now."""
        self._wake.set()

    def resend_all(self) -> None:
        """Send everything in flight again (after a reconnect)."""
        with self._lock:
            self._resend_requested = True
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
        while not self._stopping.is_set():
            self._wake.wait(POLL)
            self._wake.clear()
            try:
                self._step()
            except Exception:  # this thread must outlive any one bad item or error
                log.exception("sending the outbox failed; retrying")
                self._count("errors.sync")
                self._stopping.wait(1.0)

    def _step(self) -> None:
        if not self._is_connected():
            return
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
            if self._stopping.is_set() or not self._publish(entry.item):
                return  # disconnected meanwhile: the reconnect resends
            entry.sent_at = now
            entry.sends += 1
            self._count("results.sent" if entry.sends == 1 else "results.resent")
            log.debug("result %s sent (send %d)", entry.item.assignment_id, entry.sends)

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
