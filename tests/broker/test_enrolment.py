"""Enrolment end to end: a token from the hub's CLI, ``outpost-agent enroll``
over real HTTPS (uvicorn with a certificate from a test CA) against the real
API, broker credentials created in the real production broker, and
revocation cutting the broker and the HTTP API."""

from __future__ import annotations

import json
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from agent.config import load_settings
from agent.sync import HubSyncClient
from agent.trust import TrustStore
from hub import enrolment
from hub import events as ev
from hub.api.app import create_app
from hub.config import HubSettings
from tests.conftest import stop_process
from tests.hub.api_harness import FERNET_KEY, TEST_SECRET_KEY, admin_headers
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.events import EventBus
from hub.models import Agent, AuditRecord, DagRun
from hub.runtime import HubRuntime
from hub.scheduler import trigger_run
from shared.clock import SystemClock, utcnow
from shared.mqtt import MqttLink
from shared.requestsig import HEADER, sign_request
from shared.signing import SigningKey
from shared.topics import assign_topic
from tests.broker.conftest import ADMIN_PASSWORD, ADMIN_USER, HUB_PASSWORD, HUB_USER, SecureBroker, connect_result
from tests.broker.pki import Pki


@dataclass
class EnrolHub:
    url: str
    config: Path
    settings: HubSettings
    sessions: sessionmaker[Session]
    ca: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hub", *args, "--config", str(self.config)], capture_output=True, text=True, timeout=60)

    def token(self, *extra: str) -> str:
        done = self.cli("agents", "token", "create", *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def audit(self, action: str) -> list[AuditRecord]:
        with self.sessions() as session:
            return list(session.scalars(select(AuditRecord).where(AuditRecord.action == action).order_by(AuditRecord.id)))


@pytest.fixture
def enrol_hub(tmp_path: Path, secure_broker: SecureBroker, pki: Pki) -> Iterator[EnrolHub]:
    """The hub's API over HTTPS, managing credentials in the production broker:
    it reaches the broker on the loopback listener, devices get the TLS one."""
    config = tmp_path / "hub.toml"
    config.write_text(
        f'state_dir = "{tmp_path / "hub"}"\nbroker_port = {secure_broker.plain_port}\n'
        f'broker_username = "{HUB_USER}"\nbroker_password = "{HUB_PASSWORD}"\n'
        f'broker_admin_username = "{ADMIN_USER}"\nbroker_admin_password = "{ADMIN_PASSWORD}"\n'
        f'agent_broker_host = "localhost"\nagent_broker_port = {secure_broker.tls_port}\nagent_broker_tls = true\n'
        f'fernet_keys = "{FERNET_KEY}"\nsecret_key = "{TEST_SECRET_KEY}"\n'
    )
    settings = HubSettings.load(config)
    (tmp_path / "hub").mkdir()
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    app = create_app(settings, sessions, EventBus(), SystemClock())
    server = uvicorn.Server(uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ssl_certfile=str(pki.server_cert), ssl_keyfile=str(pki.server_key),
    ))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield EnrolHub(f"https://127.0.0.1:{port}", config, settings, sessions, pki.ca)
    finally:
        server.should_exit = True
        thread.join(10)
        engine.dispose()


def agent_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60)


