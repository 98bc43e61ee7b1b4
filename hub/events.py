"""In-process domain events. Metrics, the dashboard's live updates and the
scheduler's wake-up subscribe here instead of being called inline; a
failing subscriber is logged and never breaks the emitter."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Any, Callable

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], None]

#: Event names emitted by the hub.
RUN_TRIGGERED = "run_triggered"
RUN_FINISHED = "run_finished"
TASK_STATE_CHANGED = "task_state_changed"
#: A hub task finished (the local executor); downstream tasks may be ready.
HUB_TASK_FINISHED = "hub_task_finished"
#: Callback requests were committed (``callback_requests``): the executor runs them.
CALLBACKS_REQUESTED = "callbacks_requested"
RESULT_APPLIED = "result_applied"
#: A task missed its SLA or a run its dagrun_timeout (a ``deadline_misses`` row).
DEADLINE_MISSED = "deadline_missed"
MESSAGE_REJECTED = "message_rejected"
#: A device message did not verify, or a device refused a hub message (a ``security_events`` row).
SECURITY_EVENT = "security_event"
#: A late or conflicting report overrode (or was overridden by) a hub decision: a ``conflicts`` row.
CONFLICT_RECORDED = "conflict_recorded"
#: An asset event was committed (a task's outlet, an agent event, the API): asset-scheduled DAGs may be due.
ASSET_UPDATED = "asset_updated"
AGENT_CHANGED = "agent_changed"
#: An agent's clock went beyond max_clock_skew (``flagged``: True) or came back within it (False).
AGENT_CLOCK_SKEW = "agent_clock_skew"
OUTBOX_WRITTEN = "outbox_written"
#: A rollout started, moved to its next batch, paused, resumed, aborted, failed or finished (``hub.rollouts``).
ROLLOUT_CHANGED = "rollout_changed"


class EventBus:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = defaultdict(list)
        self._lock = threading.Lock()

    def subscribe(self, name: str, handler: Handler) -> None:
        """``name`` "*" receives every event."""
        with self._lock:
            self._handlers[name].append(handler)

    def emit(self, name: str, **data: Any) -> None:
        with self._lock:
            handlers = [*self._handlers.get(name, ()), *self._handlers.get("*", ())]
        for handler in handlers:
            try:
                handler(name, data)
            except Exception:
                log.exception("event subscriber %r failed on %s", handler, name)
