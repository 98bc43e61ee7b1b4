"""Device keys, revocation, send sequence numbers, the hub key ring and the audit log."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.errors import AgentNotFound, Conflict
from hub.identity import HubKeyring, device_key, next_send_seq, register_agent, reinstate_agent, revoke_agent
from shared.signing import BadKey, SigningKey

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    return make_sessionmaker(make_engine(url))


def test_register_lookup_and_revoke(sessions: sessionmaker[Session]) -> None:
    key = SigningKey.generate().public
    with transaction(sessions) as session:
        assert device_key(session, "edge-1").standing == "unknown"
        register_agent(session, "edge-1", key.to_text(), NOW)
    with transaction(sessions) as session:
        found = device_key(session, "edge-1")
        assert found.standing == "ok" and found.key is not None and found.key.kid == key.kid
        register_agent(session, "edge-1", key, NOW)  # the same key again is fine
        with pytest.raises(Conflict, match="different public key"):
            register_agent(session, "edge-1", SigningKey.generate().public, NOW)
        revoke_agent(session, "edge-1", NOW)
        revoke_agent(session, "edge-1", NOW + timedelta(hours=1))
    with transaction(sessions) as session:
        assert device_key(session, "edge-1").standing == "revoked"
        with pytest.raises(Conflict, match="revoked"):
            register_agent(session, "edge-1", key, NOW)
        with pytest.raises(AgentNotFound):
            revoke_agent(session, "nobody", NOW)
        reinstate_agent(session, "edge-1")
        register_agent(session, "edge-1", SigningKey.generate().public, NOW, replace=True)
        assert device_key(session, "edge-1").standing == "ok"


def test_bad_agent_id_or_key_is_refused(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        with pytest.raises(ValueError):
            register_agent(session, "../etc", SigningKey.generate().public, NOW)
        with pytest.raises(BadKey):
            register_agent(session, "edge-2", "ed25519:short", NOW)


def test_send_seq_is_strictly_increasing_per_device(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        register_agent(session, "a", SigningKey.generate().public, NOW)
        register_agent(session, "b", SigningKey.generate().public, NOW)
    seen = []
    for _ in range(5):
        with transaction(sessions) as session:
            seen.append(next_send_seq(session, "a"))
    with transaction(sessions) as session:
        assert next_send_seq(session, "b") == 1
        with pytest.raises(AgentNotFound):
            next_send_seq(session, "nobody")
    assert seen == [1, 2, 3, 4, 5]


def test_keyring_is_made_once_private_and_rotates(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    ring = HubKeyring.load_or_create(folder)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert all(stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in folder.iterdir())
    again = HubKeyring.load_or_create(folder)
    assert again.current_kid == ring.current_kid
    new = SigningKey.generate()
    again.add(new)
    reloaded = HubKeyring.load(folder)
    assert reloaded.current_kid == new.kid
    assert [k.kid for k in reloaded.public_keys()] == [new.kid, ring.current_kid]


def test_keyring_pointing_at_a_missing_key_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    HubKeyring.load_or_create(folder)
    (folder / "current").write_text("0123456789abcdef\n")
    with pytest.raises(BadKey, match="not in the folder"):
        HubKeyring.load(folder)
    with pytest.raises(BadKey, match="no hub key ring"):
        HubKeyring.load(tmp_path / "none")


def test_audit_records_and_filters(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        audit.record(session, "user:ada", "auth.login", at=NOW, remote="127.0.0.1")
        audit.record(session, "user:eve", "auth.login_failed", "ada", at=NOW, success=False, remote="10.0.0.9", reason="bad password")
        audit.record(session, "cli", "agent.revoke", "edge-1", at=NOW + timedelta(minutes=1))
    with transaction(sessions) as session:
        assert [r.action for r in audit.recent(session)] == ["agent.revoke", "auth.login_failed", "auth.login"]
        assert [r.actor for r in audit.recent(session, action="auth.*")] == ["user:eve", "user:ada"]
        failed = audit.recent(session, action="auth.login_failed")[0]
        assert failed.success is False and failed.detail == {"reason": "bad password"}
        assert [r.action for r in audit.recent(session, since=NOW + timedelta(seconds=30))] == ["agent.revoke"]
        assert [r.action for r in audit.recent(session, actor="user:ada")] == ["auth.login"]


def test_hub_processes_starting_together_make_one_key_ring(tmp_path: Path) -> None:
    """Concurrent first starts (scheduler and API) agree on one current key."""
    import subprocess
    import sys
    import time

    folder = tmp_path / "keys"
    # Every process imports first, then all start at the same moment.
    code = (
        "import sys, time; from pathlib import Path; from hub.identity import HubKeyring; "
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); print(HubKeyring.load_or_create(Path(sys.argv[1])).current_kid)"
    )
    start = str(time.time() + 3.0)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(folder), start], stdout=subprocess.PIPE, text=True) for _ in range(6)]
    kids = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert len(kids) == 1 and len(list(folder.glob("assign-*.key"))) == 1
