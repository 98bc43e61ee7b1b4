"""Admission: what the agent refuses to act on, and why."""

from __future__ import annotations

from agent.verify import admit
from shared.envelope import Envelope
from shared.hlc import HLC
from shared.messages import Ack, Assign, Cancel, Heartbeat

NOW = 1_767_225_600.0
STAMP = HLC(1_767_225_600_000, 0, "hub")


def envelope(body, sender="hub", expires_at=None):
    return Envelope(body, sender=sender, hlc=STAMP, id="m-1", expires_at=expires_at)


def assign(**fields):
    return Assign("a-1", "dag", "run", "task", 1, "noop", {}, **fields)


def test_assignment_from_the_hub_is_admitted():
    assert admit(envelope(assign(deadline=NOW + 60, not_before=NOW + 3600)), "assign", NOW) is None
    assert admit(envelope(Cancel("a-1")), "assign", NOW) is None
    assert admit(envelope(Ack(("a-1",))), "ack", NOW) is None


def test_message_from_anyone_but_the_hub_is_refused():
    rejection = admit(envelope(assign(), sender="dev-2"), "assign", NOW)
    assert rejection is not None and rejection.code == "wrong_sender"
    assert rejection.assignment_id is None and "dev-2" in rejection.detail


def test_message_on_the_wrong_topic_is_refused():
    assert admit(envelope(Ack(("a-1",))), "assign", NOW).code == "unexpected_type"  # type: ignore[union-attr]
    assert admit(envelope(assign()), "ack", NOW).code == "unexpected_type"  # type: ignore[union-attr]
    assert admit(envelope(Heartbeat("0.1")), "assign", NOW).code == "unexpected_type"  # type: ignore[union-attr]


def test_expired_envelope_is_refused():
    rejection = admit(envelope(assign(), expires_at=NOW - 1), "assign", NOW)
    assert rejection is not None and rejection.code == "expired"
    assert admit(envelope(assign(), expires_at=NOW + 1), "assign", NOW) is None


def test_assignment_past_its_deadline_is_refused():
    rejection = admit(envelope(assign(deadline=NOW - 5)), "assign", NOW)
    assert rejection is not None and rejection.code == "deadline_passed" and rejection.assignment_id == "a-1"
