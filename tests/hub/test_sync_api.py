"""The HTTP bulk sync endpoint over a real uvicorn server and a real
database: it applies a batch in order through the ingester, acknowledges only
what it committed, refuses bad items for good (recorded), deduplicates
repeats, keeps the cursor, and checks the agent's signature and its limits; it
signs its answers, bound to the request. The agent's side runs against it
too: a restarted agent resumes after the cursor, and drops nothing on an
answer it cannot verify."""

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
from hub.db import transaction
from hub.hubkeys import LiveRing
from hub.identity import register_agent, revoke_agent
from hub.models import AssetEvent, RejectedMessage, SecurityEvent, SyncCursor, TaskResult
from shared.clock import SystemClock, utcnow
from shared.envelope import Envelope
from shared.frames import AGENT_TO_HUB, sign_envelope
from shared.hlc import HLC
from shared.messages import Ack, AgentEvent, Cancel, Heartbeat, Result
from shared.requestsig import ANSWER_HEADER, HEADER, sign_request, verify_answer
from shared.signing import SignatureError, SigningKey

from .api_harness import LiveServer
from tests.hub.api_harness import hub_settings

#: a1's device key; the served hub has its public half registered.
KEY = SigningKey.generate()
#: Every test device's key (a2 is never registered: its frames cannot verify as a1's).
KEYS = {"a1": KEY, "a2": SigningKey.generate()}
#: The served hub's clock (a manual one): requests are signed with its time.
HUB_NOW: list[Any] = []
#: The served hub's key ring (its answers are signed with the current key).
RING: list[LiveRing] = []
DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator.partial(task_id="t", job_type="noop", target=on_agent("a1")).expand(params=[{"echo": str(i)} for i in range(6)])
"""


@pytest.fixture
def served(make_hub: Any, tmp_path: Path) -> Iterator[Any]:
    """A hub that issued six assignments to a1, behind a live HTTP server."""

    def serve(**settings: Any) -> tuple[Any, str, list[str]]:
        hub = make_hub({"d.py": DAG})
        hub.agent_online("a1")
        hub.trigger("d")
        hub.tick()
        assigned = sorted((env.body for env in hub.assignments_sent()), key=lambda a: a.map_index)
        hub.use_key("a1", KEY)
        HUB_NOW[:] = [hub.clock.now]
        app = create_app(hub_settings(**settings), hub.sessions, hub.ingester.events, hub.clock)
        app.state.ingester = hub.ingester  # the counters tell duplicates apart
        RING[:] = [LiveRing(tmp_path / "hub-keys")]
        app.state.keyring = RING[0]
        server = LiveServer(app).__enter__()
        servers.append(server)
        return hub, f"{server.url}/api/v1/agents/a1/sync", [a.assignment_id for a in assigned]

    servers: list[LiveServer] = []
    yield serve
    for server in servers:
        server.__exit__(None, None, None)


def now() -> float:
    return float(HUB_NOW[0]())


def hub_keys() -> dict[str, Any]:
    """What a device enrolled with the served hub trusts."""
    return {key.kid: key for key in RING[0].ring().public_keys()}


def signed(method: str, url: str, payload: Any = None, key: SigningKey = KEY, agent: str = "a1", content: bytes | None = None) -> httpx.Response:
    """A request signed as the agent signs it."""
    body = content if content is not None else (json.dumps(payload).encode() if payload is not None else b"")
    headers = {HEADER: sign_request(key, agent, method, httpx.URL(url).path, body, now()), "Content-Type": "application/json"}
    return httpx.request(method, url, content=body, headers=headers, timeout=30)


def envelope(body: Any, sender: str = "a1", logical: int = 0) -> str:
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
    answer = signed("POST", url, batch(*items))
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

    again = signed("POST", url, batch(*items, first="0001", last="0005"))
    assert again.status_code == 200
    assert Ack.from_dict(again.json()) == ack  # acknowledged again
    assert count(hub, TaskResult) == 4
    assert hub.ingester.counters["result.duplicate"] == 4
    # The cursor never moves back; GET returns it.
    cursor = signed("GET", url).json()
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
    answer = signed("POST", url, batch(*items))
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


def test_the_signature_the_agent_id_and_the_limits_are_checked(served: Any) -> None:
    hub, url, ids = served(sync_max_batch_items=3, sync_max_batch_bytes=4096)
    one = batch(envelope(Result(ids[0], 1, "success")))
    body = json.dumps(one).encode()
    path = httpx.URL(url).path
    good = sign_request(KEY, "a1", "POST", path, body, now())
    for header, code in (
        (None, "signature_missing"),
        ("agent=a1,sig=xyz", "malformed_signature"),
        ("Bearer " + good, "malformed_signature"),
        (sign_request(SigningKey.generate(), "a1", "POST", path, body, now()), "bad_signature"),
        (sign_request(KEY, "a1", "POST", path, body + b" ", now()), "bad_signature"),
        (sign_request(KEY, "a1", "GET", path, body, now()), "bad_signature"),
        (sign_request(KEY, "a1", "POST", path, body, now() - 3600), "stale_request"),
        (sign_request(KEY, "a1", "POST", path, body, now() + 3600), "stale_request"),
        (sign_request(KEY, "a2", "POST", path, body, now()), "signer_mismatch"),
    ):
        answer = httpx.post(url, content=body, headers={HEADER: header} if header else {}, timeout=10)
        assert answer.status_code == 401 and answer.json()["error"]["code"] == code, (code, answer.text)
    assert httpx.get(url, timeout=10).status_code == 401
    # Unsigned, a body over the limit is refused for the signature, before it is read.
    unsigned_big = httpx.post(url, content=b"y" * 5000, timeout=10)
    assert unsigned_big.status_code == 401 and unsigned_big.json()["error"]["code"] == "signature_missing"
    assert count(hub, TaskResult) == 0
    # The same signed request twice: the second is a replay.
    assert httpx.post(url, content=body, headers={HEADER: good}, timeout=10).status_code == 200
    replay = httpx.post(url, content=body, headers={HEADER: good}, timeout=10)
    assert replay.status_code == 401 and replay.json()["error"]["code"] == "replayed_request"
    too_many = signed("POST", url, batch(*[envelope(Result(a, 1, "success")) for a in ids[:4]]))
    assert too_many.status_code == 413 and "sync_max_batch_items" in too_many.json()["error"]["message"]
    too_big = signed("POST", url, batch("y" * 5000))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "batch_too_large"
    for wrong in ({"envelopes": []}, {**one, "envelopes": [1]}, {**one, "extra": 1}, {**one, "first_seq": "9", "last_seq": "1"}):
        answer = signed("POST", url, wrong)
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", wrong
    assert signed("POST", url, content=b"[").status_code == 422
    assert signed("POST", url.replace("/a1/", "/-bad/"), one).status_code == 422
    assert count(hub, TaskResult) == 1


def test_unknown_and_revoked_agents_are_refused(served: Any) -> None:
    hub, url, ids = served()
    one = batch(envelope(Result(ids[0], 1, "success")))
    unknown = signed("POST", url.replace("/a1/", "/a9/"), one, agent="a9")
    assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "unknown_agent"
    with transaction(hub.sessions) as session:
        revoke_agent(session, "a1", utcnow(hub.clock))
    for answer in (signed("POST", url, one), signed("GET", url)):
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "agent_revoked"
    assert count(hub, TaskResult) == 0


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
        client = HubSyncClient(base, "a1", KEY, timeout=10, clock=now, hub_keys=hub_keys)

        def apply_ack(ack: Ack) -> None:
            acks.append(ack)
            sync.on_ack(ack.assignment_ids)

        path = HttpPath(client, to_envelope, apply_ack, tmp_path / "outbox.stream", threshold=1, batch=4)
        sync = Sync(outbox, lambda item: False, lambda: False, clock, http=path)
        return sync

    def to_envelope(item: Any) -> bytes:
        return sign_envelope(Envelope(item.result, sender="a1", hlc=item.hlc), KEY, AGENT_TO_HUB)

    # A first run sent the first batch and the hub committed it, but the
    # agent died before it recorded the acknowledgement.
    stream, _ = load_stream(tmp_path / "outbox.stream", outbox.newest_message_id(), clock.now())
    claimed = [item for item in (outbox.claim() for _ in range(4)) if item is not None]
    client = HubSyncClient(base, "a1", KEY, clock=now, hub_keys=hub_keys)
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


def test_answers_are_signed_by_the_hubs_current_key_for_that_request(served: Any) -> None:
    hub, url, ids = served()
    posted = signed("POST", url, batch(envelope(Result(ids[0], 1, "success"))))
    got = signed("GET", url)
    for answer in (posted, got):
        assert answer.status_code == 200, answer.text
        sent = answer.request.headers[HEADER]
        assert verify_answer(hub_keys(), "a1", sent, 200, answer.content, answer.headers.get(ANSWER_HEADER)) == RING[0].current.kid
    # Bound to its request: the POST's answer does not verify for the GET, nor for another agent, nor changed.
    for agent, request, content, code in (
        ("a1", got.request.headers[HEADER], posted.content, "bad_signature"),
        ("a2", posted.request.headers[HEADER], posted.content, "bad_signature"),
        ("a1", posted.request.headers[HEADER], posted.content.replace(ids[0].encode(), ids[1].encode()), "bad_signature"),
    ):
        with pytest.raises(SignatureError) as caught:
            verify_answer(hub_keys(), agent, request, 200, content, posted.headers[ANSWER_HEADER])
        assert caught.value.code == code
    with pytest.raises(SignatureError) as caught:
        verify_answer({}, "a1", posted.request.headers[HEADER], 200, posted.content, posted.headers[ANSWER_HEADER])
    assert caught.value.code == "unknown_key"
    # Errors are not signed (the agent acts on none of them).
    assert ANSWER_HEADER not in signed("POST", url, {"envelopes": []}).headers


def test_an_agent_that_cannot_verify_the_answer_drops_nothing_the_hub_committed(served: Any, tmp_path: Path) -> None:
    """A device that does not trust the key the answer is signed with (here:
    the hub rotated to a key the device never learnt) treats the answer as a
    failure: the hub committed the batch, the device keeps the items and
    sends them again once it can verify (the hub deduplicates)."""
    hub, url, ids = served()
    base = url.split("/api/v1/")[0]
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    for i, aid in enumerate(ids[:3]):
        outbox.put_result(Result(aid, 1, "success", {"i": i}), HLC(1_767_225_600_000, i, "a1"))
    counts: list[str] = []
    stranger = SigningKey.generate().public

    def to_envelope(item: Any) -> bytes:
        return sign_envelope(Envelope(item.result, sender="a1", hlc=item.hlc), KEY, AGENT_TO_HUB)

    trusted: dict[str, Any] = {stranger.kid: stranger}
    client = HubSyncClient(base, "a1", KEY, timeout=10, clock=now, hub_keys=lambda: trusted)
    path = HttpPath(client, to_envelope, lambda ack: sync.on_ack(ack.assignment_ids), tmp_path / "outbox.stream", threshold=1, batch=10)
    sync = Sync(outbox, lambda item: False, lambda: False, SystemClock(), http=path, count=counts.append)
    sync.start()
    try:
        deadline = time.monotonic() + 20
        while "security.bad_answer" not in counts and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "security.bad_answer" in counts
        assert outbox.depth() == 3  # the cursor answer was refused first: nothing skipped, nothing sent
        trusted.update(hub_keys())  # the device learns the hub's key (trust add, an announcement)
        sync.resend_all()
        deadline = time.monotonic() + 20
        while outbox.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert outbox.depth() == 0
    finally:
        sync.stop()
    assert count(hub, TaskResult) == 3
    outbox.close()
