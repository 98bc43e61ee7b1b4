"""The HTTP bulk sync endpoint over a real uvicorn server and a real
database: it applies a batch in order through the ingester, acknowledges only
what it committed, refuses bad items for good (recorded), deduplicates
repeats, keeps the cursor, and checks its token and its limits. The agent's
side runs against it too: a restarted agent resumes after the cursor."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from agent.queues import Outbox
from agent.sync import HttpPath, HubSyncClient, Sync, load_stream
from hub.api.app import create_app
from hub.config import HubSettings
from hub.models import AssetEvent, RejectedMessage, SecurityEvent, SyncCursor, TaskResult
from shared.clock import SystemClock
from shared.envelope import Envelope
from shared.frames import AGENT_TO_HUB, sign_envelope
from shared.signing import SigningKey
from shared.hlc import HLC
from shared.messages import Ack, AgentEvent, Cancel, Heartbeat, Result

from .api_harness import LiveServer

#: The test devices' keys; served() registers them with the hub.
KEYS = {"a1": SigningKey.generate(), "a2": SigningKey.generate()}
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator.partial(task_id="t", job_type="noop", target=on_agent("a1")).expand(params=[{"echo": str(i)} for i in range(6)])
"""


@pytest.fixture
def served(make_hub: Any) -> Iterator[Any]:
    """A hub that issued six assignments to a1, behind a live HTTP server."""

    def serve(**settings: Any) -> tuple[Any, str, list[str]]:
        hub = make_hub({"d.py": DAG})
        for agent_id, key in KEYS.items():
            hub.use_key(agent_id, key)
        hub.agent_online("a1")
        hub.trigger("d")
        hub.tick()
        assigned = sorted((env.body for env in hub.assignments_sent()), key=lambda a: a.map_index)
        app = create_app(HubSettings(**{"agent_sync_token": TOKEN, **settings}), hub.sessions, hub.ingester.events, hub.clock)
        app.state.ingester = hub.ingester  # the counters tell duplicates apart
        server = LiveServer(app).__enter__()
        servers.append(server)
        return hub, f"{server.url}/api/v1/agents/a1/sync", [a.assignment_id for a in assigned]

    servers: list[LiveServer] = []
    yield serve
    for server in servers:
        server.__exit__(None, None, None)


def envelope(body: Any, sender: str = "a1", logical: int = 0) -> str:
    """A frame as ``sender``'s agent signs it."""
    return sign_envelope(Envelope(body, sender=sender, hlc=HLC(1_767_225_600_000, logical, sender)), KEYS[sender], AGENT_TO_HUB).decode()


def batch(*envelopes: str, stream: str = "s1", first: str = "0001", last: str = "0009") -> dict[str, Any]:
    return {"stream": stream, "first_seq": first, "last_seq": last, "envelopes": list(envelopes)}


