"""The versioned envelope every Outpost message travels in, and its codec.

Encoding is compact UTF-8 JSON: readable with ``mosquitto_sub``, and at the
sizes we send (a few hundred bytes) within a few microseconds of binary
formats (see ``bench/codec.py``). Layout::

    {"v": 1, "type": "result", "id": "...", "from": "agent-1",
     "hlc": "0001732550000000.00000@agent-1", "exp": null, "body": {...}}

``exp`` is an optional expiry (epoch seconds). Signed messages (see
``shared/frames.py``) also carry ``to`` (the recipient device, on messages
from the hub), ``seq`` (the hub's per-device sequence number, on assign and
cancel) and ``iat`` (issue time, epoch seconds); each key appears only when
set, so unsigned layouts are unchanged. The size limit is checked before
parsing, so an oversized payload costs no parse.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from shared.errors import DecodeError, InvalidMessage, PayloadTooLarge, UnknownMessageType, UnsupportedVersion
from shared.hlc import HLC
from shared.messages import MESSAGE_TYPES, Message

PROTOCOL_VERSION = 1
MAX_ENVELOPE_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Envelope:
    body: Message
    sender: str
    hlc: HLC
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    expires_at: float | None = None
    version: int = PROTOCOL_VERSION
    #: The device a hub message is for (checked by the agent: ``wrong_device``).
    recipient: str | None = None
    #: The hub's per-device sequence number (assign, cancel): replay protection.
    seq: int | None = None
    #: When the sender signed it (epoch seconds).
    issued_at: float | None = None

    @property
    def type(self) -> str:
        return self.body.TYPE


def encode(envelope: Envelope, limit: int = MAX_ENVELOPE_BYTES) -> bytes:
    """Serialise an envelope; refuses to produce more than ``limit`` bytes."""
    doc: dict[str, Any] = {
        "v": envelope.version,
        "type": envelope.type,
        "id": envelope.id,
        "from": envelope.sender,
        "hlc": str(envelope.hlc),
        "exp": envelope.expires_at,
        "body": envelope.body.to_dict(),
    }
    if envelope.recipient is not None:
        doc["to"] = envelope.recipient
    if envelope.seq is not None:
        doc["seq"] = envelope.seq
    if envelope.issued_at is not None:
        doc["iat"] = envelope.issued_at
    data = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(data) > limit:
        raise PayloadTooLarge(len(data), limit)
    return data


def decode(data: bytes, limit: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse and validate an envelope.

    Raises ``PayloadTooLarge``, ``DecodeError``, ``UnsupportedVersion``,
    ``UnknownMessageType`` or ``InvalidMessage``; never anything else.
    """
    if len(data) > limit:
        raise PayloadTooLarge(len(data), limit)
    try:
        doc = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        # and overflowing floats such as 1e400 (refused below), and integers
        # longer than Python's 4300-digit limit.
        raise DecodeError(f"not JSON: {exc}", data) from exc
    if not isinstance(doc, dict):
        raise DecodeError("envelope must be a JSON object", data)
    version = doc.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {version!r} is not supported (this build speaks {PROTOCOL_VERSION})")
    kind = doc.get("type")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownMessageType(f"unknown message type {kind!r}; known: {', '.join(sorted(MESSAGE_TYPES))}")
    for name, expected in (("id", str), ("from", str), ("hlc", str)):
        if not isinstance(doc.get(name), expected) or not doc[name]:
            raise InvalidMessage(f"envelope field {name!r} must be a non-empty string")
    expires = doc.get("exp")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)):
        raise InvalidMessage(f"envelope field 'exp' must be a number or null, got {expires!r}")
    recipient = doc.get("to")
    if recipient is not None and (not isinstance(recipient, str) or not recipient):
        raise InvalidMessage(f"envelope field 'to' must be a non-empty string or absent, got {recipient!r}")
    seq = doc.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise InvalidMessage(f"envelope field 'seq' must be a non-negative integer or absent, got {seq!r}")
    issued = doc.get("iat")
    if issued is not None and (isinstance(issued, bool) or not isinstance(issued, int | float)):
        raise InvalidMessage(f"envelope field 'iat' must be a number or absent, got {issued!r}")
    try:
        stamp = HLC.parse(doc["hlc"])
    except ValueError as exc:
        raise InvalidMessage(str(exc)) from exc
    body = cls.from_dict(doc.get("body"))
    return Envelope(
        body=body,
        sender=doc["from"],
        hlc=stamp,
        id=doc["id"],
        expires_at=None if expires is None else float(expires),
        version=version,
        recipient=recipient,
        seq=seq,
        issued_at=None if issued is None else float(issued),
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value
