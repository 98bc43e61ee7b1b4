"""Cross-cutting fixtures: a private Mosquitto broker, state folders, clocks.

A missing broker binary is a failure, never a skip: ``./dev test`` installs
Mosquitto when it can, and says what to install when it cannot.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.standalone import BrokerMissing, PrivateBroker, free_port
from shared.clock import ManualClock


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


__all__ = ["Broker", "free_port", "stop_process", "wait_port"]

#: The test broker is the one standalone mode runs (tests may kill -9 it).
Broker = PrivateBroker


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A fresh private broker for one test."""
    broker = Broker(tmp_path_factory.mktemp("mosquitto"), autosave_interval=1)
    try:
        broker.start()
    except BrokerMissing as exc:
        pytest.fail(f"{exc} (./dev test installs it)")
    except RuntimeError as exc:
        pytest.fail(f"{exc}\n{broker.log}")
    yield broker
    broker.stop()


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock(1_767_225_600.0)  # 2026-01-01T00:00:00Z


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path
