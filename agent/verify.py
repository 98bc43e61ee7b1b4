"""Admission: may this decoded envelope be acted on? Pure functions.

Everything the agent receives passes :func:`admit` after decoding and before
it touches a queue. A refusal is a :class:`Rejection` with a stable ``code``;
the link reports it to the hub as a ``rejected`` event, counts it, and
acknowledges the MQTT message so the broker does not redeliver it forever.

What is *not* a rejection: an assignment naming a job type that is not
installed, or with parameters its job type refuses. Those are queued and
finish as failed results (``unknown_job_type``, ``invalid_params``) so the
hub can finish the task; the runner does that.

Signatures come first (:func:`open_message`): every message from the hub is
a signed frame (``shared/frames.py``), checked against the hub keys this
device trusts before its JSON is even parsed, then for its recipient and
expiry. Those refusals are *security events* (:data:`SECURITY_CODES`):
counted as ``security.<code>`` and reported with the code
``security.<code>``. The replay check (the hub's per-device ``seq``) needs
the device's replay window and inbox, so the daemon makes it (``_admit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from shared.envelope import Envelope
from shared.frames import HUB_TO_AGENT, open_frame
from shared.messages import Ack, Assign, Cancel, Message
from shared.signing import PublicKey, SignatureError

#: The only sender an agent takes instructions from.
HUB_SENDER = "hub"

#: Refusals that mean someone may be attacking the device (or the hub's keys
#: are misconfigured): reported as ``security.<code>``.
SECURITY_CODES = frozenset({"unknown_key", "bad_signature", "wrong_device", "expired", "replayed"})
#: What a security refusal's code is prefixed with in counters and reports.
SECURITY_PREFIX = "security."

#: Which message types may arrive on which of the agent's topics.
ALLOWED: dict[str, tuple[type[Message], ...]] = {
    "assign": (Assign, Cancel),
    "ack": (Ack,),
}


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a message was refused. ``code`` is stable (counted and reported)."""

    code: str
    detail: str
    assignment_id: str | None = None
    #: The refused envelope's id, when it could be read.
    message_id: str | None = None


def admit(envelope: Envelope, topic_kind: str, now: float) -> Rejection | None:
    """Check an envelope that arrived on this agent's ``topic_kind`` topic
    ("assign" or "ack") at epoch time ``now``. Returns None when it may be
    acted on, else the reason it may not.

    Codes: ``wrong_sender`` (not from the hub), ``unexpected_type`` (a type
    that does not belong on that topic), ``expired`` (the envelope's expiry
    passed), ``deadline_passed`` (an assignment that may no longer start).
    """
    body = envelope.body
    assignment_id = getattr(body, "assignment_id", None)
    if envelope.sender != HUB_SENDER:
        # No assignment id on a refusal the hub could mistake for "will not
        # run": a forged or misrouted copy says nothing about the real one.
        return Rejection("wrong_sender", f"sender {envelope.sender!r} is not {HUB_SENDER!r}")
    allowed = ALLOWED.get(topic_kind, ())
    if not isinstance(body, allowed):
        names = ", ".join(t.TYPE for t in allowed) or "nothing"
        return Rejection("unexpected_type", f"a {envelope.type!r} message on the {topic_kind!r} topic (expected {names})")
    if envelope.expires_at is not None and envelope.expires_at < now:
        return Rejection("expired", f"envelope expired at {envelope.expires_at:.3f}, {now - envelope.expires_at:.3f}s ago", assignment_id)
    if isinstance(body, Assign) and body.deadline is not None and body.deadline < now:
        return Rejection("deadline_passed", f"deadline {body.deadline:.3f} passed {now - body.deadline:.3f}s ago", assignment_id)
    return None


def security(code: str, detail: str, assignment_id: str | None = None, message_id: str | None = None) -> Rejection:
    """A refusal that is a security event (``code`` one of SECURITY_CODES)."""
    assert code in SECURITY_CODES, code
    return Rejection(SECURITY_PREFIX + code, detail, assignment_id, message_id)


def open_message(payload: bytes, trusted: Mapping[str, PublicKey], agent_id: str, limit: int, now: float) -> Envelope | Rejection:
    """Verify and decode a message from the hub: its envelope, or the
    security refusal (``security.<code>``): ``unknown_key`` (signed by a key
    this device does not trust), ``bad_signature`` (missing, malformed or
    wrong), ``wrong_device`` (signed for another device, or for none) or
    ``expired``. Raises ``ProtocolError`` for an oversized frame, or a
    correctly signed one that does not decode (a hub bug, not an attack)."""
    try:
        envelope = open_frame(payload, HUB_TO_AGENT, trusted.get, limit)
    except SignatureError as exc:
        return security(exc.code, str(exc))
    assignment_id = getattr(envelope.body, "assignment_id", None)
    if envelope.recipient != agent_id:
        # No assignment id: a refused copy meant for another device says nothing about ours.
        return security("wrong_device", f"signed for {envelope.recipient!r}, this device is {agent_id!r}", message_id=envelope.id)
    if envelope.expires_at is not None and envelope.expires_at < now:
        return security("expired", f"expired at {envelope.expires_at:.3f}, {now - envelope.expires_at:.3f}s ago", assignment_id, envelope.id)
    return envelope
