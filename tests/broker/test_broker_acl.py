"""The shipped broker configuration confines every agent to its own topics.

A real Mosquitto runs deploy/mosquitto/mosquitto.conf with its dynamic-security
file made by deploy/mosquitto/dynsec-init.sh and the roles set up by the hub
(``BrokerAdmin``). "Nothing leaked" is checked with a marker: a message sent
after the traffic under test, through the same broker; once the marker is in,
anything the broker would have delivered is in too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hub.brokeradmin import BrokerAdmin, BrokerAdminError
from shared.mqtt import MqttLink, MqttRequestError, MqttSettings, request
from shared.topics import ack_topic, assign_topic, events_topic, hub_subscriptions, status_topic
from tests.broker.conftest import ADMIN_PASSWORD, ADMIN_USER, HUB_PASSWORD, HUB_USER, Listener, SecureBroker, connect_result
from tests.broker.pki import Pki
from tests.conftest import Broker


def _agent(broker: SecureBroker, agent_id: str) -> tuple[str, str]:
    creds = broker.admin().provision_agent(agent_id)
    return creds.username, creds.password


def test_anonymous_and_wrong_password_connections_are_refused(secure_broker: SecureBroker) -> None:
    assert connect_result(secure_broker.settings(None, None, "anon")) == "Not authorized"
    assert connect_result(secure_broker.settings(HUB_USER, "wrong", "outpost-hub")) == "Not authorized"
    assert connect_result(secure_broker.hub_settings()) == "Success"


def test_an_agent_must_connect_with_its_own_id_as_client_id(secure_broker: SecureBroker) -> None:
    user_a, pw_a = _agent(secure_broker, "pump-a")
    _agent(secure_broker, "pump-b")
    # Its password with another agent's client id would take over that
    # agent's session (and its queued assignments): refused.
    assert connect_result(secure_broker.settings(user_a, pw_a, "pump-b")) == "Not authorized"
    assert connect_result(secure_broker.settings(user_a, pw_a, "pump-a")) == "Success"


def test_agent_subscribing_to_other_agents_topics_or_everything_receives_nothing(secure_broker: SecureBroker) -> None:
    user_a, pw_a = _agent(secure_broker, "pump-a")
    user_b, pw_b = _agent(secure_broker, "pump-b")
    spy = Listener(secure_broker.settings(user_a, pw_a, "pump-a"), [
        "#", "outpost/v1/#", "outpost/v1/agents/+/assign", assign_topic("pump-b"), ack_topic("pump-b"), events_topic("pump-b"),
        status_topic("pump-b"), "$share/spies/" + assign_topic("pump-b"), "$SYS/#",
        assign_topic("pump-a"),  # its own: the marker comes here
    ])
    hub = Listener(secure_broker.hub_settings(), hub_subscriptions())
    agent_b = Listener(secure_broker.settings(user_b, pw_b, "pump-b"), [assign_topic("pump-b"), ack_topic("pump-b")])
    try:
        assert spy.granted[:-1] == ["Not authorized"] * (len(spy.granted) - 1)
        assert spy.granted[-1] == "Granted QoS 1"
        # Hub to B, and B to the hub: B and the hub get them, A must not.
        assert hub.publish(assign_topic("pump-b"), b"work for b") == "Success"
        assert hub.publish(ack_topic("pump-b"), b"ack for b") == "Success"
        assert agent_b.until(lambda t, p: p == b"work for b") == [(assign_topic("pump-b"), b"work for b")]
        assert agent_b.publish(events_topic("pump-b"), b"event of b") == "Success"
        assert agent_b.publish(status_topic("pump-b"), b"status of b") == "Success"
        hub.until(lambda t, p: p == b"status of b")
        assert hub.publish(assign_topic("pump-a"), b"marker") == "Success"
        assert spy.until(lambda t, p: p == b"marker") == [(assign_topic("pump-a"), b"marker")]
    finally:
        for client in (spy, hub, agent_b):
            client.close()


def test_agent_publishing_as_another_agent_never_reaches_the_hub(secure_broker: SecureBroker) -> None:
    user_a, pw_a = _agent(secure_broker, "pump-a")
    _agent(secure_broker, "pump-b")
    hub = Listener(secure_broker.hub_settings(), hub_subscriptions())
    forger = Listener(secure_broker.settings(user_a, pw_a, "pump-a"), [])
    try:
        for topic in (events_topic("pump-b"), status_topic("pump-b"), assign_topic("pump-b"), assign_topic("pump-a"), "outpost/v1/anything"):
            assert forger.publish(topic, b"forged") == "Not authorized", topic
        assert forger.publish(events_topic("pump-a"), b"marker") == "Success"
        assert hub.until(lambda t, p: p == b"marker") == [(events_topic("pump-a"), b"marker")]
    finally:
        hub.close()
        forger.close()


def test_revoked_agent_is_disconnected_and_cannot_reconnect(secure_broker: SecureBroker) -> None:
    user, password = _agent(secure_broker, "pump-a")
    link = MqttLink(secure_broker.settings(user, password, "pump-a", reconnect_min=1, reconnect_max=1), [(assign_topic("pump-a"), 1)])
    link.start()
    try:
        assert link.wait_connected(10)
        secure_broker.admin().remove_agent("pump-a")
        deadline = time.monotonic() + 10
        while link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not link.connected.is_set(), "the broker did not disconnect the revoked agent"
        assert connect_result(secure_broker.settings(user, password, "pump-a")) == "Not authorized"
        # Removing it again is not an error (revocation is idempotent).
        secure_broker.admin().remove_agent("pump-a")
    finally:
        link.stop()


def test_enrolling_again_replaces_the_password(secure_broker: SecureBroker) -> None:
    old_user, old_password = _agent(secure_broker, "pump-a")
    new_user, new_password = _agent(secure_broker, "pump-a")
    assert old_password != new_password
    assert connect_result(secure_broker.settings(old_user, old_password, "pump-a")) == "Not authorized"
    assert connect_result(secure_broker.settings(new_user, new_password, "pump-a")) == "Success"


def test_hub_client_cannot_administer_the_broker(secure_broker: SecureBroker) -> None:
    """Only the admin client reaches the control API; the hub's everyday
    client (and so a leak of its password) cannot create clients."""
    admin_as_hub = BrokerAdmin(secure_broker.hub_settings("hub-as-admin"), timeout=3)
    with pytest.raises(BrokerAdminError, match="refused 'outpost-hub' the subscription"):
        admin_as_hub.provision_agent("intruder")


def test_broker_admin_reports_bad_credentials_clearly(secure_broker: SecureBroker) -> None:
    admin = BrokerAdmin(secure_broker.settings(ADMIN_USER, "not-the-password", "bad-admin"), timeout=5)
    with pytest.raises(BrokerAdminError, match=r"refused the connection of 'outpost-admin': Not authorized \(check the user name and password\)"):
        admin.provision_agent("pump-a")


def test_setup_can_run_again(secure_broker: SecureBroker) -> None:
    """After an upgrade, setup refreshes the hub's role; agents keep theirs."""
    user, password = _agent(secure_broker, "pump-a")
    secure_broker.admin().setup(HUB_USER, HUB_PASSWORD)
    assert connect_result(secure_broker.hub_settings()) == "Success"
    assert connect_result(secure_broker.settings(user, password, "pump-a")) == "Success"
    with pytest.raises(MqttRequestError, match="refused the connection of 'outpost-admin'"):
        request(secure_broker.settings(ADMIN_USER, "x", "a"), "t", json.dumps({}).encode(), "t", timeout=5)


