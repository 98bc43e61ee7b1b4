"""Wall time, read in exactly one place so tests can drive it.

Nothing else in Outpost calls ``time.time()``, ``datetime.now()`` or friends;
a test in ``tests/test_architecture.py`` enforces that. Sleeping and monotonic
interval timing (``time.monotonic``) are not wall-clock reads and stay free.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to; for tests and simulations."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def set(self, when: float) -> None:
        with self._lock:
            self._now = when


def utcnow(clock: Clock | None = None) -> datetime:
    """The clock's time as an aware UTC datetime."""
    return datetime.fromtimestamp((clock or SystemClock()).now(), tz=UTC)


def to_datetime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)
