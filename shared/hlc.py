"""Hybrid logical clock (Kulkarni et al., 2014).

An HLC stamp is (wall milliseconds, logical counter, node). It never goes
backwards on a node, it advances past every stamp the node has received, and
stamps compare in one total order. Device clocks are wrong; HLC stamps let
the hub order events from different devices without trusting them.

On the wire a stamp is the string ``"<wall:013d>.<logical:05d>@<node>"`` so
that string order equals stamp order for any wall time before year 2286.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

from shared.errors import ClockSkew

_MAX_LOGICAL = 99_999
_MAX_WALL = 9_999_999_999_999
_WIRE = re.compile(r"([0-9]{13})\.([0-9]{5})@(.+)", re.DOTALL)


@dataclass(frozen=True, order=True, slots=True)
class HLC:
    wall_ms: int
    logical: int
    node: str

    def __str__(self) -> str:
        return f"{self.wall_ms:013d}.{self.logical:05d}@{self.node}"

    @classmethod
    def parse(cls, text: str) -> HLC:
        """Parse the canonical form only, so that string order stays stamp order."""
        match = _WIRE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not an HLC stamp: {text!r} (expected 13 digits, '.', 5 digits, '@', node)")
        return cls(int(match[1]), int(match[2]), match[3])


class HybridClock:
    """A node's hybrid logical clock; thread-safe.

    ``physical_ms`` returns the node's wall time in milliseconds; it is a
    parameter so the clock is pure under test.
    """

    def __init__(self, node: str, physical_ms: Callable[[], int], max_ahead_ms: int | None = None) -> None:
        self.node = node
        self._physical_ms = physical_ms
        #: A received stamp further ahead of our physical clock than this is
        #: refused (``ClockSkew``) instead of dragging our clock, and every
        #: clock that hears from us, into the future.
        self.max_ahead_ms = max_ahead_ms
        self._last = HLC(0, 0, node)
        self._lock = threading.Lock()

    @property
    def last(self) -> HLC:
        return self._last

    def now(self) -> HLC:
        """A stamp for a local or send event."""
        with self._lock:
            wall = max(self._last.wall_ms, self._physical_ms())
            logical = self._last.logical + 1 if wall == self._last.wall_ms else 0
            self._last = self._bump(wall, logical)
            return self._last

    def update(self, received: HLC) -> HLC:
        """Merge a received stamp; returns the stamp of the receive event."""
        with self._lock:
            physical = self._physical_ms()
            ahead = received.wall_ms - physical
            if self.max_ahead_ms is not None and ahead > self.max_ahead_ms:
                raise ClockSkew(f"stamp {received} from {received.node!r} is {ahead / 1000:.1f}s ahead of this clock (limit {self.max_ahead_ms / 1000:.0f}s); not merged")
            wall = max(self._last.wall_ms, received.wall_ms, physical)
            if wall == self._last.wall_ms == received.wall_ms:
                logical = max(self._last.logical, received.logical) + 1
            elif wall == self._last.wall_ms:
                logical = self._last.logical + 1
            elif wall == received.wall_ms:
                logical = received.logical + 1
            else:
                logical = 0
            self._last = self._bump(wall, logical)
            return self._last

    def _bump(self, wall: int, logical: int) -> HLC:
        # The counter is bounded so the wire format keeps its width; running
        # out of counter borrows a millisecond rather than breaking order.
        if logical > _MAX_LOGICAL:
            wall, logical = wall + 1, 0
        if wall > _MAX_WALL:
            raise ClockSkew(f"HLC wall time {wall} is past the wire format's range")
        return HLC(wall, logical, self.node)
