"""Variables and connections at rest: Fernet-encrypted in the DB, rotated
with MultiFernet, masked in logs; the hub does not start without a key and
standalone makes and keeps its own."""

from __future__ import annotations

import io
import logging
import os
import re
import signal
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.fernet import Fernet
from sqlalchemy import text

from hub import vault
from hub.db import make_engine, make_sessionmaker, upgrade
from hub.encryption import DOCUMENTED_EXAMPLE_KEY, SecretUnreadable, ensure_key_file, parse_keys
from hub.errors import ConfigError
from hub.masking import MASK, Masker, MaskingFilter, compile_alternatives, is_sensitive
from hub.secretvars import Connection, SecretStore, Variable, using

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield tmp_path / "hub.db", make_sessionmaker(engine)
    engine.dispose()


@pytest.fixture
def any_db(hub_db_url: str):  # type: ignore[no-untyped-def]
    """SQLite and PostgreSQL (the production store)."""
    upgrade(hub_db_url)
    engine = make_engine(hub_db_url)
    yield hub_db_url, make_sessionmaker(engine)
    engine.dispose()


def key() -> str:
    return Fernet.generate_key().decode()


# --- keys ---------------------------------------------------------------------------


# Fixed keys, not key(): test ids must be the same in every pytest-xdist worker.
_A_KEY = "8U5An7JsX5MWQjRFnTafHo3oQ7hjz1Z6abzGMQHoonM="


