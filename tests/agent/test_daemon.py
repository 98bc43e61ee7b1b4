"""The whole agent against a hub played by the test, over a real broker.

These are the delivery contract's promises as users rely on them: an
assignment runs once however often it is delivered, a result is sent until
the hub acknowledges it, and nothing is lost or run twice across a kill -9.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from agent.queues import Outbox

from .conftest import REPO, wait_until


def test_assignment_runs_and_result_is_marked_done_only_on_ack(make_agent, hub):
    agent = make_agent(result_resend_after=60)
    hub.assign("a-1", params={"echo": 42})
    assert hub.wait_for("accepted", "a-1")[0].duplicate is False
    result = hub.wait_for("result", "a-1")[0]
    assert result.status == "success" and result.output == {"echo": 42} and result.try_number == 1
    time.sleep(0.3)
    assert agent.outbox.depth() == 1 and not agent.drain(0.1)  # sent, not yet acknowledged
    hub.ack("a-1")
    assert agent.drain(5)


def test_duplicate_assignment_runs_once_even_after_its_result_was_acked(make_agent, hub):
    agent = make_agent()
    hub.assign("a-1", params={"sleep": 0.5})
    hub.wait_for("started", "a-1")
    hub.assign("a-1", params={"sleep": 0.5})  # redelivered while running
    assert [a.duplicate for a in hub.wait_for("accepted", "a-1", count=2)] == [False, True]
    hub.wait_for("result", "a-1")
    hub.ack("a-1")
    assert agent.drain(5)
    hub.assign("a-1", params={"sleep": 0.5})  # redelivered after the hub committed the result
    assert hub.wait_for("accepted", "a-1", count=3)[2].duplicate is True
    time.sleep(1.0)
    assert len(hub.of("started", "a-1")) == 1
    assert agent.counters.snapshot()["assign.duplicate"] == 2 and agent.outbox.depth() == 0


def test_result_is_resent_with_its_finish_stamp_until_acked(make_agent, hub):
    agent = make_agent(result_resend_after=0.3)
    hub.assign("a-1")
    copies = hub.wait_for("result", "a-1", count=3)
    stamps = {e.hlc for e in hub.envelopes("result")}
    assert len(stamps) == 1 and len({json.dumps(c.to_dict()) for c in copies}) == 1
    assert agent.outbox.depth() == 1
    hub.ack("a-1")
    assert agent.drain(5)
    seen = len(hub.of("result"))
    time.sleep(1.0)
    assert len(hub.of("result")) == seen
    assert agent.counters.snapshot()["results.acked"] == 1


def test_unacked_result_is_resent_after_the_broker_comes_back(make_agent, hub, mosquitto):
    agent = make_agent(result_resend_after=60)
    hub.assign("a-1")
    hub.wait_for("result", "a-1")
    mosquitto.restart()
    # Counted on the agent's side: whether this test's hub client is back
    # before the agent's re-send is a race between two reconnecting clients.
    wait_until(lambda: agent.counters.snapshot().get("results.resent") == 1, 15, "a re-send after the reconnect")
    hub.ack("a-1")
    assert agent.drain(10)


def test_unknown_job_type_becomes_a_failed_result_the_hub_can_finish(make_agent, hub):
    make_agent()
    hub.assign("a-1", job_type="firmware.teleport")
    assert hub.wait_for("accepted", "a-1")[0].duplicate is False
    result = hub.wait_for("result", "a-1")[0]
    assert result.status == "failed" and result.error.code == "unknown_job_type" and result.error.retryable is False
    assert not hub.of("rejected")


def test_not_before_is_respected(make_agent, hub, manual_clock):
    make_agent(clock=manual_clock)
    hub.assign("later", not_before=manual_clock.now() + 600)
    hub.assign("now")
    hub.wait_for("result", "now")
    time.sleep(0.3)
    assert not hub.of("started", "later")
    manual_clock.advance(601)
    assert hub.wait_for("result", "later")[0].status == "success"
    assert hub.of("started", "later")[0].started_at >= manual_clock.now() - 1


def test_cancel_stops_a_running_job_with_a_cancelled_result(make_agent, hub):
    agent = make_agent()
    hub.assign("a-1", params={"sleep": 10})
    hub.wait_for("started", "a-1")
    hub.cancel("a-1", "operator request")
    result = hub.wait_for("result", "a-1", timeout=5)[0]
    assert result.error.code == "cancelled" and "operator request" in result.error.message
    assert agent.counters.snapshot()["cancel.aborting"] == 1


def test_redelivery_after_the_deadline_is_answered_as_a_duplicate(make_agent, hub, manual_clock):
    make_agent(clock=manual_clock)
    hub.assign("a-1", deadline=manual_clock.now() + 60)
    hub.wait_for("result", "a-1")
    manual_clock.advance(120)
    hub.assign("a-1", deadline=manual_clock.now() - 60)
    assert hub.wait_for("accepted", "a-1", count=2)[1].duplicate is True
    hub.assign("a-2", deadline=manual_clock.now() - 60)  # never seen: refused
    assert hub.wait_for("rejected")[0].code == "deadline_passed"


def test_heartbeat_reports_queues_running_jobs_and_counters(make_agent, hub):
    make_agent()
    hub.assign("a-1", params={"sleep": 1})
    hub.wait_for("started", "a-1")
    beat = wait_until(lambda: [b for b in hub.of("heartbeat") if b.running == ("a-1",)], 5, "a heartbeat naming the job")[0]
    assert beat.agent_version == "0.1.0" and beat.accepting is True
    assert beat.inbox_depth == 1 and beat.counters["assign.accepted"] == 1


def test_stop_waits_for_running_jobs_within_the_budget(make_agent, hub):
    agent = make_agent()
    hub.assign("a-1", params={"sleep": 0.5})
    hub.wait_for("started", "a-1")
    assert agent.stop(timeout=5) is True
    hub.wait_status("offline")
    outbox = Outbox(agent.settings.outbox_path)  # the result was recorded, to be sent now or after restart
    try:
        assert outbox.get("a-1").data["result"]["status"] == "success"  # type: ignore[union-attr]
    finally:
        outbox.close()


def test_results_survive_kill_9_and_each_assignment_has_one_outcome(spawn_agent, hub, tmp_path):
    proc = spawn_agent()
    hub.wait_status("online", timeout=15)
    hub.assign("quick", params={"echo": "q"})
    hub.assign("slow", params={"echo": "s", "sleep": 3})
    first_quick = hub.wait_for("result", "quick")[0]
    hub.wait_for("started", "slow")
    proc.send_signal(signal.SIGKILL)  # mid-job, with "quick" unacknowledged
    proc.wait(5)

    proc = spawn_agent()
    hub.wait_for("result", "slow", timeout=15)
    hub.wait_for("result", "quick", count=2)  # re-sent from the outbox after the restart
    hub.ack("quick", "slow")
    time.sleep(1.5)  # three re-send periods: anything unacknowledged would show up
    counts = {aid: len(hub.of("result", aid)) for aid in ("quick", "slow")}
    time.sleep(1.0)
    assert {aid: len(hub.of("result", aid)) for aid in ("quick", "slow")} == counts  # nothing after the acks

    assert len(hub.of("started", "quick")) == 1  # finished before the kill: never re-run
    assert len(hub.of("started", "slow")) == 2  # killed without a result: re-run once
    quick_copies = [e for e in hub.envelopes("result") if e.body.assignment_id == "quick"]
    assert {e.hlc for e in quick_copies} == {quick_copies[0].hlc}  # the same result every time
    assert all(e.body == first_quick for e in quick_copies)
    assert {r.output["echo"] for r in hub.of("result", "slow")} == {"s"}

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    listing = subprocess.run(
        [sys.executable, "-m", "agent", "queue", "ls", "--config", str(tmp_path / "agent.toml"), "-o", "json"],
        cwd=REPO, capture_output=True, text=True, timeout=20, check=True,
    )
    report = json.loads(listing.stdout)
    assert report["inbox"]["depth"] == 0 and report["outbox"]["depth"] == 0
    assert {i["assignment_id"]: i["status"] for i in report["outbox"]["items"]} == {"quick": "acked", "slow": "acked"}


def test_result_too_large_after_a_reload_is_set_aside_and_does_not_block_the_outbox(make_agent, settings_for, hub):
    """A result stored under a larger max_message_bytes (a reload lowered it)
    can never be sent: it is set aside (failed, kept, reported to the hub)
    instead of stopping every pass of the outbox at the same item."""
    agent = make_agent()
    hub.assign("big", params={"echo": "x" * 3000})
    hub.wait_for("result", "big")  # sent once, never acknowledged
    assert "max_message_bytes" in agent.reload(settings_for(max_message_bytes=2048))
    wait_until(lambda: agent.counters.snapshot().get("results.set_aside") == 1, 10, "the unsendable result set aside")
    rejected = hub.wait_for("rejected")[0]
    assert rejected.code == "payload_too_large" and rejected.assignment_id == "big" and "set aside" in rejected.detail
    hub.assign("small")  # behind it: still sent, and acknowledged
    assert hub.wait_for("result", "small")[0].status == "success"
    hub.ack("small")
    wait_until(lambda: agent.outbox.depth() == 0, 10, "the outbox drained")
    entry = agent.outbox.get("big")
    assert entry is not None and entry.status == "failed" and entry.data["result"]["output"] == {"echo": "x" * 3000}  # kept for inspection
    assert len(hub.of("result", "big")) == 1  # never sent again
