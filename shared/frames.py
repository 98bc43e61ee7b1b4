"""Signed frames: an envelope and the Ed25519 signature over its exact bytes.

Every message on the wire, in either direction, is a *frame*::

    <compact envelope JSON>\\n<key id>.<base64url signature>

The compact JSON never contains a raw newline (``json.dumps`` escapes
newlines inside strings), so a frame splits at its last ``\\n``. The
signature covers the JSON bytes exactly as sent, under a purpose string per
direction (:data:`HUB_TO_AGENT`, :data:`AGENT_TO_HUB`), so a device's
signature can never pass for the hub's or the other way round, nor for a key
announcement or an HTTP request (``shared.signing`` separates purposes).

Opening a frame checks, in order: size, shape, key id (``unknown_key``),
signature (``bad_signature``, also for a missing or malformed one), and only then parses the JSON (``shared.envelope.decode``):
nothing unauthenticated is ever parsed. :func:`open_frame` raises
:class:`SignatureError` (``.code``) or a ``ProtocolError``; never anything else.
"""

from __future__ import annotations

from collections.abc import Callable

from shared.envelope import MAX_ENVELOPE_BYTES, Envelope, decode, encode
from shared.errors import PayloadTooLarge
from shared.signing import PublicKey, SignatureError, SigningKey, decode_signature, encode_signature

HUB_TO_AGENT = "hub-to-agent"
AGENT_TO_HUB = "agent-to-hub"
#: Room the signature line takes: "\n" + 16 hex key id + "." + 86 base64url characters.
SIGNATURE_OVERHEAD = 1 + 16 + 1 + 86
_KID_LEN = 16


def seal(data: bytes, key: SigningKey, purpose: str) -> bytes:
    """``data`` (compact envelope JSON) with its signature line appended."""
    if b"\n" in data:
        raise ValueError("a frame's JSON must not contain a raw newline")
    return data + b"\n" + key.kid.encode() + b"." + encode_signature(key.sign(purpose, data)).encode()


def sign_envelope(envelope: Envelope, key: SigningKey, purpose: str, limit: int = MAX_ENVELOPE_BYTES) -> bytes:
    """Encode and sign ``envelope``; the whole frame stays within ``limit``."""
    data = encode(envelope, max(0, limit - SIGNATURE_OVERHEAD))
    return seal(data, key, purpose)


def split(frame: bytes) -> tuple[bytes, str, bytes]:
    """(JSON bytes, key id, raw signature) of a frame; ``SignatureError`` if it has no well-formed signature line."""
    data, sep, line = frame.rpartition(b"\n")
    if not sep:
        raise SignatureError("message is not signed (no signature line)", "bad_signature")
    kid, dot, sig = line.partition(b".")
    if not dot or len(kid) != _KID_LEN or not all(c in b"0123456789abcdef" for c in kid):
        raise SignatureError("signature line is not '<key id>.<signature>'", "bad_signature")
    try:
        text = sig.decode("ascii")
    except UnicodeDecodeError:
        raise SignatureError("signature is not ASCII", "bad_signature") from None
    signature = decode_signature(text)
    # Canonical only: base64 has spare bits at the end, and a frame that
    # differs by one byte must never pass as the same signed message.
    if encode_signature(signature) != text:
        raise SignatureError("signature is not canonical base64url", "bad_signature")
    return data, kid.decode(), signature


def verify_frame(frame: bytes, purpose: str, lookup: Callable[[str], PublicKey | None], limit: int = MAX_ENVELOPE_BYTES) -> tuple[bytes, str]:
    """Check a frame's signature; returns (the signed JSON bytes, key id).

    ``lookup(kid)`` gives the key trusted under that id, or None
    (``unknown_key``). Raises ``PayloadTooLarge`` or ``SignatureError``."""
    if len(frame) > limit:
        raise PayloadTooLarge(len(frame), limit)
    try:
        data, kid, signature = split(frame)
        key = lookup(kid)
        if key is None:
            raise SignatureError(f"signed with key {kid}, which is not trusted here", "unknown_key")
        key.verify(purpose, data, signature)
    except SignatureError as exc:
        # Missing, malformed and wrong signatures are one code to watch: bad_signature.
        raise SignatureError(str(exc), "unknown_key" if exc.code == "unknown_key" else "bad_signature") from None
    return data, kid


def open_frame(frame: bytes, purpose: str, lookup: Callable[[str], PublicKey | None], limit: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Verify, then decode. Raises ``SignatureError`` or ``ProtocolError``."""
    data, _kid = verify_frame(frame, purpose, lookup, limit)
    return decode(data, limit)


def unsigned_part(frame: bytes) -> bytes:
    """The JSON part of a frame (the whole input when it has no signature
    line): for logs and excerpts, never for trust."""
    data, sep, _ = frame.rpartition(b"\n")
    return data if sep else frame
