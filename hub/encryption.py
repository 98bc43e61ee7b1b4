"""Encryption at rest of variables and connections: Fernet keys.

``fernet_keys`` is a comma-separated list of Fernet keys (url-safe base64
of 32 random bytes, as ``Fernet.generate_key()`` makes them). The first one
encrypts; every one of them decrypts (``MultiFernet``), so a key is rotated
by putting the new key first, running ``outpost-hub secrets rotate`` and
then removing the old key. The hub refuses to start without a valid key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from hub.errors import ConfigError, HubError

#: Key files written by ``outpost-hub standalone`` are only readable by their owner.
KEY_FILE_MODE = 0o600
#: The example key of the docs: anyone may know it, so it is never accepted.
DOCUMENTED_EXAMPLE_KEY = "REPLACE-with-the-output-of-outpost-hub-secrets-generate-key"


class SecretUnreadable(HubError):
    """A stored secret was encrypted with a key the hub no longer has."""

    status = 500
    code = "secret_unreadable"


class SecretCipher:
    """Encrypts with the first key, decrypts with any of them."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("fernet_keys is empty")
        self._fernets = [Fernet(k) for k in keys]
        self._multi = MultiFernet(self._fernets)

    @property
    def key_count(self) -> int:
        return len(self._fernets)

    def encrypt(self, plaintext: str) -> str:
        return self._multi.encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str, what: str = "a secret") -> str:
        try:
            return self._multi.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError):
            raise SecretUnreadable(f"{what} cannot be decrypted with any key in fernet_keys (was the key that encrypted it removed?)") from None

    def is_primary(self, token: str) -> bool:
        """Whether the primary key decrypts ``token`` (rotation skips it then)."""
        try:
            self._fernets[0].decrypt(token.encode("ascii"))
            return True
        except (InvalidToken, ValueError):
            return False

    def rotate(self, token: str, what: str = "a secret") -> str:
        """``token`` re-encrypted with the primary key."""
        try:
            return self._multi.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, ValueError):
            raise SecretUnreadable(f"{what} cannot be decrypted with any key in fernet_keys, so it cannot be rotated") from None


def generate_key() -> str:
    return Fernet.generate_key().decode("ascii")


def parse_keys(setting: str) -> SecretCipher:
    """The cipher of a ``fernet_keys`` setting; ``ConfigError`` naming the
    bad key's position (never its value) when one is not a Fernet key."""
    parts = [p.strip() for p in setting.split(",") if p.strip()]
    if not parts:
        raise ConfigError(
            "fernet_keys is empty: the hub encrypts variables and connections with it. "
            "Generate one with 'outpost-hub secrets generate-key' and set OUTPOST_HUB_FERNET_KEYS or fernet_keys in the hub TOML file"
        )
    keys = []
    for position, part in enumerate(parts, start=1):
        if part == DOCUMENTED_EXAMPLE_KEY:
            raise ConfigError(f"fernet_keys: key {position} is the documentation's example, not a key; generate one with 'outpost-hub secrets generate-key'")
        try:
            Fernet(part.encode("ascii"))
        except (ValueError, UnicodeError):
            raise ConfigError(f"fernet_keys: key {position} of {len(parts)} is not a Fernet key (url-safe base64 of 32 bytes); generate one with 'outpost-hub secrets generate-key'") from None
        keys.append(part.encode("ascii"))
    return SecretCipher(keys)


def ensure_key_file(path: Path) -> str:
    """The key in ``path``, created (mode 0600) with a new key the first
    time; later runs reuse it, so stored secrets stay readable."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = generate_key()
    # O_EXCL: two processes starting at once never overwrite each other's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key
