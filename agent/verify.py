"""Admission: may this decoded envelope be acted on? Pure functions.

Everything the agent receives passes :func:`admit` after decoding and before
it touches a queue. A refusal is a :class:`Rejection` with a stable ``code``;
the link reports it to the hub as a ``rejected`` event, counts it, and
acknowledges the MQTT message so the broker does not redeliver it forever.

What is *not* a rejection: an assignment naming a job type that is not
installed, or with parameters its job type refuses. Those are queued and
finish as failed results (``unknown_job_type``, ``invalid_params``) so the
hub can finish the task; the runner does that.

Signatures: the hub will sign assignments (ARCHITECTURE.md, "Security") once
``shared/signing.py`` exists. Their check (signature over the raw bytes,
nonce not seen before, from a persisted nonce set) belongs at the top of
:func:`admit`, which will then also need the raw bytes and the nonce store.
Nothing here checks signatures today.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.envelope import Envelope
from shared.messages import Ack, Assign, Cancel, Message

#: The only sender an agent takes instructions from.
HUB_SENDER = "hub"

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
