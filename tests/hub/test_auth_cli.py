"""``outpost-hub users|tokens`` on a real SQLite file, the secret key check
at start-up (exit 2), the standalone first-run credentials, and the
``outpost`` CLI's token (where it comes from, what 401/403 say)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hub.auth import tokens
from hub.auth.bootstrap import ensure_admin
from hub.auth.keys import load_or_create_secret_key
from hub.cli import EXIT_CONFIG, main as hub_main
from hub.ctl import main as ctl_main
from hub.ctl.errors import ExitCode
from hub.db import make_engine, make_sessionmaker
from hub.models import AuditRecord
from shared.clock import utcnow
from tests.hub.api_harness import FERNET_KEY, TEST_SECRET_KEY, Hub, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "hub.toml"
    path.write_text(f'database_url = "sqlite:///{tmp_path / "hub.db"}"\nsecret_key = "{TEST_SECRET_KEY}"\nstate_dir = "{tmp_path / "state"}"\n')
    return path


def hub_cli(config: Path, capsys: pytest.CaptureFixture[str], *argv: str, stdin: str | None = None, monkeypatch: Any = None) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = hub_main([argv[0], *argv[1:], "--config", str(config)] if argv[0] not in ("users", "tokens") else [argv[0], "--config", str(config), *argv[1:]])
    out, err = capsys.readouterr()
    return code, out, err


def test_users_and_tokens_commands_work_on_the_database_and_are_audited(config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, out, err = hub_cli(config, capsys, "users", "create", "alice", "--role", "operator", "--scope-tag", "fleet", stdin="alice-password-1\n", monkeypatch=monkeypatch)
    assert (code, out) == (0, "created operator alice\n"), err
    code, out, _ = hub_cli(config, capsys, "users", "create", "bob", "--generate-password")
    assert code == 0 and out.startswith("password: ") and out.endswith("created viewer bob\n")
    code, _, err = hub_cli(config, capsys, "users", "create", "alice", stdin="alice-password-2\n", monkeypatch=monkeypatch)
    assert code == 1 and "already exists" in err
    code, _, err = hub_cli(config, capsys, "users", "create", "carol", stdin="short\n", monkeypatch=monkeypatch)
    assert code == 1 and "at least 10 characters" in err
    code, out, _ = hub_cli(config, capsys, "users", "list")
    assert out.splitlines()[1].split() == ["alice", "operator", "active", "scope_tags=fleet"]
    assert hub_cli(config, capsys, "users", "set-role", "bob", "operator")[1] == "bob is now operator\n"
    assert hub_cli(config, capsys, "users", "disable", "bob")[0] == 0
    assert hub_cli(config, capsys, "users", "passwd", "alice", stdin="alice-password-3\n", monkeypatch=monkeypatch)[0] == 0

    code, secret, err = hub_cli(config, capsys, "tokens", "create", "alice", "--name", "ci", "--role", "viewer", "--expires-days", "7")
    secret = secret.strip()
    assert code == 0 and secret.startswith("opt_") and "shown only now" in err
    code, _, err = hub_cli(config, capsys, "tokens", "create", "alice", "--role", "admin")
    assert code == 1 and "cannot have more than its user's role" in err
    token_file = config.parent / "alice.token"
    assert hub_cli(config, capsys, "tokens", "create", "alice", "--file", str(token_file))[0] == 0
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.read_text().startswith("opt_")
    code, out, _ = hub_cli(config, capsys, "tokens", "list", "--user", "alice")
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ID", "USER", "NAME", "ROLE"] and len(lines) == 3 and secret not in out
    assert lines[2].split()[:5] == ["1", "alice", "ci", "viewer", "active"]
    assert hub_cli(config, capsys, "tokens", "revoke", "1")[1] == "token 1 revoked\n"
    assert hub_cli(config, capsys, "tokens", "revoke", "99")[0] == 1

    engine = make_engine(f"sqlite:///{config.parent / 'hub.db'}")
    try:
        sessions = make_sessionmaker(engine)
        assert tokens.authenticate(sessions, secret, utcnow()) is None  # revoked
        with sessions() as s:
            audit = [(r.actor, r.action, r.target) for r in s.scalars(select(AuditRecord).order_by(AuditRecord.id))]
    finally:
        engine.dispose()
    assert audit == [
        ("cli", "user.create", "alice"), ("cli", "user.create", "bob"), ("cli", "user.set_role", "bob"), ("cli", "user.disable", "bob"),
        ("cli", "user.set_password", "alice"), ("cli", "token.create", "token:1"), ("cli", "token.create", "token:2"), ("cli", "token.revoke", "token:1"),
    ]


@pytest.mark.parametrize(("value", "why"), [("", "empty"), ("changeme", "known default"), ("x7Yq-2fKp9Lm3Qr8Zt5W", "fewer than 32")])
def test_the_hub_refuses_to_start_without_a_proper_secret_key(tmp_path: Path, value: str, why: str) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nsecret_key = "{value}"\napi_port = 0\nfernet_keys = "{FERNET_KEY}"\n')
    for role in ("api", "scheduler"):
        done = subprocess.run([sys.executable, "-m", "hub", role, "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == EXIT_CONFIG == 2, done.stderr
        assert "outpost-hub: secret_key is" in done.stderr and why in done.stderr
        assert "Traceback" not in done.stderr


def test_standalone_first_run_credentials_are_made_once_and_kept_private(tmp_path: Path, hub: Hub) -> None:
    key = load_or_create_secret_key(tmp_path / "secret-key")
    assert load_or_create_secret_key(tmp_path / "secret-key") == key and len(key) >= 48
    assert (tmp_path / "secret-key").stat().st_mode & 0o777 == 0o600
    # The seeded hub has users already, none called admin: nothing is made.
    folder = tmp_path / "hub"
    login = ensure_admin(hub.sessions, folder, utcnow(hub.clock))
    assert login.password_file is None and login.token_file is None and not list(folder.iterdir())

    fresh = tmp_path / "fresh.db"
    from hub.db import upgrade

    upgrade(f"sqlite:///{fresh}")
    engine = make_engine(f"sqlite:///{fresh}")
    try:
        sessions = make_sessionmaker(engine)
        first = ensure_admin(sessions, folder, utcnow(hub.clock))
        assert first.password_file is not None and first.password_file.stat().st_mode & 0o777 == 0o600 and first.token_file is not None
        password = first.password_file.read_text().strip()
        token = first.token_file.read_text().strip()
        assert first.token_file.stat().st_mode & 0o777 == 0o600
        who = tokens.authenticate(sessions, token, utcnow(hub.clock))
        assert who is not None and (who.name, who.role) == ("admin", "admin")
        again = ensure_admin(sessions, folder, utcnow(hub.clock))
        assert again.token_file is not None and again.token_file.read_text().strip() == token and first.password_file.read_text().strip() == password
        first.token_file.write_text("opt_revoked-or-lost\n")
        renewed = ensure_admin(sessions, folder, utcnow(hub.clock)).token_file
        assert renewed is not None and renewed.read_text().strip() not in ("opt_revoked-or-lost", token)
    finally:
        engine.dispose()


# --- the outpost CLI's token ------------------------------------------------------


def test_outpost_finds_its_token_in_the_documented_order(live_hub: tuple[Hub, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hub_, url = live_hub
    viewer_file = tmp_path / "viewer.token"
    viewer_file.write_text(hub_.token("viewer") + "\n")

    def whoami(*extra: str) -> tuple[int, str]:
        capsys.readouterr()
        code = ctl_main(["--hub", url, *extra, "runs", "list", "-o", "json"])
        return code, capsys.readouterr().err

    monkeypatch.delenv("OUTPOST_TOKEN")
    monkeypatch.chdir(tmp_path)  # no .outpost/hub/admin-token here
    code, err = whoami()
    assert code == ExitCode.AUTH == 7
    assert err == f"outpost: error: the hub at {url} needs an API token: pass --token-file PATH (or set OUTPOST_TOKEN_FILE / OUTPOST_TOKEN); an admin creates one with 'outpost-hub tokens create USER'\n"
    assert whoami("--token-file", str(viewer_file))[0] == 0
    monkeypatch.setenv("OUTPOST_TOKEN_FILE", str(viewer_file))
    assert whoami()[0] == 0
    monkeypatch.setenv("OUTPOST_TOKEN", "opt_bogus")  # the environment's token beats any file
    code, err = whoami("--token-file", str(viewer_file))
    assert code == 7 and "refused the API token" in err
    assert whoami("--token", hub_.token("viewer"))[0] == 0  # the flag beats the environment
    # The demo's token file in the current folder is the last resort.
    monkeypatch.delenv("OUTPOST_TOKEN")
    monkeypatch.delenv("OUTPOST_TOKEN_FILE")
    (tmp_path / ".outpost" / "hub").mkdir(parents=True)
    (tmp_path / ".outpost" / "hub" / "admin-token").write_text(hub_.token("admin"))
    assert whoami()[0] == 0
    assert whoami("--token-file", str(tmp_path / "missing"))[0] == ExitCode.USAGE


def test_outpost_says_which_role_a_command_needs(live_hub: tuple[Hub, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hub_, url = live_hub
    monkeypatch.setenv("OUTPOST_TOKEN", hub_.token("viewer"))
    capsys.readouterr()
    assert ctl_main(["--hub", url, "dags", "trigger", "fleet_health"]) == ExitCode.AUTH
    assert capsys.readouterr().err == "outpost: error: not allowed: POST /api/v1/dags/{dag_id}/runs needs the operator role; test-viewer acts as viewer\n"
    assert ctl_main(["--hub", url, "dags", "list"]) == 0
