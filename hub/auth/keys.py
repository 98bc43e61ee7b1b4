"""The hub's secret key and the hashes of random credentials."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from hub.errors import ConfigError

MIN_SECRET_KEY_LENGTH = 32
#: Values copied from examples and tutorials; a hub with one of them is not protected.
KNOWN_DEFAULTS = frozenset(
    {
        "changeme", "change-me", "change_me", "changethis", "secret", "secret-key", "secret_key", "secretkey", "default", "outpost",
        "outpost-secret", "please-change-me", "your-secret-key", "supersecret", "development", "dev", "test", "password",
        "replace-me-with-a-long-random-string-of-48-chars",
    }
)


def check_secret_key(value: str) -> None:
    """Raise ``ConfigError`` unless ``value`` is a usable secret key."""
    hint = "set secret_key (or OUTPOST_HUB_SECRET_KEY) to a random value, e.g. python -c 'import secrets; print(secrets.token_urlsafe(48))'"
    if not value.strip():
        raise ConfigError(f"secret_key is empty; {hint}")
    if value.strip().lower() in KNOWN_DEFAULTS or len(set(value)) < 8:
        raise ConfigError(f"secret_key is a known default or example value; {hint}")
    if len(value) < MIN_SECRET_KEY_LENGTH:
        raise ConfigError(f"secret_key is {len(value)} characters, fewer than {MIN_SECRET_KEY_LENGTH}; {hint}")


def load_or_create_secret_key(path: Path) -> str:
    """The key in ``path``, made (random, mode 0600) on first use. Used by
    ``outpost-hub standalone``, which must run with no configuration."""
    if path.exists():
        value = path.read_text().strip()
        check_secret_key(value)
        return value
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    write_private(path, value + "\n")
    return value


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (created 0600, never
    world-readable even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)


def digest(value: str) -> str:
    """SHA-256 (hex) of a random credential (API token, session id). These
    carry 256 bits of randomness, so a slow password hash would add nothing."""
    return hashlib.sha256(value.encode()).hexdigest()


def sign(secret_key: str, purpose: str, value: str) -> str:
    """HMAC-SHA256 of ``value`` for ``purpose`` (hex), e.g. a session's CSRF value."""
    return hmac.new(secret_key.encode(), f"{purpose}\x00{value}".encode(), hashlib.sha256).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
