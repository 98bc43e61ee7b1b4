"""What the runner keeps about a job besides scheduling it: its abort flag,
agent events it emits, the shape of a failed result and its folder name.
The ``JobContext`` a job gets lives in its own process
(:class:`agent.jobhost.ChildContext`)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
from collections.abc import Mapping
from typing import Any

from shared.messages import AGENT_EVENT_NAME_RE, MAX_AGENT_EVENT_PAYLOAD_BYTES, AgentEvent, Assign, Result
from shared.messages import JobError as ErrorBody

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class Run:
    """A started assignment: its abort flag and why it was set."""

    def __init__(self, assignment_id: str) -> None:
        self.assignment_id = assignment_id
        self.abort_flag = threading.Event()
        self.reason: str | None = None
        self.detail = ""

    def abort(self, reason: str, detail: str = "") -> None:
        if self.reason is None:
            self.reason, self.detail = reason, detail
        self.abort_flag.set()


def make_agent_event(name: str, data: Mapping[str, Any] | None, now: float) -> AgentEvent:
    """A new agent event, checked as the hub will check it; ``ValueError``
    names the problem."""
    if not isinstance(name, str) or not AGENT_EVENT_NAME_RE.fullmatch(name):
        raise ValueError(f"event name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    payload = dict(data or {})
    try:
        size = len(json.dumps(payload, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"event {name!r}: the data is not JSON: {exc}") from None
    if size > MAX_AGENT_EVENT_PAYLOAD_BYTES:
        raise ValueError(f"event {name!r}: the data is {size} bytes, over {MAX_AGENT_EVENT_PAYLOAD_BYTES}; send a reference, not the data")
    return AgentEvent(secrets.token_hex(16), name, payload, now)


def failed(assign: Assign, code: str, message: str, retryable: bool, started_at: float | None = None, finished_at: float | None = None) -> Result:
    """A failed Result for ``assign``."""
    return Result(assign.assignment_id, assign.try_number, "failed", None, ErrorBody(code, message, retryable), started_at, finished_at)


def dir_name(assignment_id: str) -> str:
    """A file-name-safe folder name for an assignment id from the wire."""
    if _SAFE_NAME.fullmatch(assignment_id):
        return assignment_id
    return "h-" + hashlib.sha256(assignment_id.encode()).hexdigest()[:32]
