"""The rollout policy of a fleet task: how fast an update spreads.

``AgentOperator(..., target=every_agent(...), rollout=Rollout(...))`` puts
a ``Rollout`` in the task's structure (``to_dict``); the engine
(``hub.rollouts``) reads it back with ``from_dict``. Everything here is
pure: batch sizes, thresholds and maintenance windows are functions of the
policy, the device count and the time given.

Sizes are a count (``10``) or a percentage of the rollout's devices
(``"5%"``, rounded up, at least one device when above zero).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter

from hub.errors import InvalidDag

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
GROWTHS = ("fixed", "exponential")
#: Longest maintenance window (a longer one is no window at all).
_MAX_WINDOW = timedelta(days=7)


def _size(value: Any, name: str, *, zero_ok: bool) -> int | str:
    """A count or "N%" as given, checked; raises InvalidDag."""
    if isinstance(value, bool):
        raise InvalidDag(f"rollout {name} must be a count or a percentage such as '5%', not {value!r}")
    if isinstance(value, int):
        if value < (0 if zero_ok else 1):
            raise InvalidDag(f"rollout {name} must be {'>= 0' if zero_ok else '>= 1'}, got {value}")
        return value
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match is not None and float(match.group(1)) <= 100 and (zero_ok or float(match.group(1)) > 0):
            return f"{float(match.group(1)):g}%"
    raise InvalidDag(f"rollout {name} must be a count or a percentage such as '5%' (0-100), not {value!r}")


def resolve(size: int | str, total: int) -> int:
    """How many devices ``size`` means out of ``total``."""
    if isinstance(size, int):
        return size
    fraction = float(size.rstrip("%")) / 100
    return 0 if fraction <= 0 or total <= 0 else max(1, math.ceil(total * fraction - 1e-9))


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise InvalidDag(f"rollout {name} must be a fraction between 0 and 1 (0.03 for 3%), not {value!r}")
    return float(value)


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise InvalidDag(f"rollout {name} must be a positive timedelta or seconds, not {value!r}")
    return float(value)


@dataclass(frozen=True)
class Window:
    """A maintenance window: opens at each fire of ``cron`` (UTC) and stays
    open ``duration`` seconds."""

    cron: str
    duration: float

    def contains(self, now: datetime) -> bool:
        # A fire exactly at ``now`` counts: croniter's get_prev is strictly before its start.
        naive = now.astimezone(UTC).replace(tzinfo=None)
        opened = croniter(self.cron, naive + timedelta(seconds=1)).get_prev(datetime)
        return naive < opened + timedelta(seconds=self.duration)


def _window(item: Any) -> Window:
    if isinstance(item, Window):
        return item
    if isinstance(item, Mapping):
        item = (item.get("cron"), item.get("duration"))
    if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
        raise InvalidDag(f"a rollout window is a (cron expression, duration) pair, not {item!r}")
    cron, duration = item
    if not isinstance(cron, str) or not croniter.is_valid(cron):
        raise InvalidDag(f"rollout window cron {cron!r} is not a cron expression (minute hour day month weekday)")
    seconds = _seconds(duration, "window duration")
    if seconds > _MAX_WINDOW.total_seconds():
        raise InvalidDag(f"a rollout window lasts at most {_MAX_WINDOW.days} days, not {seconds:g}s")
    return Window(cron, seconds)


@dataclass(frozen=True)
class Rollout:
    """A staged rollout of a fleet task (see docs/dags.md, "Rollouts").

    ``canary`` devices first, then batches of ``batch_size`` (``growth``
    "exponential": each batch doubles, at most ``max_batch``). The rollout
    aborts when failed devices / finished devices exceeds
    ``failure_threshold``; the next batch starts once ``success_threshold``
    of the current one succeeded (default ``1 - failure_threshold``). At
    most ``max_concurrent_per_group`` devices of one group update at once;
    a device starts only inside one of ``windows`` ((cron, duration) pairs,
    UTC; none: any time); devices not done ``deadline`` after the start
    are given up (``timed_out``); ``pause_after_canary`` waits for a manual
    resume after the canary. ``shuffle`` orders the devices by a seeded
    shuffle (``seed``, else one derived from the run) instead of by id."""

    canary: int | str = 1
    batch_size: int | str = "10%"
    growth: str = "fixed"
    max_batch: int | None = None
    failure_threshold: float = 0.05
    success_threshold: float | None = None
    max_concurrent_per_group: int | None = None
    windows: tuple[Any, ...] = ()
    deadline: timedelta | float | None = None
    pause_after_canary: bool = False
    shuffle: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        # Normalised on construction, so a bad policy fails the DAG file at parse.
        set_ = object.__setattr__
        set_(self, "canary", _size(self.canary, "canary", zero_ok=True))
        set_(self, "batch_size", _size(self.batch_size, "batch_size", zero_ok=False))
        if self.growth not in GROWTHS:
            raise InvalidDag(f"rollout growth must be one of {', '.join(GROWTHS)}, not {self.growth!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise InvalidDag(f"rollout max_batch must be a count >= 1, not {self.max_batch!r}")
        set_(self, "failure_threshold", _fraction(self.failure_threshold, "failure_threshold"))
        if self.success_threshold is not None:
            set_(self, "success_threshold", _fraction(self.success_threshold, "success_threshold"))
        cap = self.max_concurrent_per_group
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise InvalidDag(f"rollout max_concurrent_per_group must be a count >= 1, not {cap!r}")
        if isinstance(self.windows, str | bytes | Mapping) or not isinstance(self.windows, Iterable):
            raise InvalidDag(f"rollout windows must be a list of (cron, duration) pairs, not {self.windows!r}")
        set_(self, "windows", tuple(_window(w) for w in self.windows))
        if self.deadline is not None:
            set_(self, "deadline", _seconds(self.deadline, "deadline"))
        for name in ("pause_after_canary", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidDag(f"rollout {name} must be True or False")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InvalidDag(f"rollout seed must be an integer, not {self.seed!r}")

    @property
    def needed_success(self) -> float:
        return 1 - self.failure_threshold if self.success_threshold is None else self.success_threshold

    def batch_target(self, batch: int, total: int) -> int:
        """Devices batch ``batch`` takes (0 is the canary when there is one)."""
        canary = resolve(self.canary, total)
        if canary:
            if batch == 0:
                return canary
            batch -= 1
        size = resolve(self.batch_size, total)
        if self.growth == "exponential":
            size = size * 2 ** min(batch, 40)
            if self.max_batch is not None:
                size = min(size, self.max_batch)
        return max(1, size)

    def has_canary(self, total: int) -> bool:
        return resolve(self.canary, total) > 0

    def in_window(self, now: datetime) -> bool:
        return not self.windows or any(w.contains(now) for w in self.windows)  # type: ignore[attr-defined]

    def too_many_failures(self, failed: int, succeeded: int) -> bool:
        finished = failed + succeeded
        return finished > 0 and failed / finished > self.failure_threshold

    def batch_passed(self, succeeded: int, members: int) -> bool:
        return members > 0 and succeeded >= math.ceil(self.needed_success * members - 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "canary": self.canary, "batch_size": self.batch_size, "growth": self.growth, "max_batch": self.max_batch,
            "failure_threshold": self.failure_threshold, "success_threshold": self.success_threshold,
            "max_concurrent_per_group": self.max_concurrent_per_group,
            "windows": [{"cron": w.cron, "duration": w.duration} for w in self.windows],  # type: ignore[attr-defined]
            "deadline": self.deadline, "pause_after_canary": self.pause_after_canary, "shuffle": self.shuffle, "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Rollout:
        """Raises ``InvalidDag`` for a malformed policy."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise InvalidDag(f"unknown rollout field(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))
