"""TLS to the broker: the shipped listener with a test CA, agents and the hub
connecting with a CA file and client certificates, and what is refused."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub import events as ev
from hub.config import HubSettings
from hub.standalone import provision_device
from tests.conftest import stop_process
from tests.hub.api_harness import FERNET_KEY, TEST_SECRET_KEY
from hub.db import transaction
from hub.models import DagRun, TaskInstance
from hub.runtime import HubRuntime
from hub.scheduler import trigger_run
from shared.clock import utcnow
from shared.mqtt import MqttRequestError, request
from tests.broker.conftest import HUB_PASSWORD, HUB_USER, SecureBroker, connect_result
from tests.broker.pki import Pki

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("over_tls") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("pump-tls"))
"""


@pytest.fixture
def mtls_broker(tmp_path: Path, pki: Pki) -> Iterator[SecureBroker]:
    """The production broker with ``require_certificate true`` uncommented."""
    broker = SecureBroker(tmp_path / "broker", pki, require_certificate=True)
    broker.start()
    try:
        broker.admin().setup(HUB_USER, HUB_PASSWORD)
        yield broker
    finally:
        broker.stop()


# paho leaks the socket of a failed TLS handshake (it is a local variable in
# its connect); the garbage collector closes it with a ResourceWarning.
_PAHO_SOCKET_LEAK = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_PAHO_SOCKET_LEAK
def test_client_without_the_ca_cannot_connect(secure_broker: SecureBroker) -> None:
    settings = secure_broker.settings(HUB_USER, HUB_PASSWORD, "no-ca", tls=True)
    # TLS on, no CA file: the system CA store does not know the test CA.
    untrusting = replace(settings, tls=True, tls_ca=None)
    with pytest.raises(MqttRequestError, match="CERTIFICATE_VERIFY_FAILED"):
        request(untrusting, "outpost/v1/hub/probe/x", b"", "outpost/v1/agents/+/status", timeout=5)
    assert connect_result(settings) == "Success"


@_PAHO_SOCKET_LEAK
def test_client_without_a_certificate_is_refused_when_the_broker_requires_one(mtls_broker: SecureBroker, pki: Pki) -> None:
    without = mtls_broker.settings(HUB_USER, HUB_PASSWORD, "no-cert", tls=True)
    assert connect_result(without).startswith(("connection failed", "disconnected")), "a client without a certificate connected"
    cert, key = pki.issue("outpost-hub")
    with_cert = mtls_broker.settings(HUB_USER, HUB_PASSWORD, "with-cert", tls=True, tls_cert=str(cert), tls_key=str(key))
    assert connect_result(with_cert) == "Success"
    # A certificate still needs the password: the ACLs hang on the user name.
    assert connect_result(mtls_broker.settings(HUB_USER, "wrong", "with-cert", tls=True, tls_cert=str(cert), tls_key=str(key))) == "Not authorized"


def test_agent_over_mutual_tls_runs_work_from_a_hub_with_the_hub_role(tmp_path: Path, mtls_broker: SecureBroker, pki: Pki) -> None:
    """The real hub (scheduler, outbox, ingest) and a real agent process, both
    over TLS with client certificates, each with only its role's rights."""
    creds = mtls_broker.admin().provision_agent("pump-tls")
    hub_cert, hub_key = pki.issue("outpost-hub")
    agent_cert, agent_key = pki.issue("pump-tls")
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "over_tls.py").write_text(DAG)
    settings = HubSettings.load(
        None, state_dir=tmp_path / "hub", dags_folder=dags, broker_port=mtls_broker.tls_port, broker_username=HUB_USER, broker_password=HUB_PASSWORD,
        broker_tls_ca=str(pki.ca), broker_tls_cert=str(hub_cert), broker_tls_key=str(hub_key), scheduler_interval=0.2, api_port=0, fernet_keys=FERNET_KEY, secret_key=TEST_SECRET_KEY,
    )
    runtime = HubRuntime(settings, run_api=False)
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    config = agent_dir / "agent.toml"
    config.write_text(
        f'agent_id = "pump-tls"\nstate_dir = "{agent_dir}"\nbroker_host = "127.0.0.1"\nbroker_port = {mtls_broker.tls_port}\n'
        f'broker_username = "{creds.username}"\nbroker_password = "{creds.password}"\n'
        f'tls_ca = "{pki.ca}"\ntls_cert = "{agent_cert}"\ntls_key = "{agent_key}"\nheartbeat_interval = 1.0\nsqlite_synchronous = "NORMAL"\n'
    )
    runtime.start()
    # The device's key registered and the hub's keys trusted, as enrolment would leave them.
    provision_device(agent_dir, "pump-tls", runtime.sessions, runtime.keyring.ring().public_keys(), utcnow(runtime.clock))
    log = open(agent_dir / "agent.log", "ab")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        assert runtime.link.wait_connected(15), mtls_broker.log[-2000:]
        with transaction(runtime.sessions) as session:
            run_pk = trigger_run(session, "over_tls", {}, utcnow(runtime.clock)).id
        runtime.events.emit(ev.RUN_TRIGGERED, dag_id="over_tls", run_pk=run_pk)
        deadline = time.monotonic() + 60
        state = None
        while time.monotonic() < deadline:
            with runtime.sessions() as session:
                state = session.get(DagRun, run_pk).state  # type: ignore[union-attr]
            if state in ("success", "failed"):
                break
            time.sleep(0.2)
        with runtime.sessions() as session:
            tis = [(ti.task_id, ti.state, ti.agent_id) for ti in session.query(TaskInstance).filter_by(run_pk=run_pk)]
        assert state == "success", f"{state} {tis}\n{(agent_dir / 'agent.log').read_text()[-3000:]}\n{mtls_broker.log[-3000:]}"
        assert tis == [("t", "success", "pump-tls")]
    finally:
        stop_process(agent, 15)
        runtime.stop()
