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
"""

from __future__ import annotations

import hashlib
import secrets

from shared.signing import SignatureError, SigningKey, decode_signature, encode_signature

HEADER = "Outpost-Signature"
PURPOSE = "http-request"


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
