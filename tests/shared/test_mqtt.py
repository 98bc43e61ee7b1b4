"""The MQTT wrapper against a real Mosquitto: persistent sessions, manual
acknowledgement and the last will, the three things the delivery contract
stands on. Client processes are killed with SIGKILL to drop connections the
way a crash or power loss does."""

from __future__ import annotations

import queue
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from shared.mqtt import Inbound, MqttLink, MqttSettings, Will
from shared.topics import assign_topic, status_topic
from tests.faultproxy import FaultProxy

if TYPE_CHECKING:  # the fixture's type; several conftest modules exist, so never import it at run time
    from tests.conftest import Broker

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 10.0
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    """Links created by a test; all stopped at the end, even on failure."""
    made: list[MqttLink] = []
    yield made
    for link in made:
        link.stop()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def connect(links: list[MqttLink], broker: Broker, client_id: str, subscriptions: list[tuple[str, int]] | None = None, will: Will | None = None) -> MqttLink:
    link = MqttLink(MqttSettings(host=broker.host, port=broker.port, client_id=client_id, keepalive=5), subscriptions, will)
    links.append(link)
    link.start()
    assert link.wait_connected(TIMEOUT), f"{client_id} did not connect:\n{broker.log}"
    return link


def receive(link: MqttLink, timeout: float = TIMEOUT) -> Inbound:
    try:
        return link.inbound.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"{link.settings.client_id} received nothing in {timeout}s")


def nothing_arrives(link: MqttLink, within: float) -> bool:
    try:
        link.inbound.get(timeout=within)
    except queue.Empty:
        return True
    return False


def establish_session(links: list[MqttLink], broker: Broker, client_id: str, topic: str) -> None:
    """Connect once, prove the subscription is live with a probe, and leave:
    the broker now holds a persistent session that queues ``topic``."""
    sub = connect(links, broker, client_id, [(topic, 1)])
    pub = connect(links, broker, f"{client_id}-probe")
    while True:
        pub.publish_and_wait(topic, b"probe", timeout=TIMEOUT)
        try:
            msg = sub.inbound.get(timeout=0.5)
            break
        except queue.Empty:
            continue
    msg.ack()
    sub.stop()


def spawn(processes: list[subprocess.Popen[bytes]], code: str, *args: object) -> subprocess.Popen[bytes]:
    # Unbuffered: expect_line selects on the descriptor, and a buffered reader
    # could pull two lines in one read, leaving the second where select cannot see it.
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, bufsize=0)
    processes.append(proc)
    return proc


def expect_line(proc: subprocess.Popen[bytes], timeout: float = 3 * TIMEOUT) -> str:  # a cold interpreter on a loaded machine is slow
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"client process said nothing in {timeout}s (exit code {proc.poll()})"
    return proc.stdout.readline().decode().strip()


CLIENT = """
    import sys, time
    from shared.mqtt import MqttLink, MqttSettings, Will
    port, client_id, topic, will_topic = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    will = Will(will_topic, b"offline-will") if will_topic != "-" else None
    subs = [(topic, 1)] if topic != "-" else []
    link = MqttLink(MqttSettings(port=port, client_id=client_id, keepalive=5), subs, will)
    link.start()
    assert link.wait_connected(10)
    print("connected", flush=True)
    if subs:
        msg = link.inbound.get(timeout=20)
        print("got " + msg.payload.decode(), flush=True)  # and never acknowledged
    time.sleep(60)
"""


def test_message_published_while_subscriber_is_away_arrives_after_it_reconnects(mosquitto: Broker, links: list[MqttLink]) -> None:
    topic = assign_topic("dev-1")
    establish_session(links, mosquitto, "dev-1", topic)
    publisher = connect(links, mosquitto, "hub")
    assert publisher.publish_and_wait(topic, b"while-away", timeout=TIMEOUT)
    back = connect(links, mosquitto, "dev-1", [(topic, 1)])
    msg = receive(back)
    assert (msg.topic, msg.payload, msg.qos) == (topic, b"while-away", 1)
    msg.ack()


