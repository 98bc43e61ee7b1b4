"""``noop``: echo a value back, optionally after a pause.

Used by benchmarks and tests to measure the pipeline without doing work.
Idempotent: it has no effects, so running it twice is the same as once.
"""

from __future__ import annotations

import time
from typing import Any

from firmware_jobs.base import Job, JobAborted, JobContext
from firmware_jobs.registry import register

#: How often a sleeping noop checks ``should_abort``.
_STEP = 0.05


@register
class Noop(Job):
    """Return ``{"echo": params["echo"]}`` after sleeping ``sleep`` seconds."""

    name = "noop"
    version = "1.0"
    description = "Echo a value back after an optional pause; for tests and benchmarks."
    params_schema = {
        "type": "object",
        "properties": {
            "echo": {"description": "Any JSON value, returned unchanged."},
            "sleep": {"type": "number", "minimum": 0, "maximum": 60, "default": 0, "description": "Seconds to wait first."},
        },
        "additionalProperties": False,
    }

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        deadline = time.monotonic() + params.get("sleep", 0)
        while (left := deadline - time.monotonic()) > 0:
            if ctx.should_abort():
                raise JobAborted()
            time.sleep(min(_STEP, left))
        if ctx.should_abort():
            raise JobAborted()
        return {"echo": params.get("echo")}
