"""A backlog that built up while the device was offline goes over HTTP as
soon as the device is back (its MQTT link reconnects), not after the
backoff its failed HTTP attempts grew while it was away; a refused token
keeps its long wait. (Found end to end: tests/e2e/test_offline_sync_e2e.py
saw the whole backlog drain over MQTT.)"""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent.queues import Outbox

from .conftest import wait_until
from .test_sync_http import FakeHubServer, ack_all, fill, make_sync, outbox, server  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(30)


def failing(status: int) -> Any:
    def policy(batch: dict[str, Any], sent: list[str]) -> tuple[int, dict[str, Any]]:
        return status, {"error": {"code": "x", "message": "not now"}}
    return policy


def test_a_reconnect_sends_the_offline_backlog_over_http_at_once(outbox: Outbox, server: FakeHubServer, make_sync: Any) -> None:
    ids = fill(outbox, 30)
    server.policy = failing(503)  # the network is away: every attempt fails
    sync, wire = make_sync(server.url, threshold=10, batch=100, mqtt_up=False)
    wait_until(lambda: len(server.sent()) >= 3, timeout=10, what="three failed attempts (the next one 4 s away)")
    server.policy = ack_all
    back = time.monotonic()
    wire.up.set()
    sync.resend_all()  # what the daemon does on reconnect
    wait_until(lambda: outbox.depth() == 0, timeout=10, what="the backlog drained")
    assert time.monotonic() - back < 2.0
    assert server.sent()[-1] == ids and wire.sent == []


def test_a_reconnect_does_not_cut_short_the_wait_after_a_refused_token(outbox: Outbox, server: FakeHubServer, make_sync: Any) -> None:
    fill(outbox, 30)
    server.policy = failing(401)
    sync, wire = make_sync(server.url, threshold=10, batch=100, mqtt_up=False)
    wait_until(lambda: len(server.sent()) == 1, timeout=10, what="the refused attempt")
    server.policy = ack_all
    wire.up.set()
    sync.resend_all()
    wait_until(lambda: len(wire.ids()) == 30, timeout=10, what="the backlog sent over MQTT")
    assert len(server.sent()) == 1
