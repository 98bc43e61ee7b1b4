"""Multi-use enrolment tokens (fleet provisioning): ``uses`` is enforced
under concurrency, they expire like one-time tokens, every use and refusal
is audited, and the admin API and ``outpost-hub agents token create --uses``
make them. Real SQLite files, the real app over HTTP (TestClient)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from hub.api.app import create_app
from alembic import command

from hub.db import alembic_config, make_engine, make_sessionmaker, transaction, upgrade
from hub.events import EventBus
from hub.models import Agent, AuditRecord, EnrolmentToken
from shared.clock import ManualClock
from shared.signing import SigningKey
from tests.hub.api_harness import FERNET_KEY, START, TEST_SECRET_KEY, admin_headers, hub_settings, LiveServer


@dataclass
class TokenHub:
    client: TestClient
    sessions: sessionmaker[Session]
    clock: ManualClock
    app: object

    def token(self, **body: object) -> dict[str, object]:
        response = self.client.post("/api/v1/enrolment-tokens", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def enrol(self, token: str, agent_id: str, client: TestClient | None = None) -> httpx.Response:
        return (client or self.client).post("/api/v1/enroll", json={"token": token, "agent_id": agent_id, "public_key": SigningKey.generate().public.to_text()})

    def audit(self, action: str) -> list[AuditRecord]:
        with self.sessions() as session:
            return list(session.scalars(select(AuditRecord).where(AuditRecord.action == action).order_by(AuditRecord.id)))


@pytest.fixture
def token_hub(tmp_path: Path) -> Iterator[TokenHub]:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    clock = ManualClock(START)
    app = create_app(hub_settings(database_url=url, state_dir=tmp_path / "hub"), sessions, EventBus(), clock)
    with TestClient(app, headers=admin_headers(sessions)) as client:
        yield TokenHub(client, sessions, clock, app)
    engine.dispose()


def test_a_token_for_three_devices_enrols_three_then_refuses_and_audits_each_use(token_hub: TokenHub) -> None:
    issued = token_hub.token(expires="1h", uses=3, labels={"batch": "b7"})
    assert issued["uses"] == 3
    for i in range(3):
        answer = token_hub.enrol(str(issued["token"]), f"sim-{i}")
        assert answer.status_code == 200, answer.text
        assert answer.json()["labels"] == {"batch": "b7"}
    fourth = token_hub.enrol(str(issued["token"]), "sim-3")
    assert fourth.status_code == 401 and fourth.json()["error"]["code"] == "token_used"
    assert "3 of 3" in fourth.json()["error"]["message"]
    with token_hub.sessions() as session:
        row = session.scalars(select(EnrolmentToken)).one()
        assert (row.uses, row.use_count, row.used_by) == (3, 3, "sim-2")
        assert session.get(Agent, "sim-3") is None
        assert {a.agent_id for a in session.scalars(select(Agent))} == {"sim-0", "sim-1", "sim-2"}
    enrolments = token_hub.audit("agent.enrol")
    assert [(r.target, r.success, r.detail.get("use")) for r in enrolments] == [("sim-0", True, 1), ("sim-1", True, 2), ("sim-2", True, 3), ("sim-3", False, None)]
    assert enrolments[-1].detail["code"] == "token_used"
    created = token_hub.audit("enrolment_token.create")
    assert created[-1].detail["uses"] == 3


def test_concurrent_enrolments_never_overrun_the_count(tmp_path: Path) -> None:
    # A real server with worker threads: the row lock, not luck, keeps the count.
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    app = create_app(hub_settings(database_url=url, state_dir=tmp_path / "hub"), sessions, EventBus(), ManualClock(START))
    try:
        with LiveServer(app) as server:
            made = httpx.post(f"{server.url}/api/v1/enrolment-tokens", json={"uses": 5}, headers=admin_headers(sessions), timeout=10)
            token = made.json()["token"]

            def enrol(i: int) -> int:
                body = {"token": token, "agent_id": f"race-{i}", "public_key": SigningKey.generate().public.to_text()}
                return httpx.post(f"{server.url}/api/v1/enroll", json=body, timeout=30).status_code

            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(enrol, range(12)))
        assert sorted(codes) == [200] * 5 + [401] * 7
        with sessions() as session:
            assert session.scalars(select(EnrolmentToken)).one().use_count == 5
            assert len(list(session.scalars(select(Agent)))) == 5
    finally:
        engine.dispose()


def test_a_multi_use_token_expires_like_any_other(token_hub: TokenHub) -> None:
    issued = token_hub.token(expires="10m", uses=100)
    assert token_hub.enrol(str(issued["token"]), "early").status_code == 200
    token_hub.clock.advance(timedelta(minutes=11).total_seconds())
    late = token_hub.enrol(str(issued["token"]), "late")
    assert late.status_code == 401 and late.json()["error"]["code"] == "token_expired"


def test_a_multi_use_token_never_takes_over_an_enrolled_id(token_hub: TokenHub) -> None:
    issued = token_hub.token(uses=5)
    assert token_hub.enrol(str(issued["token"]), "pump-1").status_code == 200
    again = token_hub.enrol(str(issued["token"]), "pump-1")
    assert again.status_code == 409
    with token_hub.sessions() as session:
        # A refused attempt does not spend a use.
        assert session.scalars(select(EnrolmentToken)).one().use_count == 1


@pytest.mark.parametrize("body", [{"uses": 0}, {"uses": 100_001}, {"uses": "3"}, {"uses": 2, "agent_id": "pump-1"}, {"uses": True}])
def test_bad_uses_are_refused_with_a_clear_error(token_hub: TokenHub, body: dict[str, object]) -> None:
    response = token_hub.client.post("/api/v1/enrolment-tokens", json=body)
    assert response.status_code == 422, response.text
    assert set(response.json()["error"]) >= {"code", "message"}
    with token_hub.sessions() as session:
        assert session.scalars(select(EnrolmentToken)).first() is None


def test_one_time_tokens_used_before_the_migration_stay_used(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    command.upgrade(alembic_config(url), "0014_registry")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO enrolment_tokens (token_hash, agent_id, labels, created_at, created_by, expires_at, used_at, used_by) VALUES "
                "('a', NULL, '{}', '2026-01-01 00:00:00', 'cli', '2026-02-01 00:00:00', '2026-01-02 00:00:00', 'old-1'),"
                "('b', NULL, '{}', '2026-01-01 00:00:00', 'cli', '2026-02-01 00:00:00', NULL, NULL)"
            )
        upgrade(url)
        with make_sessionmaker(engine)() as session:
            rows = {r.token_hash: (r.uses, r.use_count) for r in session.scalars(select(EnrolmentToken))}
        assert rows == {"a": (1, 1), "b": (1, 0)}
    finally:
        engine.dispose()


def test_the_hub_cli_makes_a_multi_use_token(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(f'state_dir = "{tmp_path / "hub"}"\nfernet_keys = "{FERNET_KEY}"\nsecret_key = "{TEST_SECRET_KEY}"\n')
    done = subprocess.run([sys.executable, "-m", "hub", "agents", "token", "create", "--uses", "250", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith("opte_") and "for 250 devices" in done.stderr
    refused = subprocess.run(
        [sys.executable, "-m", "hub", "agents", "token", "create", "--uses", "2", "--agent-id", "pump-1", "--config", str(config)], capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0 and "agent id" in refused.stderr
    engine = make_engine(f"sqlite:///{tmp_path / 'hub' / 'hub.db'}")
    try:
        with transaction(make_sessionmaker(engine)) as session:
            assert [r.uses for r in session.scalars(select(EnrolmentToken))] == [250]
    finally:
        engine.dispose()
