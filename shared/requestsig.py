"""Signed agent HTTP requests: how a device proves who sends a request.

The agent signs, with its Ed25519 device key (shared/signing.py, purpose
``http-request``), the method, the path, a Unix timestamp, a random nonce
and the SHA-256 of the body, and sends the result in one header::

    Outpost-Signature: agent=pump-7,ts=1767225600,nonce=<hex>,sig=<base64url>

(Ed25519 signatures are deterministic: without the nonce two identical
requests in the same second would look like a replay.)

The hub verifies it with the public key it registered for that agent,
refuses a timestamp further than its window from its own clock, and
remembers signatures seen within the window so a captured request cannot
be replayed. Path only (no host, no query string): a reverse proxy in front
of the hub must not rewrite the path.

The hub's answer is signed too, so a device acts on nothing but the hub's
word (it drops outbox items an answer acknowledges, skips items a cursor
covers): the hub signs, with its current key (purpose ``hub-http-answer``),
the agent id, the SHA-256 of the request's signature (which covers method,
path, timestamp, nonce and body: the answer is bound to that one request and
cannot be replayed for another), the status and the SHA-256 of the body::

    Outpost-Answer-Signature: kid=<hub key id>,sig=<base64url>
"""

from __future__ import annotations

import hashlib
import secrets

from collections.abc import Mapping

from shared.signing import PublicKey, SignatureError, SigningKey, decode_signature, encode_signature

HEADER = "Outpost-Signature"
PURPOSE = "http-request"
ANSWER_HEADER = "Outpost-Answer-Signature"
ANSWER_PURPOSE = "hub-http-answer"


def canonical(method: str, path: str, timestamp: int, nonce: str, body: bytes) -> bytes:
    """The exact bytes signed: one field per line."""
    return f"{method.upper()}\n{path}\n{timestamp}\n{nonce}\n{hashlib.sha256(body).hexdigest()}".encode()


def sign_request(key: SigningKey, agent_id: str, method: str, path: str, body: bytes, now: float) -> str:
    """The header value for one request."""
    timestamp, nonce = int(now), secrets.token_hex(8)
    signature = key.sign(PURPOSE, canonical(method, path, timestamp, nonce, body))
    return f"agent={agent_id},ts={timestamp},nonce={nonce},sig={encode_signature(signature)}"


def parse_header(value: str) -> tuple[str, int, str, bytes]:
    """(agent id, timestamp, nonce, signature); raises ``SignatureError`` (code
    ``malformed_signature``) naming what is wrong."""
    fields = dict(part.strip().partition("=")[::2] for part in value.split(",") if part.strip())
    if set(fields) != {"agent", "ts", "nonce", "sig"}:
        raise SignatureError(f"{HEADER} must be 'agent=<id>,ts=<unix seconds>,nonce=<hex>,sig=<base64url>'", "malformed_signature")
    if not 8 <= len(fields["nonce"]) <= 64 or not all(c in "0123456789abcdef" for c in fields["nonce"]):
        raise SignatureError(f"{HEADER}: nonce must be 8-64 lowercase hex digits", "malformed_signature")
    if not (fields["ts"].isascii() and fields["ts"].isdigit()) or len(fields["ts"]) > 12:
        raise SignatureError(f"{HEADER}: ts must be whole Unix seconds", "malformed_signature")
    return fields["agent"], int(fields["ts"]), fields["nonce"], decode_signature(fields["sig"])


def answer_canonical(agent_id: str, request_signature: bytes, status: int, body: bytes) -> bytes:
    """The exact bytes of an answer the hub signs: bound to the request by its signature."""
    return f"{agent_id}\n{hashlib.sha256(request_signature).hexdigest()}\n{status}\n{hashlib.sha256(body).hexdigest()}".encode()


def request_signature(header: str) -> bytes:
    """The signature in an ``Outpost-Signature`` header value (raises ``SignatureError``)."""
    return parse_header(header)[3]


def sign_answer(key: SigningKey, agent_id: str, request_signature: bytes, status: int, body: bytes) -> str:
    """The ``Outpost-Answer-Signature`` value for an answer to a request signed ``request_signature``."""
    signature = key.sign(ANSWER_PURPOSE, answer_canonical(agent_id, request_signature, status, body))
    return f"kid={key.kid},sig={encode_signature(signature)}"


def verify_answer(keys: Mapping[str, PublicKey], agent_id: str, request_header: str, status: int, body: bytes, header: str | None) -> str:
    """Raise ``SignatureError`` unless ``header`` is a trusted hub key's
    signature of this answer to the request sent with ``request_header``;
    returns the key id. Codes: ``signature_missing``, ``malformed_signature``,
    ``unknown_key``, ``bad_signature``."""
    if not header:
        raise SignatureError(f"the hub's answer has no {ANSWER_HEADER} header", "signature_missing")
    fields = dict(part.strip().partition("=")[::2] for part in header.split(",") if part.strip())
    if set(fields) != {"kid", "sig"} or not fields["kid"]:
        raise SignatureError(f"{ANSWER_HEADER} must be 'kid=<key id>,sig=<base64url>'", "malformed_signature")
    key = keys.get(fields["kid"])
    if key is None:
        raise SignatureError(f"the hub's answer is signed with key {fields['kid'][:20]!r}, which this device does not trust", "unknown_key")
    key.verify(ANSWER_PURPOSE, answer_canonical(agent_id, request_signature(request_header), status, body), decode_signature(fields["sig"]))
    return key.kid
