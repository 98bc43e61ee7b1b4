"""Secrets benchmark: what encryption at rest, rotation and masking cost.

Prints, for this machine (SQLite file, FULL sync):
* writes: variables set through hub.vault (encrypt + one transaction each), per second;
* rotation: ``outpost-hub secrets rotate``'s work (hub.vault.reencrypt) over
  N variables and N/10 connections (password and extra), rows per second;
* masking: one 64 KiB device log chunk through the masker with S known
  secrets (hub.tasklogs does this per chunk), microseconds per chunk, and
  the masker's reload of S secrets from the database.

Usage: python bench/secret_store.py [--variables 10000] [--secrets 1000]
"""

from __future__ import annotations

import argparse
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.fernet import Fernet  # noqa: E402

from hub import vault  # noqa: E402
from hub.db import make_engine, make_sessionmaker, transaction, upgrade  # noqa: E402
from hub.encryption import parse_keys  # noqa: E402
from hub.masking import Masker  # noqa: E402
from hub.models import Connection, Variable  # noqa: E402

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variables", type=int, default=10_000)
    parser.add_argument("--secrets", type=int, default=1_000)
    args = parser.parse_args()
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    old_cipher = parse_keys(old)
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'hub.db'}"
        upgrade(url)
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)

        n_writes = min(500, args.variables)
        started = time.perf_counter()
        for i in range(n_writes):
            vault.set_variable(sessions, old_cipher, f"write_{i}", f"value-{i}", NOW)
        took = time.perf_counter() - started
        print(f"writes: {n_writes} variables set one by one in {took:.2f}s: {n_writes / took:.0f}/s")

        with transaction(sessions) as session:  # the bulk of the rows, written directly
            session.add_all(Variable(key=f"api_token_{i}", value_encrypted=old_cipher.encrypt(f"secret-value-{i:06d}"), description="", created_at=NOW, updated_at=NOW)
                            for i in range(args.variables - n_writes))
            session.add_all(Connection(conn_id=f"conn_{i}", conn_type="http", description="", password_encrypted=old_cipher.encrypt(f"pw-{i:06d}"),
                                       extra_encrypted=old_cipher.encrypt('{"client_secret": "cs-%06d"}' % i), created_at=NOW, updated_at=NOW)
                            for i in range(args.variables // 10))
        started = time.perf_counter()
        counts = vault.reencrypt(sessions, parse_keys(f"{new},{old}"))
        took = time.perf_counter() - started
        rows = args.variables + args.variables // 10
        print(f"rotation: {counts['rotated']} values in {rows} rows re-encrypted in {took:.2f}s: {rows / took:.0f} rows/s, {counts['rotated'] / took:.0f} values/s")

        masker = Masker()
        # Random tokens: secrets with a common prefix would flatter the regex.
        tokens = [secrets.token_urlsafe(18) for _ in range(args.secrets)]
        masker.set_source(lambda: tokens)
        chunk = ("2026-01-01T00:00:00Z INFO probe: reading sensor 17, value 42.125, all fine\n" * 900)[: 64 * 1024]
        masker.mask_text(chunk)  # compile once
        rounds = 200
        started = time.perf_counter()
        for _ in range(rounds):
            masker.mask_text(chunk)
        per_chunk = (time.perf_counter() - started) / rounds
        print(f"masking: a 64 KiB log chunk with {args.secrets} known secrets: {per_chunk * 1e6:.0f} us")

        real = Masker()
        real.set_source(vault.secret_values(sessions, parse_keys(new)))
        started = time.perf_counter()
        real.mask_text("x")
        took = time.perf_counter() - started
        print(f"masker reload: {args.variables} sensitive variables and {args.variables // 10} connections decrypted and compiled in {took:.2f}s")
        engine.dispose()


if __name__ == "__main__":
    main()
