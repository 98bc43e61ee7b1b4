"""Agent durability policies the daemon applies: back-pressure from the
outbox quota, claim leases, and which settings a config reload may change.

Kept apart from :mod:`agent.daemon`, which only calls these at the right
moments (an assignment arrives, the tick loop runs, SIGHUP).
"""

from __future__ import annotations

import dataclasses
import logging
import threading

from agent.config import AgentSettings
from agent.queues import Claimed, Inbox, Outbox, PendingResult

log = logging.getLogger(__name__)

#: Refusal code of an assignment refused because the outbox is over its quota.
#: Not final for the hub: the assignment stays "sent" and is redelivered.
BACKPRESSURE_CODE = "agent_backpressure"

#: Settings a reload applies to the running agent.
LIVE_SETTINGS = frozenset({
    "labels", "concurrency", "heartbeat_interval", "result_resend_after", "log_level", "command_allowlist",
    "max_message_bytes", "inbox_retention", "claim_lease", "outbox_max_bytes", "stop_timeout", "hub_public_keys",
    "release_public_keys",
})


class Backpressure:
    """Whether the agent takes new work, from the outbox's disk usage.

    Over ``max_bytes`` the agent stops accepting. Before saying so it makes
    room the safe way: acknowledged results are dropped early (the hub has
    them; the inbox still remembers each assignment, so a redelivery is
    still recognised and not run again) and the WAL is emptied. Nothing that
    is not acknowledged is ever dropped: a result always goes in, even over
    the quota.
    """

    def __init__(self, outbox: Outbox, max_bytes: int) -> None:
        self.outbox = outbox
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._reason = ""
        self.usage = 0

    @property
    def reason(self) -> str:
        """Why new work is refused, or "" while it is accepted (as last checked)."""
        return self._reason

    def check(self) -> str:
        """Measure now; returns the reason new work is refused, or ""."""
        with self._lock:
            usage = self.outbox.disk_usage()
            if usage > self.max_bytes:
                pruned = self.outbox.drop_acked()
                self.outbox.truncate_wal()
                usage = self.outbox.disk_usage()
                if pruned:
                    log.info("outbox over its quota: dropped %d acknowledged item(s) early", pruned)
            self.usage = usage
            was = self._reason
            if usage > self.max_bytes:
                self._reason = (f"outbox holds {usage} bytes, over its {self.max_bytes} byte quota "
                                f"({self.outbox.depth()} result(s) waiting for the hub)")
            else:
                self._reason = ""
            if self._reason and not was:
                log.warning("not accepting new assignments: %s", self._reason)
            elif was and not self._reason:
                log.info("accepting new assignments again: outbox at %d of %d bytes", usage, self.max_bytes)
            return self._reason


def renew_and_sweep(
    inbox: Inbox, outbox: Outbox, inbox_claims: list[Claimed], outbox_claims: list[PendingResult], lease: float,
) -> tuple[int, int]:
    """Renew the leases of the claims the agent holds, then release the
    claims whose lease ran out (left by a worker that died). Returns
    (renewed, released)."""
    renewed = inbox.renew(inbox_claims) + outbox.renew(outbox_claims)
    released = inbox.release_expired_claims(lease, keep=inbox_claims) + outbox.release_expired_claims(lease, keep=outbox_claims)
    return renewed, released


def merge_reload(current: AgentSettings, loaded: AgentSettings) -> tuple[AgentSettings, list[str], list[str]]:
    """The settings to run with after a reload: live settings from
    ``loaded``, the rest kept from ``current``. Returns (settings, names of
    live settings that changed, names of settings that changed but need a
    restart)."""
    changed = [f.name for f in dataclasses.fields(AgentSettings) if getattr(current, f.name) != getattr(loaded, f.name)]
    live = [name for name in changed if name in LIVE_SETTINGS]
    restart = [name for name in changed if name not in LIVE_SETTINGS]
    merged = dataclasses.replace(current, **{name: getattr(loaded, name) for name in live})
    return merged, live, restart
