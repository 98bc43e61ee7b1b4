"""Ed25519 keys and detached signatures, the primitives of Outpost's trust.

Who holds what (docs/security.md has the whole model):

* the hub holds an *assignment key*: it signs every message it sends to a
  device; devices hold its public half (received at enrolment, later ones
  announced signed by an earlier one);
* every device holds its own key, created on the device, never sent anywhere:
  it signs what the device sends; the hub holds the public half.

Keys are Ed25519 (small, fast, deterministic signatures: no nonce to get
wrong on a device with a poor random source). A public key travels as text,
``ed25519:<base64url of the 32 raw bytes>``; its *key id* is the first 16 hex
digits of the SHA-256 of the raw bytes, short enough to send with every
message. Private keys are PKCS#8 PEM files with mode 0600, readable by
OpenSSL.

Every signature covers ``purpose`` and the exact bytes, so a signature made
for one purpose (an assignment) can never be replayed as another (a key
announcement, an HTTP request).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.errors import OutpostError
from shared.files import atomic_write

PUBLIC_KEY_PREFIX = "ed25519:"
SIGNATURE_BYTES = 64


class BadKey(OutpostError):
    """A key file or key text is missing, malformed or unsafe."""

    code = "bad_key"


class SignatureError(OutpostError):
    """A signature is missing, malformed, made with an unknown key, or wrong.

    ``code`` tells which, and is what security events record."""

    code = "bad_signature"

    def __init__(self, message: str, code: str = "bad_signature") -> None:
        super().__init__(message)
        self.code = code


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    # validate: the lenient default would skip characters outside the alphabet.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def _message(purpose: str, data: bytes) -> bytes:
    # Domain separation: the purpose and a NUL can never be part of another purpose's prefix.
    return b"outpost-sig-v1\0" + purpose.encode() + b"\0" + data


@dataclass(frozen=True, slots=True)
class PublicKey:
    """The verifying half of a key."""

    key: Ed25519PublicKey

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        """Parse ``ed25519:<base64url>``; raises ``BadKey`` naming the problem."""
        if not isinstance(text, str) or not text.startswith(PUBLIC_KEY_PREFIX):
            raise BadKey(f"public key must look like '{PUBLIC_KEY_PREFIX}<base64url of 32 bytes>', got {str(text)[:60]!r}")
        try:
            raw = _unb64(text[len(PUBLIC_KEY_PREFIX) :])
        except (binascii.Error, ValueError):
            raise BadKey("public key is not valid base64url") from None
        if len(raw) != 32:
            raise BadKey(f"an Ed25519 public key is 32 bytes, this one is {len(raw)}")
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    @property
    def raw(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def kid(self) -> str:
        return key_id(self.raw)

    def to_text(self) -> str:
        return PUBLIC_KEY_PREFIX + _b64(self.raw)

    def verify(self, purpose: str, data: bytes, signature: bytes) -> None:
        """Raise ``SignatureError`` unless ``signature`` is this key's over (purpose, data)."""
        if len(signature) != SIGNATURE_BYTES:
            raise SignatureError(f"signature is {len(signature)} bytes, not {SIGNATURE_BYTES}", "malformed_signature")
        try:
            self.key.verify(signature, _message(purpose, data))
        except InvalidSignature:
            raise SignatureError(f"signature does not verify with key {self.kid}", "bad_signature") from None

    def __str__(self) -> str:
        return self.to_text()


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A private key. Never logged, never sent."""

    key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a PEM private key; refuses a file others can read or write."""
        try:
            mode = path.stat().st_mode
            data = path.read_bytes()
        except OSError as exc:
            raise BadKey(f"cannot read key file {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise BadKey(f"key file {path} is readable or writable by others (mode {mode & 0o777:o}); run: chmod 600 {path}")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise BadKey(f"key file {path} is not a PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise BadKey(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        """Write the key as PEM, mode 0600, atomically."""
        pem = self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        atomic_write(path, pem, mode=0o600)

    @classmethod
    def load_or_create(cls, path: Path) -> SigningKey:
        """The key in ``path``, made (0600, in a 0700 folder) if there is none."""
        if path.exists():
            return cls.load(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = cls.generate()
        key.save(path)
        return key

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    @property
    def kid(self) -> str:
        return self.public.kid

    def sign(self, purpose: str, data: bytes) -> bytes:
        return self.key.sign(_message(purpose, data))

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid})"


def encode_signature(signature: bytes) -> str:
    return _b64(signature)


def decode_signature(text: str) -> bytes:
    try:
        return _unb64(text)
    except (binascii.Error, ValueError):
        raise SignatureError("signature is not valid base64url", "malformed_signature") from None