def test_broker_admin_without_the_plugin_says_so(mosquitto: Broker) -> None:
    """A broker without dynamic security (the development one) never answers
    the control topic: the error names the likely cause."""
    admin = BrokerAdmin(MqttSettings(host=mosquitto.host, port=mosquitto.port, client_id="admin", username="outpost-admin", password="x"), timeout=2)
    with pytest.raises(BrokerAdminError, match="no answer on .* Is the dynamic-security plugin loaded"):
        admin.provision_agent("pump-a")


def test_broker_setup_command_prepares_a_fresh_broker_for_the_hub(tmp_path: Path, pki: Pki) -> None:
    broker = SecureBroker(tmp_path / "fresh", pki)
    broker.start()
    try:
        config = tmp_path / "hub.toml"
        config.write_text(
            f'broker_port = {broker.plain_port}\nbroker_username = "{HUB_USER}"\nbroker_password = "{HUB_PASSWORD}"\n'
            f'broker_admin_username = "{ADMIN_USER}"\nbroker_admin_password = "{ADMIN_PASSWORD}"\n'
        )
        assert connect_result(broker.hub_settings()) == "Not authorized"
        done = subprocess.run([sys.executable, "-m", "hub", "broker", "setup", "--config", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert connect_result(broker.hub_settings()) == "Success"
        unmanaged = tmp_path / "unmanaged.toml"
        unmanaged.write_text(f"broker_port = {broker.plain_port}\n")
        done = subprocess.run([sys.executable, "-m", "hub", "broker", "setup", "--config", str(unmanaged)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "managed outside Outpost" in done.stderr
    finally:
        broker.stop()


def _mosquitto_version() -> tuple[int, ...]:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=10).stdout
    words = out.split()
    return tuple(int(p) for p in words[words.index("version") + 1].split("."))


def test_dynamic_security_substitutes_u_only_from_mosquitto_2_1(secure_broker: SecureBroker) -> None:
    """Why each agent has a role of its own (hub/brokeradmin.py): on
    Mosquitto 2.0 a dynsec ACL on ``.../%u/events`` is the literal topic, so a
    shared role could not confine agents. From 2.1 the plugin substitutes it
    (then one shared role would do; the per-agent roles keep working)."""
    admin = secure_broker.admin()
    admin.run([
        {"command": "createRole", "rolename": "pattern-probe", "acls": [{"acltype": "publishClientSend", "topic": "probe/%u/events", "allow": True}]},
        {"command": "createClient", "username": "pattern-user", "password": "pw", "roles": [{"rolename": "pattern-probe"}]},
    ])
    client = Listener(secure_broker.settings("pattern-user", "pw", "pattern-user"), [])
    try:
        reason = client.publish("probe/pattern-user/events", b"x")
    finally:
        client.close()
    if _mosquitto_version() < (2, 1):
        assert reason == "Not authorized"
    else:
        assert reason in ("Success", "No matching subscribers")
