"""systemd's notify protocol against a real AF_UNIX datagram socket standing
in for systemd: READY after recovery, STATUS lines, watchdog pings only while
the agent's threads are healthy, STOPPING on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import Agent
from agent.sdnotify import Notifier


class FakeSystemd:
    """The receiving end of ``$NOTIFY_SOCKET``: collects datagrams with the
    monotonic time they arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []

    def collect(self, until: float) -> None:
        end = time.monotonic() + until
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append((time.monotonic(), data.decode().split("\n")))

    def wait_for(self, line: str, timeout: float = 15.0) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for _, lines in self.messages:
                if line in lines:
                    return lines
            self.collect(0.1)
        raise AssertionError(f"no {line!r} within {timeout}s; got {self.messages}")

    def pings(self, since: float = 0.0) -> list[float]:
        return [t for t, lines in self.messages if "WATCHDOG=1" in lines and t >= since]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def systemd(request, tmp_path: Path) -> Iterator[FakeSystemd]:
    address = str(tmp_path / "notify.sock") if request.param == "path" else f"@outpost-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(address)
    yield fake
    fake.close()


def test_subprocess_agent_says_ready_pings_the_watchdog_and_says_stopping(spawn_agent, hub, systemd):
    proc = spawn_agent(env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "400000"})
    ready = systemd.wait_for("READY=1")
    assert any(line.startswith("STATUS=") and "accepting" in line for line in ready)
    start = time.monotonic()
    systemd.collect(1.2)
    pings = systemd.pings(since=start)
    assert len(pings) >= 4  # every 0.2 s: half of WATCHDOG_USEC
    assert max(b - a for a, b in zip(pings, pings[1:], strict=False)) < 0.4  # never a gap systemd would kill for
    assert any(line.startswith("STATUS=") and "connected" in line for _, lines in systemd.messages for line in lines)
    proc.send_signal(signal.SIGTERM)
    assert any(line.startswith("STATUS=stopping") for line in systemd.wait_for("STOPPING=1"))
    assert proc.wait(15) == 0


def test_watchdog_pings_stop_when_a_thread_the_agent_needs_is_gone(settings_for, hub, systemd):
    env = {"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": "300000", "WATCHDOG_PID": str(os.getpid())}
    agent = Agent(settings_for(), notifier=Notifier(env))
    agent.start()
    try:
        systemd.wait_for("READY=1")
        systemd.collect(0.6)
        assert len(systemd.pings()) >= 2 and agent.healthy() == ""
        agent.sync.stop()  # the sync thread ends: results would never leave again
        assert agent.healthy() == "sync thread(s) not running"
        systemd.collect(0.3)
        stopped = time.monotonic()
        systemd.collect(0.9)
        assert systemd.pings(since=stopped) == []  # systemd's watchdog will restart the agent
    finally:
        agent.stop(timeout=2)


def test_no_socket_or_another_process_watchdog_means_no_notifications():
    assert Notifier({}).notify("READY=1") is False
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent/sock"}).notify("READY=1") is False  # never fatal
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"}).watchdog_interval == 1.0