def enroll(hub: EnrolHub, state: Path, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return agent_cli("enroll", "--hub", hub.url, "--token", token, "--ca-file", str(hub.ca), "--state-dir", str(state), *extra)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_device_enrols_over_https_and_connects_with_its_own_credentials(tmp_path: Path, enrol_hub: EnrolHub, secure_broker: SecureBroker) -> None:
    token = enrol_hub.token("--expires", "1h", "--labels", "site=north,rack=r2")
    assert token.startswith("opte_")
    state = tmp_path / "device"
    done = enroll(enrol_hub, state, token, "--agent-id", "pump-1")
    assert done.returncode == 0, done.stderr
    assert "enrolled as pump-1" in done.stdout and "(TLS)" in done.stdout
    key_file, enrolment_file = state / "identity" / "device.key", state / "identity" / "enrolment.json"
    assert mode(key_file) == 0o600 and mode(enrolment_file) == 0o600 and mode(state / "identity") == 0o700
    device_key = SigningKey.load(key_file)
    with enrol_hub.sessions() as session:
        agent = session.get(Agent, "pump-1")
        assert agent is not None and agent.public_key == device_key.public.to_text()
        assert agent.labels == {"site": "north", "rack": "r2"}
    # Only the public key travelled: the private key is nowhere in the hub's database.
    raw_private = device_key.key.private_bytes_raw()
    assert raw_private not in Path(enrol_hub.settings.db_url.removeprefix("sqlite:///")).read_bytes()
    hub_keys = json.loads((state / "identity" / "hub-keys.json").read_text())["keys"]
    assert hub_keys == enrolment.hub_public_keys(enrol_hub.settings)
    [record] = enrol_hub.audit("agent.enrol")
    assert (record.actor, record.success, record.detail["key_id"]) == ("agent:pump-1", True, device_key.kid)

    # 'outpost-agent run' reads the enrolment: no agent_id, no broker lines in its file.
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\n')
    settings = load_settings(config, env={})
    assert (settings.agent_id, settings.broker_host, settings.broker_port, settings.broker_tls) == ("pump-1", "localhost", secure_broker.tls_port, True)
    assert settings.hub_url == enrol_hub.url and settings.labels == {"site": "north", "rack": "r2"}
    assert settings.tls_ca is not None and Path(settings.tls_ca).read_bytes() == enrol_hub.ca.read_bytes()
    assert agent_cli("check", "--config", str(config)).returncode == 0
    link = MqttLink(secure_broker.settings(settings.broker_username, settings.broker_password, "pump-1", tls=True), [(assign_topic("pump-1"), 1)])
    link.start()
    try:
        assert link.wait_connected(10), secure_broker.log[-2000:]
    finally:
        link.stop()


def test_a_token_works_once_and_unknown_expired_or_foreign_tokens_are_refused(tmp_path: Path, enrol_hub: EnrolHub) -> None:
    def post(token: str, agent_id: str | None) -> httpx.Response:
        body = {"token": token, "agent_id": agent_id, "public_key": SigningKey.generate().public.to_text()}
        return httpx.post(f"{enrol_hub.url}/api/v1/enroll", json=body, verify=enrol_hub.tls(), timeout=30)

    token = enrol_hub.token()
    assert post(token, "pump-1").status_code == 200
    now = utcnow(SystemClock())
    with transaction(enrol_hub.sessions) as session:
        expired = enrolment.create_token(session, now - timedelta(hours=2), timedelta(hours=1), "test")
        bound = enrolment.create_token(session, now, timedelta(hours=1), "test", agent_id="pump-9")
    for token_text, agent_id, code in (
        (token, "pump-2", "token_used"), ("opte_nope", "pump-3", "token_unknown"), (expired.token, "pump-4", "token_expired"),
        (bound.token, "pump-5", "token_agent_mismatch"),
    ):
        answer = post(token_text, agent_id)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == code, answer.text
    # A token without an id cannot take over an enrolled device's id.
    taken = post(enrol_hub.token(), "pump-1")
    assert taken.status_code == 409 and "already enrolled" in taken.json()["error"]["message"]
    # A token made for an id names it; the device may leave its id out.
    answer = post(bound.token, None)
    assert answer.status_code == 200 and answer.json()["agent_id"] == "pump-9"
    refusals = [r for r in enrol_hub.audit("agent.enrol") if not r.success]
    assert sorted(r.detail["code"] for r in refusals) == ["token_agent_mismatch", "token_expired", "token_unknown", "token_used"]
    with enrol_hub.sessions() as session:
        assert session.get(Agent, "pump-2") is None and session.get(Agent, "pump-5") is None


def test_an_enrolled_device_is_not_enrolled_again_without_force(tmp_path: Path, enrol_hub: EnrolHub, secure_broker: SecureBroker) -> None:
    state = tmp_path / "device"
    assert enroll(enrol_hub, state, enrol_hub.token("--agent-id", "pump-1")).returncode == 0
    first_key = (state / "identity" / "device.key").read_bytes()
    first_password = json.loads((state / "identity" / "enrolment.json").read_text())["broker_password"]
    again = enroll(enrol_hub, state, enrol_hub.token("--agent-id", "pump-1"), "--agent-id", "pump-1")
    assert again.returncode == 1 and "enrolled already" in again.stderr and "--force" in again.stderr
    assert (state / "identity" / "device.key").read_bytes() == first_key
    # A token that fails leaves the identity as it was, even with --force.
    failed = enroll(enrol_hub, state, "opte_unknown", "--agent-id", "pump-1", "--force")
    assert failed.returncode == 1 and "token_unknown" in failed.stderr
    assert (state / "identity" / "device.key").read_bytes() == first_key
    forced = enroll(enrol_hub, state, enrol_hub.token("--agent-id", "pump-1"), "--agent-id", "pump-1", "--force")
    assert forced.returncode == 0, forced.stderr
    new_key = SigningKey.load(state / "identity" / "device.key")
    with enrol_hub.sessions() as session:
        assert session.get(Agent, "pump-1").public_key == new_key.public.to_text()  # type: ignore[union-attr]
    assert connect_result(secure_broker.settings("pump-1", first_password, "pump-1")) == "Not authorized"


def test_enrolment_needs_https_and_a_trusted_certificate(tmp_path: Path, enrol_hub: EnrolHub) -> None:
    token = enrol_hub.token()
    plain = agent_cli("enroll", "--hub", enrol_hub.url.replace("https://", "http://"), "--token", token, "--agent-id", "p", "--state-dir", str(tmp_path / "d"))
    assert plain.returncode == 1 and "must start with https://" in plain.stderr
    untrusted = agent_cli("enroll", "--hub", enrol_hub.url, "--token", token, "--agent-id", "p", "--state-dir", str(tmp_path / "d"))
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    assert not (tmp_path / "d" / "identity" / "device.key").exists()


def test_revoking_cuts_the_broker_and_the_http_api(tmp_path: Path, enrol_hub: EnrolHub, secure_broker: SecureBroker) -> None:
    state = tmp_path / "device"
    assert enroll(enrol_hub, state, enrol_hub.token(), "--agent-id", "pump-1").returncode == 0
    values = json.loads((state / "identity" / "enrolment.json").read_text())
    key = SigningKey.load(state / "identity" / "device.key")
    link = MqttLink(secure_broker.settings(values["broker_username"], values["broker_password"], "pump-1", tls=True, reconnect_min=1, reconnect_max=1))
    link.start()
    path = "/api/v1/agents/pump-1/sync"

    def sync_status() -> httpx.Response:
        header = sign_request(key, "pump-1", "GET", path, b"", time.time())
        return httpx.get(enrol_hub.url + path, headers={HEADER: header}, verify=enrol_hub.tls(), timeout=10)

    try:
        assert link.wait_connected(10)
        assert sync_status().status_code == 200
        done = enrol_hub.cli("agents", "revoke", "pump-1")
        assert done.returncode == 0, done.stderr
        assert "its broker client is deleted" in done.stdout
        deadline = time.monotonic() + 10
        while link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected.is_set(), "the revoked device is still connected"
        assert connect_result(secure_broker.settings(values["broker_username"], values["broker_password"], "pump-1", tls=True)) == "Not authorized"
        refused = sync_status()
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "agent_revoked"
    finally:
        link.stop()
    with enrol_hub.sessions() as session:
        assert session.get(Agent, "pump-1").revoked_at is not None  # type: ignore[union-attr]
    [record] = enrol_hub.audit("agent.revoke")
    assert (record.actor, record.target) == ("cli", "pump-1")
    # A revoked device cannot enrol back in with a new token either...
    answer = httpx.post(f"{enrol_hub.url}/api/v1/enroll", json={"token": enrol_hub.token("--agent-id", "pump-1"), "public_key": key.public.to_text()}, verify=enrol_hub.tls(), timeout=30)
    assert answer.status_code == 409 and "revoked" in answer.json()["error"]["message"]
    # ... until an admin reinstates it on purpose.
    assert enrol_hub.cli("agents", "reinstate", "pump-1").returncode == 0
    again = enroll(enrol_hub, state, enrol_hub.token("--agent-id", "pump-1"), "--agent-id", "pump-1", "--force")
    assert again.returncode == 0, again.stderr
    assert [r.target for r in enrol_hub.audit("agent.reinstate")] == ["pump-1"]


def test_a_preregistered_device_gets_credentials_once(tmp_path: Path, enrol_hub: EnrolHub, secure_broker: SecureBroker) -> None:
    key = SigningKey.generate()
    done = enrol_hub.cli("agents", "register", "--id", "pump-7", "--public-key", key.public.to_text())
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" = ", 1) for line in done.stdout.splitlines() if " = " in line)
    username, password = json.loads(lines["broker_username"]), json.loads(lines["broker_password"])
    assert connect_result(secure_broker.settings(username, password, "pump-7")) == "Success"
    with enrol_hub.sessions() as session:
        assert session.get(Agent, "pump-7").public_key == key.public.to_text()  # type: ignore[union-attr]
    assert [r.target for r in enrol_hub.audit("agent.register")] == ["pump-7"]
    bad = enrol_hub.cli("agents", "register", "--id", "pump-8", "--public-key", "ed25519:c2hvcnQ")
    assert bad.returncode == 1 and "32 bytes" in bad.stderr