def test_unacknowledged_message_is_redelivered_after_the_subscriber_dies(
    mosquitto: Broker, links: list[MqttLink], processes: list[subprocess.Popen[bytes]]
) -> None:
    topic = assign_topic("dev-2")
    establish_session(links, mosquitto, "dev-2", topic)
    publisher = connect(links, mosquitto, "hub")
    assert publisher.publish_and_wait(topic, b"job-1", timeout=TIMEOUT)
    crashing = spawn(processes, CLIENT, mosquitto.port, "dev-2", topic, "-")
    assert expect_line(crashing) == "connected"
    assert expect_line(crashing) == "got job-1"
    crashing.kill()  # received, never acknowledged: the broker must keep it
    crashing.wait(TIMEOUT)
    back = connect(links, mosquitto, "dev-2", [(topic, 1)])
    msg = receive(back)
    assert msg.payload == b"job-1"
    msg.ack()


def test_acknowledged_message_is_not_redelivered(mosquitto: Broker, links: list[MqttLink]) -> None:
    topic = assign_topic("dev-3")
    establish_session(links, mosquitto, "dev-3", topic)
    publisher = connect(links, mosquitto, "hub")
    assert publisher.publish_and_wait(topic, b"job-1", timeout=TIMEOUT)
    first = connect(links, mosquitto, "dev-3", [(topic, 1)])
    receive(first).ack()
    first.stop()
    again = connect(links, mosquitto, "dev-3", [(topic, 1)])
    assert nothing_arrives(again, 1.0)


def test_will_is_published_when_a_client_connection_drops(
    mosquitto: Broker, links: list[MqttLink], processes: list[subprocess.Popen[bytes]]
) -> None:
    status = status_topic("dev-4")
    observer = connect(links, mosquitto, "observer", [(status, 1)])
    device = spawn(processes, CLIENT, mosquitto.port, "dev-4", "-", status)
    assert expect_line(device) == "connected"
    assert nothing_arrives(observer, 0.3)  # no will while it is alive
    device.kill()
    device.wait(TIMEOUT)
    msg = receive(observer)
    assert (msg.topic, msg.payload) == (status, b"offline-will")
    msg.ack()
    late = connect(links, mosquitto, "late-observer", [(status, 1)])
    retained = receive(late)
    assert (retained.payload, retained.retain) == (b"offline-will", True)


def test_clean_stop_sends_last_words_instead_of_the_will(mosquitto: Broker, links: list[MqttLink]) -> None:
    status = status_topic("dev-5")
    observer = connect(links, mosquitto, "observer", [(status, 1)])
    device = connect(links, mosquitto, "dev-5", will=Will(status, b"offline-will"))
    device.stop(last_words=(status, b"offline-clean"))
    msg = receive(observer)
    assert msg.payload == b"offline-clean"
    msg.ack()
    assert nothing_arrives(observer, 1.0)


def test_watchdog_probes_a_quiet_link_and_replaces_a_half_open_one(links: list[MqttLink], mosquitto: Broker) -> None:
    with FaultProxy(mosquitto.port) as proxy:
        link = MqttLink(MqttSettings(host=mosquitto.host, port=proxy.port, client_id="watched", keepalive=2, probe_topic="outpost/v1/hub/probe/watched"))
        links.append(link)
        link.start()
        assert link.wait_connected(TIMEOUT)
        time.sleep(3.5)  # quiet, healthy: probes go out, answers come back
        assert link.dropped_silent == 0 and link.connected.is_set() and len(proxy.accepted()) == 1
        proxy.half_open()
        cut = time.monotonic()
        while len(proxy.accepted()) < 2 and time.monotonic() - cut < 10:
            time.sleep(0.05)
        # Dropped about a keepalive after the last answer, plus paho's 1 s reconnect wait.
        assert link.dropped_silent == 1 and time.monotonic() - cut <= 2 * 1.5 + 1
        assert link.wait_connected(TIMEOUT)


def test_a_link_works_when_its_socket_is_above_fd_setsize(mosquitto: Broker, links: list[MqttLink]) -> None:
    # A process with many open files (the fleet simulator: a thousand agents
    # and their queue files) hands paho sockets numbered above 1024, where
    # select() cannot go; paho's loop must still connect, send and receive.
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard open file limit {hard} is below what the test needs")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200 if hard == resource.RLIM_INFINITY else min(hard, 4096), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        sub = connect(links, mosquitto, "high-fd-sub", [("t/high", 1)])
        pub = connect(links, mosquitto, "high-fd-pub")
        sock = sub.client.socket()
        assert sock is not None and sock.fileno() > 1024
        assert pub.publish_and_wait("t/high", b"above FD_SETSIZE", timeout=TIMEOUT)
        message = receive(sub)
        assert message.payload == b"above FD_SETSIZE"
        message.ack()
    finally:
        for link in links:
            link.stop()
        links.clear()
        for fd in filler:
            os.close(fd)