@pytest.mark.parametrize("setting", ["", " , ", "not-a-key", _A_KEY[:-4], DOCUMENTED_EXAMPLE_KEY, f"{_A_KEY},garbage"])
def test_an_empty_invalid_or_example_key_is_a_config_error(setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keys(setting)
    assert "fernet_keys" in str(caught.value)
    if setting.startswith(("not", "gar")) or "," in setting:
        assert "garbage" not in str(caught.value) and "not-a-key" not in str(caught.value)  # never echo key material


@pytest.mark.parametrize("setting", ["", "nope"])
def test_the_hub_refuses_to_start_without_a_valid_key(tmp_path: Path, setting: str) -> None:
    env = {**os.environ, "OUTPOST_HUB_STATE_DIR": str(tmp_path), "OUTPOST_HUB_FERNET_KEYS": setting}
    for role in ("api", "scheduler"):
        out = subprocess.run([sys.executable, "-m", "hub", role, "--port", "0"], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "fernet_keys" in out.stderr and "outpost-hub secrets generate-key" in out.stderr
    assert not (tmp_path / "hub.db").exists()  # refused before touching anything


def test_key_file_is_created_owner_only_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "fernet.key"
    first = ensure_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_key_file(path) == first
    parse_keys(first)


# --- at rest --------------------------------------------------------------------------


def test_values_are_encrypted_at_rest_and_read_back(any_db) -> None:  # type: ignore[no-untyped-def]
    url, sessions = any_db
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite") else None
    cipher = parse_keys(key())
    vault.set_variable(sessions, cipher, "api_token", "tok-3141592653", NOW)
    vault.save_connection(sessions, cipher, "warehouse", {"conn_type": "postgres", "host": "db.example", "login": "etl", "port": 5432,
                                                          "password": "hunter2-long", "extra": {"region": "eu", "api_key": "ak-271828"}}, NOW, create=True)
    with sessions() as session:  # every column of both tables, as stored
        rows = [tuple(r) for table in ("variables", "connections") for r in session.execute(text(f"select * from {table}"))]
    stored = repr(rows)
    for secret in ("tok-3141592653", "hunter2-long", "ak-271828"):
        assert secret not in stored
    assert "db.example" in stored  # host is not a secret: stored plain
    [token] = [r[1] for r in rows if r[0] == "api_token"]
    assert token.startswith("gAAAA")  # a Fernet token
    if path is not None:  # SQLite: not in the file either (free pages, WAL)
        files = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert b"tok-3141592653" not in files and b"hunter2-long" not in files
    store = SecretStore(sessions, cipher)
    with using(store):
        assert Variable.get("api_token") == "tok-3141592653"
        assert Variable.get("missing", default_var="d") == "d"
        found = Connection.get("warehouse")
    assert (found.host, found.login, found.port, found.password, found.extra_dejson) == ("db.example", "etl", 5432, "hunter2-long", {"region": "eu", "api_key": "ak-271828"})
    assert "hunter2" not in repr(found)
    assert found.get_uri() == "postgres://etl:hunter2-long@db.example:5432"
    with pytest.raises(vault.VariableNotFound), using(store):
        Variable.get("missing")


def test_rotation_rewrites_every_value_so_only_the_new_key_is_needed(any_db) -> None:  # type: ignore[no-untyped-def]
    _url, sessions = any_db
    old, new = key(), key()
    old_cipher = parse_keys(old)
    for i in range(7):
        vault.set_variable(sessions, old_cipher, f"var_{i}", f"value-{i}", NOW)
    for i in range(3):
        vault.save_connection(sessions, old_cipher, f"conn_{i}", {"password": f"pw-{i}-xyz", "extra": {"token": f"t-{i}-xyz"}}, NOW, create=True)
    vault.save_connection(sessions, old_cipher, "no_secrets", {"host": "h"}, NOW, create=True)
    with pytest.raises(SecretUnreadable), sessions() as session:
        vault.read_variable(session, parse_keys(new), "var_0")  # the new key alone cannot read old rows yet

    rotating = parse_keys(f"{new},{old}")
    counts = vault.reencrypt(sessions, rotating, batch=2)  # several batches, each its own transaction
    assert counts == {"rotated": 7 + 3 * 2, "unchanged": 0}
    assert vault.reencrypt(sessions, rotating, batch=2) == {"rotated": 0, "unchanged": 13}  # idempotent

    only_new = parse_keys(new)
    with sessions() as session:
        assert [vault.read_variable(session, only_new, f"var_{i}") for i in range(7)] == [f"value-{i}" for i in range(7)]
        for i in range(3):
            conn = vault.read_connection(session, only_new, f"conn_{i}")
            assert conn is not None and conn["password"] == f"pw-{i}-xyz" and conn["extra"] == {"token": f"t-{i}-xyz"}
        with pytest.raises(SecretUnreadable):
            vault.read_variable(session, parse_keys(old), "var_0")


def test_rotate_command_reencrypts_with_the_first_key(db, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, sessions = db
    old, new = key(), key()
    vault.set_variable(sessions, parse_keys(old), "db_password", "s3cr3t-value", NOW)
    env = {**os.environ, "OUTPOST_HUB_DATABASE_URL": f"sqlite:///{path}", "OUTPOST_HUB_FERNET_KEYS": f"{new},{old}"}
    out = subprocess.run([sys.executable, "-m", "hub", "secrets", "rotate", "--batch", "1"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "re-encrypted 1 stored value(s)" in out.stdout and "can be removed" in out.stdout
    assert "s3cr3t" not in out.stdout + out.stderr
    with sessions() as session:
        assert vault.read_variable(session, parse_keys(new), "db_password") == "s3cr3t-value"


# --- masking ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "sensitive"),
    [("password", True), ("DB_PASSWORD", True), ("api_key", True), ("apiKey", True), ("privateKey", True), ("aws_secret_access_key", True),
     ("auth_token", True), ("credentials", True), ("ssh-private", True), ("passphrase", True),
     ("region", False), ("keyboard_layout", False), ("monkey", False), ("host", False), ("tokenizer", False), ("", False)],
)
def test_sensitive_names(name: str, sensitive: bool) -> None:
    assert is_sensitive(name) is sensitive


def test_redact_masks_sensitive_names_and_known_values_anywhere() -> None:
    masker = Masker()
    masker.set_source(lambda: ["s3cr3t-value", "ab"])  # too short values are not masked (they would garble everything)
    masker.add({"nested": ["marked-by-dag"]})
    data = {"password": "whatever", "note": "uses s3cr3t-value and marked-by-dag", "list": [{"api_key": 5}], "ab": "ab", "count": 3}
    assert masker.redact(data) == {"password": MASK, "note": f"uses {MASK} and {MASK}", "list": [{"api_key": MASK}], "ab": "ab", "count": 3}


def test_log_filter_masks_messages_arguments_and_tracebacks() -> None:
    masker = Masker()
    masker.set_source(lambda: ["tok-3141592653"])
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskingFilter(masker))
    logger = logging.getLogger("test.masking")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("calling with %s", "tok-3141592653")
        try:
            raise RuntimeError("bad token tok-3141592653")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "tok-3141592653" not in text
    assert "calling with ***" in text and "RuntimeError: bad token ***" in text


def test_the_masker_follows_changes_of_stored_secrets(db) -> None:  # type: ignore[no-untyped-def]
    _path, sessions = db
    cipher = parse_keys(key())
    masker = Masker(refresh_interval=3600)
    masker.set_source(vault.secret_values(sessions, cipher))
    vault.set_variable(sessions, cipher, "region", "eu-west-1", NOW)  # not sensitive: not masked
    vault.set_variable(sessions, cipher, "service_token", '{"a": "leaf-secret-1", "b": 12345}', NOW)
    vault.save_connection(sessions, cipher, "c", {"password": "pw-long-1", "extra": {"client_secret": "cs-long-1", "region": "eu-north"}}, NOW, create=True)
    assert masker.mask_text("eu-west-1 leaf-secret-1 12345 pw-long-1 cs-long-1 eu-north") == f"eu-west-1 {MASK} {MASK} {MASK} {MASK} eu-north"
    vault.set_variable(sessions, cipher, "other_password", "new-pw-99", NOW)
    assert masker.mask_text("new-pw-99") == "new-pw-99"  # cached for refresh_interval...
    masker.invalidate()  # ...unless told (vault writes invalidate the process's MASKER)
    assert masker.mask_text("new-pw-99") == MASK


# --- standalone ------------------------------------------------------------------------------


def _start_standalone(state: Path) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_HUB_")}
    proc = subprocess.Popen([sys.executable, "-m", "hub", "standalone", "--state-dir", str(state), "--agents", "0", "--no-demo", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Dashboard:" in line:
            return proc, line.split("Dashboard: ")[1].split()[0].rstrip("/")
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError("standalone did not start:\n" + "".join(lines))


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


def _admin(state: Path) -> dict[str, str]:
    """The admin token standalone writes on its first run."""
    return {"Authorization": f"Bearer {(state / 'hub' / 'admin-token').read_text().strip()}"}


def test_standalone_needs_no_configuration_and_keeps_its_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc, url = _start_standalone(state)
    try:
        answer = httpx.put(f"{url}/api/v1/variables/demo_token", json={"value": "standalone-secret-1"}, headers=_admin(state), timeout=10)
        assert answer.status_code == 200, answer.text
        assert "standalone-secret-1" not in answer.text
    finally:
        _stop(proc)
    key_file = state / "hub" / "fernet.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    first_key = key_file.read_text()
    proc, url = _start_standalone(state)
    try:
        assert httpx.get(f"{url}/api/v1/variables/demo_token", headers=_admin(state), timeout=10).json()["is_set"] is True
    finally:
        _stop(proc)
    assert key_file.read_text() == first_key
    engine = make_engine(f"sqlite:///{state / 'hub' / 'hub.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            assert vault.read_variable(session, parse_keys(first_key), "demo_token") == "standalone-secret-1"
    finally:
        engine.dispose()


@given(values=st.sets(st.text(alphabet="ab.*\n", min_size=1, max_size=8), min_size=1, max_size=12), text=st.text(alphabet="ab.*\nc", max_size=60))
@settings(max_examples=300, deadline=None)
def test_the_trie_regex_masks_exactly_like_longest_first_alternation(values: set[str], text: str) -> None:
    naive = re.compile("|".join(re.escape(v) for v in sorted(values, key=len, reverse=True)))
    assert compile_alternatives(values).sub("#", text) == naive.sub("#", text)
