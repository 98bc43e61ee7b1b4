"""``noop``: echo, pause, abort."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import pytest

from firmware_jobs import registry
from firmware_jobs.base import JobAborted
from shared.errors import InvalidParams

if TYPE_CHECKING:  # the ctx fixture's type
    from tests.firmware_jobs.conftest import RecordingContext


def test_noop_echoes_any_json_value(ctx: RecordingContext) -> None:
    job = registry.get("noop")
    for value in (None, 1, "x", [1, {"a": None}], {"k": [True]}):
        assert job.run(ctx, job.validate({"echo": value})) == {"echo": value}
    assert job.run(ctx, job.validate({})) == {"echo": None}


def test_noop_sleeps_for_the_requested_time(ctx: RecordingContext) -> None:
    job = registry.get("noop")
    started = time.monotonic()
    job.run(ctx, job.validate({"sleep": 0.3}))
    assert 0.3 <= time.monotonic() - started < 1.5


def test_noop_sleep_is_bounded() -> None:
    with pytest.raises(InvalidParams, match="above the maximum 60"):
        registry.get("noop").validate({"sleep": 61})
    with pytest.raises(InvalidParams, match="below the minimum 0"):
        registry.get("noop").validate({"sleep": -1})


def test_noop_stops_sleeping_when_asked_to_abort(ctx: RecordingContext) -> None:
    job = registry.get("noop")
    threading.Timer(0.2, ctx.abort.set).start()
    started = time.monotonic()
    with pytest.raises(JobAborted):
        job.run(ctx, job.validate({"sleep": 30}))
    assert time.monotonic() - started < 2
