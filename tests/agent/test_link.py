"""The agent's MQTT session over a real broker: bad input, status, will, acks."""

from __future__ import annotations

import json
import signal
import time

from agent.queues import QueueError
from shared.envelope import decode
from shared.frames import AGENT_TO_HUB, open_frame, unsigned_part
from shared.hlc import HLC
from shared.messages import Assign
from shared.topics import status_topic

from .conftest import AGENT_ID, read_retained, wait_until


def test_online_status_is_retained_with_version_labels_and_job_types(make_agent, mosquitto):
    agent = make_agent(labels={"site": "north"})
    payload = wait_until(lambda: read_retained(mosquitto.port, status_topic(AGENT_ID)), what="retained status")
    envelope = open_frame(payload, AGENT_TO_HUB, {agent.device_key.kid: agent.device_key.public}.get)  # signed by the device
    status = envelope.body
    assert envelope.sender == AGENT_ID
    assert status.state == "online" and status.agent_version == "0.1.0"  # type: ignore[attr-defined]
    assert status.labels == {"site": "north"}  # type: ignore[attr-defined]
    assert {"noop", "command.run", "diagnostics.collect"} <= {t.name for t in status.job_types}  # type: ignore[attr-defined]


def test_bad_messages_are_rejected_counted_and_acknowledged_and_nothing_queued_is_lost(make_agent, hub, manual_clock):
    agent = make_agent(clock=manual_clock, max_message_bytes=2048)
    hub.assign("held", not_before=manual_clock.now() + 3600)
    hub.wait_for("accepted", "held")

    stamp = str(hub.hlc.now())
    # Signed by the hub, so they get as far as decoding.
    hub.publish(raw=hub.sign_raw(b"\xff this is not json"))
    hub.publish(raw=hub.sign_raw(json.dumps({"v": 1, "type": "teleport", "id": "m-unknown", "from": "hub", "hlc": stamp, "body": {}}).encode()))
    hub.publish(raw=hub.sign_raw(json.dumps({"v": 1, "type": "assign", "id": "m-oversized", "from": "hub", "hlc": stamp, "body": {"pad": "x" * 4000}}).encode()))
    hub.publish(raw=hub.sign_raw(json.dumps({"v": 1, "type": "assign", "id": "m-invalid", "from": "hub", "hlc": stamp, "body": {"assignment_id": 7}}).encode()))
    wrong_sender = hub.publish(Assign("w-1", "d", "r", "t", 1, "noop"), sender="dev-2")
    expired = hub.publish(Assign("e-1", "d", "r", "t", 1, "noop"), expires_at=manual_clock.now() - 10)

    rejected = hub.wait_for("rejected", count=6)
    by_code = {r.code: r for r in rejected}
    assert set(by_code) == {"decode_error", "unknown_type", "payload_too_large", "invalid_message", "wrong_sender", "security.expired"}
    assert by_code["unknown_type"].message_id == "m-unknown"
    assert by_code["invalid_message"].message_id == "m-invalid"
    assert by_code["wrong_sender"].message_id == wrong_sender and by_code["wrong_sender"].assignment_id is None  # a forged copy must not fail the real one
    assert by_code["security.expired"].message_id == expired
    counters = agent.counters.snapshot()
    for code in by_code:
        assert counters[code if code.startswith("security.") else f"rejected.{code}"] == 1

    # Still working, and the queued assignment is still there.
    hub.assign("after")
    assert hub.wait_for("result", "after")[0].status == "success"
    assert agent.runner.held() == ["held"] and agent.inbox.depth() == 1
    assert not hub.of("accepted", "w-1") and not hub.of("accepted", "e-1")

    # They were acknowledged: a new session on the same broker gets none of them again.
    agent.stop(timeout=2)
    again = make_agent(clock=manual_clock, max_message_bytes=2048)
    time.sleep(1.0)
    assert len(hub.of("rejected")) == 6
    assert again.runner.held() == ["held"]  # released at start-up, claimed and held again


def test_assignment_not_stored_is_not_acknowledged_and_comes_back(make_agent, hub, monkeypatch):
    agent = make_agent()
    real_put = agent.inbox.put

    def failing_put(assign):
        raise QueueError("disk full (simulated)")

    monkeypatch.setattr(agent.inbox, "put", failing_put)
    hub.assign("a-1")
    wait_until(lambda: agent.counters.snapshot().get("errors.inbound"), what="the failed store")
    assert not hub.of("accepted", "a-1")
    monkeypatch.setattr(agent.inbox, "put", real_put)
    agent.stop(timeout=2)
    # Unacknowledged, the broker redelivers it to the next session.
    make_agent()
    assert hub.wait_for("result", "a-1")[0].status == "success"


def test_agent_clock_moves_past_every_stamp_it_receives(make_agent, hub):
    agent = make_agent()
    ahead = HLC(agent.hlc.now().wall_ms + 3_600_000, 7, "hub")  # a hub clock an hour ahead
    hub.hlc.update(ahead)
    hub.assign("a-1")
    wait_until(lambda: hub.envelopes("accepted"), what="accepted")
    accepted = hub.envelopes("accepted")[0]
    assert accepted.hlc > ahead and accepted.sender == AGENT_ID


def test_graceful_stop_leaves_a_retained_offline_status(make_agent, hub, mosquitto):
    agent = make_agent()
    hub.wait_status("online")
    agent.stop(timeout=2)
    hub.wait_status("offline")
    assert decode(unsigned_part(read_retained(mosquitto.port, status_topic(AGENT_ID)))).body.state == "offline"  # type: ignore[arg-type, attr-defined]


def test_killed_agent_gets_a_retained_offline_status_from_its_will(spawn_agent, hub, mosquitto):
    proc = spawn_agent()
    hub.wait_status("online", timeout=15)
    proc.send_signal(signal.SIGKILL)
    proc.wait(5)
    hub.wait_status("offline")
    assert decode(unsigned_part(read_retained(mosquitto.port, status_topic(AGENT_ID)))).body.state == "offline"  # type: ignore[arg-type, attr-defined]