def test_admin_api_creates_tokens_and_revokes(enrol_hub: EnrolHub) -> None:
    admin = admin_headers(enrol_hub.sessions)
    anonymous = httpx.post(f"{enrol_hub.url}/api/v1/enrolment-tokens", json={"expires": "2h"}, verify=enrol_hub.tls(), timeout=10)
    assert anonymous.status_code == 401
    operator = httpx.post(f"{enrol_hub.url}/api/v1/enrolment-tokens", json={"expires": "2h"}, headers=admin_headers(enrol_hub.sessions, "operator"), verify=enrol_hub.tls(), timeout=10)
    assert operator.status_code == 403
    made = httpx.post(f"{enrol_hub.url}/api/v1/enrolment-tokens", json={"expires": "2h", "agent_id": "pump-3", "labels": {"site": "x"}}, headers=admin, verify=enrol_hub.tls(), timeout=10)
    assert made.status_code == 201, made.text
    body = made.json()
    assert body["token"].startswith("opte_") and body["agent_id"] == "pump-3"
    with enrol_hub.sessions() as session:
        stored = json.dumps([r.detail for r in session.scalars(select(AuditRecord))])
    assert body["token"] not in stored  # never logged
    assert [r.actor for r in enrol_hub.audit("enrolment_token.create")] == ["user:test-admin"]
    bad = httpx.post(f"{enrol_hub.url}/api/v1/enrolment-tokens", json={"expires": "90d"}, headers=admin, verify=enrol_hub.tls(), timeout=10)
    assert bad.status_code == 422
    missing = httpx.post(f"{enrol_hub.url}/api/v1/agents/nobody/revoke", headers=admin, verify=enrol_hub.tls(), timeout=10)
    assert missing.status_code == 404


DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("enrolled_work") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("pump-1"))
"""


def test_an_enrolled_device_runs_work_and_syncs_with_what_enrolment_stored(tmp_path: Path, enrol_hub: EnrolHub, secure_broker: SecureBroker) -> None:
    """Enrol, then 'outpost-agent run' with a file that names neither the id
    nor the broker: it connects over TLS with its own credentials and runs
    work from the real hub (which holds only the outpost-hub role); its HTTP
    sync client, built from the same settings, is accepted by the hub."""
    state = tmp_path / "device"
    assert enroll(enrol_hub, state, enrol_hub.token(), "--agent-id", "pump-1").returncode == 0
    config = tmp_path / "agent.toml"
    config.write_text(f'state_dir = "{state}"\nheartbeat_interval = 1.0\nsqlite_synchronous = "NORMAL"\n')
    settings = load_settings(config, env={})
    # The hub keys enrolment stored verify the hub's signed answers.
    trusted = TrustStore(settings)
    client = HubSyncClient(settings.hub_url or "", settings.agent_id, SigningKey.load(state / "identity" / "device.key"), timeout=10, ca_file=settings.hub_ca, hub_keys=trusted.keys)
    try:
        assert client.cursor()["agent_id"] == "pump-1"
    finally:
        client.close()

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "enrolled_work.py").write_text(DAG)
    runtime = HubRuntime(HubSettings.load(enrol_hub.config, dags_folder=dags, scheduler_interval=0.2), run_api=False)
    log = open(tmp_path / "agent.log", "ab")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    runtime.start()
    try:
        assert runtime.link.wait_connected(15)
        with transaction(runtime.sessions) as session:
            run_pk = trigger_run(session, "enrolled_work", {}, utcnow(runtime.clock)).id
        runtime.events.emit(ev.RUN_TRIGGERED, dag_id="enrolled_work", run_pk=run_pk)
        deadline = time.monotonic() + 60
        state_of_run = None
        while time.monotonic() < deadline and state_of_run not in ("success", "failed"):
            time.sleep(0.2)
            with runtime.sessions() as session:
                state_of_run = session.get(DagRun, run_pk).state  # type: ignore[union-attr]
        assert state_of_run == "success", (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        stop_process(agent, 15)
        runtime.stop()


def test_without_broker_admin_enrolment_returns_no_credentials_and_a_broker_failure_changes_nothing(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tests.conftest import free_port

    def app_with(**settings: Any) -> tuple[Any, sessionmaker[Session]]:
        hub_settings = HubSettings(state_dir=tmp_path / "hub", fernet_keys=FERNET_KEY, secret_key=TEST_SECRET_KEY, **settings)
        upgrade(hub_settings.db_url)
        sessions = make_sessionmaker(make_engine(hub_settings.db_url))
        return create_app(hub_settings, sessions, EventBus(), SystemClock()), sessions

    (tmp_path / "hub").mkdir()
    # The broker admin is configured but nothing listens: the enrolment fails whole.
    broken, sessions = app_with(broker_port=free_port(), broker_admin_username="outpost-admin", broker_admin_password="x")
    with transaction(sessions) as session:
        token = enrolment.create_token(session, utcnow(SystemClock()), timedelta(hours=1), "test").token
    body = {"token": token, "agent_id": "pump-1", "public_key": SigningKey.generate().public.to_text()}
    with TestClient(broken) as client:
        answer = client.post("/api/v1/enroll", json=body)
    assert answer.status_code == 502 and answer.json()["error"]["code"] == "broker_provisioning_failed"
    assert "cannot reach the broker" in answer.json()["error"]["message"]
    with sessions() as session:
        assert session.get(Agent, "pump-1") is None
    # Credentials managed outside Outpost: the same token still works, without broker credentials.
    unmanaged, _ = app_with()
    with TestClient(unmanaged) as client:
        answer = client.post("/api/v1/enroll", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["broker"] is None and answer.json()["agent_id"] == "pump-1"
    assert len(answer.json()["hub_public_keys"]) == 1


def test_enrol_takes_the_agent_id_the_configuration_file_names(tmp_path: Path, enrol_hub: EnrolHub) -> None:
    state = tmp_path / "device"
    config = tmp_path / "agent.toml"
    config.write_text(f'agent_id = "pump-2"\nstate_dir = "{state}"\n')
    done = agent_cli("enroll", "--hub", enrol_hub.url, "--token", enrol_hub.token(), "--ca-file", str(enrol_hub.ca), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "enrolled as pump-2" in done.stdout
    assert load_settings(config, env={}).broker_username == "pump-2"
