"""Claim leases on real SQLite files with a manual clock: renewal keeps a
live claim, a claim nobody renews returns to ready, and a jumping device
clock never releases a claim the agent still holds."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from agent.queues import Inbox, Outbox
from firmware_jobs import registry as builtin
from shared.clock import ManualClock
from shared.hlc import HLC
from shared.messages import Assign, Result

from .conftest import wait_until

LEASE = 60.0


def assign(aid: str, **params: Any) -> Assign:
    return Assign(aid, "dag", "run", "task", 1, "noop", params or {"echo": aid})


@pytest.fixture
def inbox(state_dir, manual_clock):
    queue = Inbox(state_dir / "inbox.sqlite3", "NORMAL", manual_clock)
    yield queue
    queue.close()


def lock_time(queue: Inbox | Outbox, message_id: str) -> int:
    return queue._q.get(message_id).lock_time  # type: ignore[union-attr]


def test_claims_are_stamped_with_the_agents_clock(inbox, manual_clock):
    inbox.put(assign("a"))
    claimed = inbox.claim()
    assert lock_time(inbox, claimed.message_id) == int(manual_clock.now() * 1e9)  # not litequeue's wall clock


def test_unrenewed_claim_returns_to_ready_after_its_lease_and_a_renewed_one_does_not(inbox, manual_clock):
    for aid in ("orphan", "alive"):
        inbox.put(assign(aid))
    orphan, alive = inbox.claim(), inbox.claim()
    manual_clock.advance(LEASE * 0.9)
    assert inbox.renew([alive]) == 1
    assert inbox.release_expired_claims(LEASE) == 0  # neither is older than the lease yet
    manual_clock.advance(LEASE * 0.2)
    assert inbox.release_expired_claims(LEASE) == 1  # the orphan's lease ran out; "alive" was renewed
    assert inbox.get("orphan").status == "ready" and inbox.get("alive").status == "claimed"
    again = inbox.claim()
    assert again.assignment_id == "orphan" and again.claim_id == orphan.claim_id + 1
    assert inbox.done(orphan) is False  # the old holder cannot finish it any more
    assert inbox.renew([orphan]) == 0  # nor keep it alive
    assert inbox.done(again) and inbox.done(alive)


def test_clock_jumping_forward_never_releases_a_claim_that_is_still_held(inbox, manual_clock):
    inbox.put(assign("running"))
    inbox.put(assign("orphan"))
    running, _orphan = inbox.claim(), inbox.claim()
    manual_clock.advance(10 * 365 * 86400)  # NTP finally synced a device that booted in 2016
    assert inbox.release_expired_claims(LEASE, keep=[running]) == 1
    assert inbox.get("running").status == "claimed" and inbox.get("orphan").status == "ready"


def test_clock_jumping_back_does_not_pin_an_orphan_claim_for_years(inbox, manual_clock):
    inbox.put(assign("orphan"))
    inbox.put(assign("held"))
    _orphan, held = inbox.claim(), inbox.claim()
    manual_clock.advance(-5 * 86400)  # the clock went back five days
    # Lock times are now far in the future: a lease ahead of now counts as expired.
    assert inbox.release_expired_claims(LEASE, keep=[held]) == 1
    assert inbox.get("orphan").status == "ready" and inbox.get("held").status == "claimed"
    assert inbox.renew([held]) == 1  # renewing re-anchors the lock time on the new clock
    assert lock_time(inbox, held.message_id) == int(manual_clock.now() * 1e9)


def test_start_up_releases_every_claim_whatever_its_lock_time(inbox, manual_clock):
    inbox.put(assign("a"))
    inbox.claim()
    assert inbox.release_expired_claims(LEASE) == 0  # fresh: a running process keeps it
    assert inbox.release_expired_claims(0) == 1  # the process that held it is dead


def test_outbox_claims_in_flight_are_renewed_and_expire_the_same_way(state_dir, manual_clock):
    outbox = Outbox(state_dir / "outbox.sqlite3", "NORMAL", manual_clock)
    try:
        for aid in ("r1", "r2"):
            outbox.put_result(Result(aid, 1, "success", {"ok": 1}, None, 1.0, 2.0), HLC(1, 0, "dev"))
        in_flight, lost = outbox.claim(), outbox.claim()
        manual_clock.advance(LEASE + 1)
        assert outbox.renew([in_flight]) == 1
        assert outbox.release_expired_claims(LEASE) == 1
        assert [(e.key, e.status) for e in outbox.items()] == [("r1", "claimed"), ("r2", "ready")]
        assert outbox.claim().assignment_id == lost.assignment_id
    finally:
        outbox.close()


class _FlakyRegistry:
    """The built-in jobs, except that looking up ``crash-once`` the first
    time raises an error the runner does not expect: its worker gives up on
    the assignment and leaves the claim behind, as a worker that died would."""

    def __init__(self) -> None:
        self.lookups: dict[str, int] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Any:
        with self._lock:
            self.lookups[name] = self.lookups.get(name, 0) + 1
            first = self.lookups[name] == 1
        if name == "crash-once" and first:
            raise RuntimeError("worker died")
        return builtin.get("noop" if name == "crash-once" else name)

    def catalog(self) -> list[dict[str, Any]]:
        return builtin.catalog()


def test_running_agent_recovers_a_claim_its_worker_dropped_and_keeps_live_ones(make_agent, hub, manual_clock):
    registry = _FlakyRegistry()
    agent = make_agent(clock=manual_clock, registry=registry, claim_lease=1.0)
    hub.assign("long", params={"echo": "l", "sleep": 1.5})
    hub.wait_for("started", "long")
    hub.assign("dropped", job_type="crash-once", params={"echo": "d"})
    wait_until(lambda: agent.counters.snapshot().get("errors.runner"), 5, "the dropped claim")
    assert agent.inbox.get("dropped").status == "claimed"  # stuck until its lease runs out
    manual_clock.advance(3600)  # the lease of everything runs out, and the clock jumps an hour
    result = hub.wait_for("result", "dropped", timeout=10)[0]
    assert result.status == "success" and registry.lookups["crash-once"] == 2
    assert agent.counters.snapshot().get("claims.expired", 0) >= 1
    assert hub.wait_for("result", "long")[0].status == "success"
    time.sleep(0.5)
    assert len(hub.of("started", "long")) == 1  # renewed while it ran: never released, never run twice
    assert len(hub.of("started", "dropped")) == 1