def count(hub: Any, model: Any) -> int:
    with hub.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_a_batch_applies_in_order_is_acknowledged_and_a_repeat_applies_nothing(served: Any) -> None:
    hub, url, ids = served()
    items = [envelope(Result(aid, 1, "success", {"n": i}), logical=i) for i, aid in enumerate(ids[:4])]
    items.insert(2, envelope(AgentEvent("ev-1", "battery_low", {"pct": 9})))
    answer = httpx.post(url, json=batch(*items), headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    ack = Ack.from_dict(body)  # the agent reads it as an MQTT ack
    assert ack.assignment_ids == tuple(ids[:4]) and ack.event_ids == ("ev-1",)
    assert body["refused"] == []
    assert body["cursor"]["stream"] == "s1" and body["cursor"]["seq"] == "0009" and body["cursor"]["items"] == 5
    with hub.sessions() as session:
        applied = list(session.scalars(select(TaskResult.assignment_id).order_by(TaskResult.id)))
        assert session.scalar(select(func.count()).select_from(AssetEvent).where(AssetEvent.source_agent_id == "a1")) == 1
    assert applied == ids[:4]  # batch order
    assert [ti.state for ti in sorted(hub.tis(1), key=lambda t: t.map_index)][:4] == ["success"] * 4

    again = httpx.post(url, json=batch(*items, first="0001", last="0005"), headers=AUTH, timeout=30)
    assert again.status_code == 200
    assert Ack.from_dict(again.json()) == ack  # acknowledged again
    assert count(hub, TaskResult) == 4
    assert hub.ingester.counters["result.duplicate"] == 4
    # The cursor never moves back; GET returns it.
    cursor = httpx.get(url, headers=AUTH, timeout=10).json()
    assert (cursor["stream"], cursor["seq"], cursor["items"]) == ("s1", "0009", 10)


def test_bad_items_are_recorded_and_refused_and_the_good_ones_still_apply(served: Any) -> None:
    hub, url, ids = served()
    items = [
        envelope(Result(ids[0], 1, "success")),
        "{not json",
        envelope(Result("f" * 32, 1, "success")),  # never issued
        envelope(Result(ids[1], 1, "success"), sender="a2"),  # not the URL's agent (a2's key)
        envelope(Cancel(ids[3])),  # a hub-to-agent type
        "x" * 300_000,  # over max_message_bytes
        envelope(Heartbeat("0.1.0")),  # valid on the events topic: applied, nothing to acknowledge
        envelope(Result(ids[2], 1, "failed")),
    ]
    answer = httpx.post(url, json=batch(*items), headers=AUTH, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["assignment_ids"] == [ids[0], ids[2]]
    refused = {r["index"]: r["code"] for r in body["refused"]}
    assert refused == {1: "bad_signature", 2: "unknown_assignment", 3: "unknown_key", 4: "unexpected_type", 5: "payload_too_large"}
    with hub.sessions() as session:
        records = list(session.scalars(select(RejectedMessage).where(RejectedMessage.source == "http").order_by(RejectedMessage.id)))
        security = list(session.scalars(select(SecurityEvent).where(SecurityEvent.source == "http").order_by(SecurityEvent.id)))
    assert sorted(r.code for r in records) == ["payload_too_large", "unexpected_type", "unknown_assignment"]
    assert [(e.agent_id, e.code) for e in security] == [("a1", "bad_signature"), ("a1", "unknown_key")]
    assert all(r.agent_id == "a1" for r in records)
    assert count(hub, TaskResult) == 2


def test_the_token_the_agent_id_and_the_limits_are_checked(served: Any) -> None:
    hub, url, ids = served(sync_max_batch_items=3, sync_max_batch_bytes=4096)
    one = batch(envelope(Result(ids[0], 1, "success")))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        answer = httpx.post(url, json=one, headers=headers, timeout=10)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized"
    assert httpx.get(url, timeout=10).status_code == 401
    too_many = httpx.post(url, json=batch(*[envelope(Result(a, 1, "success")) for a in ids[:4]]), headers=AUTH, timeout=10)
    assert too_many.status_code == 413 and "sync_max_batch_items" in too_many.json()["error"]["message"]
    too_big = httpx.post(url, json=batch("y" * 5000), headers=AUTH, timeout=10)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "batch_too_large"
    for wrong in ({"envelopes": []}, {**one, "envelopes": [1]}, {**one, "extra": 1}, {**one, "first_seq": "9", "last_seq": "1"}):
        answer = httpx.post(url, json=wrong, headers=AUTH, timeout=10)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", wrong
    assert httpx.post(url, content=b"[", headers=AUTH, timeout=10).status_code == 422
    bad_agent = httpx.post(url.replace("/a1/", "/-bad/"), json=one, headers=AUTH, timeout=10)
    assert bad_agent.status_code == 422
    assert count(hub, TaskResult) == 0 and count(hub, SyncCursor) == 0


def test_an_unregistered_or_revoked_agent_gets_403_and_a_security_event(served: Any) -> None:
    from hub.db import transaction
    from hub.identity import revoke_agent
    from shared.clock import utcnow

    hub, url, ids = served()
    stranger = SigningKey.generate()
    frame = sign_envelope(Envelope(Heartbeat("0.1.0"), sender="zz", hlc=HLC(1_767_225_600_000, 0, "zz")), stranger, AGENT_TO_HUB).decode()
    answer = httpx.post(url.replace("/a1/", "/zz/"), json=batch(frame), headers=AUTH, timeout=10)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "agent_not_trusted"
    with transaction(hub.sessions) as session:
        revoke_agent(session, "a1", utcnow(hub.clock))
    answer = httpx.post(url, json=batch(envelope(Result(ids[0], 1, "success"))), headers=AUTH, timeout=10)
    assert answer.status_code == 403 and "revoked" in answer.json()["error"]["message"]
    with hub.sessions() as session:
        events = [(e.agent_id, e.source, e.code) for e in session.scalars(select(SecurityEvent).order_by(SecurityEvent.id))]
    assert events == [("zz", "http", "unknown_agent"), ("a1", "http", "revoked_agent")]
    assert count(hub, TaskResult) == 0


def test_an_empty_token_disables_the_endpoint(served: Any) -> None:
    _hub, url, ids = served(agent_sync_token="")
    answer = httpx.post(url, json=batch(envelope(Result(ids[0], 1, "success"))), headers={"Authorization": "Bearer anything"}, timeout=10)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "sync_disabled"


def test_the_endpoint_is_in_the_openapi_document(served: Any) -> None:
    _hub, url, _ids = served()
    doc = httpx.get(url.split("/api/v1/")[0] + "/api/v1/openapi.json", timeout=10).json()
    post = doc["paths"]["/api/v1/agents/{agent_id}/sync"]["post"]
    assert set(post["responses"]) >= {"200", "401", "403", "413", "422", "503"}
    assert "envelopes" in post["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "get" in doc["paths"]["/api/v1/agents/{agent_id}/sync"]


def test_a_restarted_agent_resumes_after_the_cursor_and_sends_the_rest_once(served: Any, tmp_path: Path) -> None:
    hub, url, ids = served()
    clock = SystemClock()  # litequeue stamps message ids with the real time
    base = url.split("/api/v1/")[0]
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    for i, aid in enumerate(ids):
        outbox.put_result(Result(aid, 1, "success", {"i": i}), HLC(1_767_225_600_000, i, "a1"))
    acks: list[Ack] = []

    def build() -> Sync:
        client = HubSyncClient(base, "a1", TOKEN, timeout=10)

        def apply_ack(ack: Ack) -> None:
            acks.append(ack)
            sync.on_ack(ack.assignment_ids)

        path = HttpPath(client, to_envelope, apply_ack, tmp_path / "outbox.stream", threshold=1, batch=4)
        sync = Sync(outbox, lambda item: False, lambda: False, clock, http=path)
        return sync

    def to_envelope(item: Any) -> bytes:
        return sign_envelope(Envelope(item.result, sender="a1", hlc=item.hlc), KEYS["a1"], AGENT_TO_HUB)

    # A first run sent the first batch and the hub committed it, but the
    # agent died before it recorded the acknowledgement.
    stream, _ = load_stream(tmp_path / "outbox.stream", outbox.newest_message_id(), clock.now())
    claimed = [item for item in (outbox.claim() for _ in range(4)) if item is not None]
    client = HubSyncClient(base, "a1", TOKEN)
    client.post(stream, claimed[0].message_id, claimed[-1].message_id, [to_envelope(item).decode() for item in claimed])
    client.close()
    outbox.release_expired_claims(0)  # what start-up does after a crash
    assert count(hub, TaskResult) == 4 and outbox.depth() == 6

    sync = build()
    sync.start()
    try:
        deadline = time.monotonic() + 20
        while outbox.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sync.stop()
    assert outbox.depth() == 0
    assert count(hub, TaskResult) == 6
    # The four the hub had were skipped by the cursor, not sent again.
    assert hub.ingester.counters["result.duplicate"] == 0
    assert [a.assignment_ids for a in acks] == [tuple(ids[4:])]
    outbox.close()
