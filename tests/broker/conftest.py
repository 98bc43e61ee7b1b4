"""A Mosquitto started from the shipped production configuration
(deploy/mosquitto/mosquitto.conf, paths and ports substituted), its
dynamic-security file made by deploy/mosquitto/dynsec-init.sh, and set up by
the hub's own ``BrokerAdmin.setup``. Loopback only."""

from __future__ import annotations

import getpass
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from hub.brokeradmin import BrokerAdmin
from shared.mqtt import MqttSettings, shut_down
from tests.broker.pki import Pki
from tests.conftest import free_port, stop_process

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONF = ROOT / "deploy" / "mosquitto" / "mosquitto.conf"
DYNSEC_INIT = ROOT / "deploy" / "mosquitto" / "dynsec-init.sh"
ADMIN_USER, ADMIN_PASSWORD = "outpost-admin", "admin-secret-for-tests"
HUB_USER, HUB_PASSWORD = "outpost-hub", "hub-secret-for-tests"


def production_config(folder: Path, plain_port: int, tls_port: int, pki: Pki, require_certificate: bool = False) -> str:
    """The shipped file with this test's paths and ports. Every line replaced
    must exist, so a change to the shipped file that this would silently skip
    fails the test instead."""
    plugin = next((p for p in ("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so") if os.path.exists(p)), None)
    assert plugin is not None, "the Mosquitto dynamic-security plugin is not installed"
    text = DEPLOY_CONF.read_text()
    replacements = {
        "plugin /usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so": f"plugin {plugin}",
        "plugin_opt_config_file /var/lib/mosquitto/dynamic-security.json": f"plugin_opt_config_file {folder / 'dynamic-security.json'}",
        "listener 1883 127.0.0.1": f"listener {plain_port} 127.0.0.1",
        "listener 8883": f"listener {tls_port} 127.0.0.1",
        "cafile /etc/mosquitto/certs/ca.crt": f"cafile {pki.ca}",
        "certfile /etc/mosquitto/certs/server.crt": f"certfile {pki.server_cert}",
        "keyfile /etc/mosquitto/certs/server.key": f"keyfile {pki.server_key}",
        "persistence_location /var/lib/mosquitto/": f"persistence_location {folder}/",
        "log_dest syslog": f"log_dest file {folder / 'mosquitto.log'}",
    }
    if require_certificate:
        replacements["#require_certificate true"] = "require_certificate true"
    lines = text.splitlines()
    for old, new in replacements.items():
        assert old in lines, f"{DEPLOY_CONF} no longer has the line {old!r}"
        lines[lines.index(old)] = new
    # Stay the user we are: the broker's files live in the test's folder.
    return "\n".join([*lines, f"user {getpass.getuser()}", ""])


@dataclass
class SecureBroker:
    folder: Path
    pki: Pki
    require_certificate: bool = False
    plain_port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    host = "127.0.0.1"

    @property
    def log(self) -> str:
        path = self.folder / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        conf.write_text(production_config(self.folder, self.plain_port, self.tls_port, self.pki, self.require_certificate))
        dynsec = self.folder / "dynamic-security.json"
        if not dynsec.exists():
            subprocess.run(
                [str(DYNSEC_INIT), str(dynsec), ADMIN_USER], check=True, capture_output=True, timeout=30,
                env={**os.environ, "OUTPOST_BROKER_ADMIN_PASSWORD": ADMIN_PASSWORD},
            )
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        for port in (self.plain_port, self.tls_port):
            while True:
                assert self.proc.poll() is None, f"mosquitto exited with {self.proc.returncode}:\n{self.log}"
                try:
                    with socket.create_connection((self.host, port), timeout=0.2):
                        break
                except OSError:
                    assert time.monotonic() < deadline, f"mosquitto did not listen on {port}:\n{self.log}"
                    time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    # --- clients -------------------------------------------------------------

    def settings(self, username: str | None, password: str | None, client_id: str, tls: bool = False, **extra: object) -> MqttSettings:
        port = self.tls_port if tls else self.plain_port
        tls_ca = str(self.pki.ca) if tls else None
        return MqttSettings(host=self.host, port=port, client_id=client_id, username=username, password=password, tls_ca=tls_ca, keepalive=10, **extra)  # type: ignore[arg-type]

    def admin(self) -> BrokerAdmin:
        return BrokerAdmin(self.settings(ADMIN_USER, ADMIN_PASSWORD, "test-admin"))

    def hub_settings(self, client_id: str = "outpost-hub") -> MqttSettings:
        return self.settings(HUB_USER, HUB_PASSWORD, client_id)


def connect_result(settings: MqttSettings, timeout: float = 10.0) -> str:
    """'Success' or the broker's reason for refusing a connection (paho
    directly, so the CONNACK reason code is visible)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=paho.MQTTv5)
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls_ca or settings.tls_cert:
        client.tls_set(ca_certs=settings.tls_ca, certfile=settings.tls_cert, keyfile=settings.tls_key)
    answer: queue.Queue[str] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, reason, _p: answer.put(str(reason))
    client.on_disconnect = lambda _c, _u, _f, reason, _p: answer.put(f"disconnected: {reason}")
    try:
        client.connect(settings.host, settings.port, keepalive=10)
    except OSError as exc:
        return f"connection failed: {exc}"
    client.loop_start()
    try:
        return answer.get(timeout=timeout)
    except queue.Empty:
        return "no answer"
    finally:
        client.disconnect()
        shut_down(client)


class Listener:
    """Collects what a paho client receives, for 'nothing leaked' checks."""

    def __init__(self, settings: MqttSettings, topics: list[str]) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.granted: list[str] = []
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=settings.client_id, protocol=paho.MQTTv5)
        if settings.username is not None:
            self.client.username_pw_set(settings.username, settings.password)
        self.client.on_message = lambda _c, _u, msg: self.messages.put((msg.topic, msg.payload))

        def on_subscribe(_c: object, _u: object, _mid: int, reasons: list[object], _p: object) -> None:
            self.granted = [str(r) for r in reasons]
            self._subscribed.set()

        self.client.on_subscribe = on_subscribe
        self.client.connect(settings.host, settings.port, keepalive=10, clean_start=True)
        self.client.loop_start()
        if topics:
            self.client.subscribe([(t, 1) for t in topics])
            assert self._subscribed.wait(10), "no SUBACK"

    def publish(self, topic: str, payload: bytes) -> str:
        """Publish QoS 1 and return the PUBACK's reason code."""
        done = threading.Event()
        reasons: list[str] = []

        def on_publish(_c: object, _u: object, _mid: int, reason: object, _p: object) -> None:
            reasons.append(str(reason))
            done.set()

        self.client.on_publish = on_publish
        self.client.publish(topic, payload, qos=1)
        assert done.wait(10), "no PUBACK"
        return reasons[0]

    def until(self, wanted: Callable[[str, bytes], bool], timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Everything received up to and including the first message
        ``wanted`` accepts (a marker sent after the traffic under test)."""
        seen: list[tuple[str, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"the marker did not arrive within {timeout}s; got {seen}") from None
            seen.append(item)
            if wanted(*item):
                return seen

    def close(self) -> None:
        self.client.disconnect()
        shut_down(self.client)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Pki) -> Iterator[SecureBroker]:
    """The production broker, set up for the hub (roles, hub client)."""
    broker = SecureBroker(tmp_path / "broker", pki)
    broker.start()
    try:
        broker.admin().setup(HUB_USER, HUB_PASSWORD)
        yield broker
    finally:
        broker.stop()
