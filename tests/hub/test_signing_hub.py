"""What the hub signs and how: every message to a device (assign, cancel,
ack) signed for it with a per-device sequence number, issue time and expiry;
a redelivery is a fresh signed message; a flipped byte in a device frame is
never applied; key rotation and retirement reach devices as a chain."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from hub import hubkeys
from hub.audit import recent
from hub.cli import main as hub_main
from hub.hubkeys import LiveRing
from hub.identity import HubKeyring
from hub.lifecycle import cancel_assignments
from hub.outbox import SEQ_BLOCK, OutboxPublisher
from hub.db import transaction
from hub.models import Agent, OutboxMessage, TaskResult
from shared.clock import utcnow
from shared.envelope import decode
from shared.frames import HUB_TO_AGENT, open_frame, unsigned_part
from shared.keychain import walk
from shared.messages import Assign, Cancel, KeyAnnouncement, Result
from shared.topics import HUB_KEYS_TOPIC, assign_topic, events_topic

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator.partial(task_id="t", job_type="noop", target=on_agent("a1")).expand(params=[{"echo": "1"}, {"echo": "2"}])
"""


def published(hub: Any, topic: str) -> list[bytes]:
    return [p for t, p in hub.link.published if t == topic]


def test_assignments_and_cancels_are_signed_for_the_device_with_increasing_sequence_numbers(make_hub: Any) -> None:
    hub = make_hub({"d.py": DAG}, redeliver_after=30)
    hub.agent_online("a1")
    hub.agent_online("a2")
    hub.trigger("d")
    hub.tick()
    hub.publisher().flush()
    frames = published(hub, assign_topic("a1"))
    opened = [hub.open(f) for f in frames]
    assert [type(e.body) for e in opened] == [Assign, Assign]
    assert [e.seq for e in opened] == [1, 2]
    now = hub.clock.now()
    assert all(e.recipient == "a1" and e.issued_at == now and e.expires_at == now + hubkeys.DEFAULT_TTL for e in opened)
    # Numbers are reserved in the database a block at a time per agent, so
    # another hub process never uses one of them; none for a2 yet.
    with hub.sessions() as session:
        assert session.get(Agent, "a1").send_seq == SEQ_BLOCK and session.get(Agent, "a2").send_seq == 0
    other = OutboxPublisher(hub.sessions, hub.link, hub.clock, keyring=hub.keyring)  # a second hub process
    with transaction(hub.sessions) as session:
        session.execute(update(OutboxMessage).values(published_at=None))  # as if nothing was confirmed
    other.flush()
    again_elsewhere = [hub.open(f) for f in published(hub, assign_topic("a1"))[2:]]
    assert [e.seq for e in again_elsewhere] == [SEQ_BLOCK + 1, SEQ_BLOCK + 2]  # a re-publish is signed afresh
    del hub.link.published[:]

    # Redelivery (never accepted) is a new message: a fresh signature and
    # sequence number (sent twice so far: the backoff is 60 s).
    hub.clock.advance(61)
    hub.tick()
    hub.publisher().flush()
    again = [hub.open(f) for f in published(hub, assign_topic("a1"))]
    assert [e.seq for e in again] == [3, 4] and [e.body for e in again] == [e.body for e in opened]
    assert all(e.issued_at == hub.clock.now() for e in again)

    # Cancels too.
    with transaction(hub.sessions) as session:
        cancel_assignments(session, [t.id for t in hub.tis(1)], utcnow(hub.clock), hub.ingester.hlc, "operator")
    hub.publisher().flush()
    cancels = [hub.open(f) for f in published(hub, assign_topic("a1"))[2:]]
    assert [type(e.body) for e in cancels] == [Cancel, Cancel] and [e.seq for e in cancels] == [5, 6]


def test_acknowledgements_are_signed_for_the_device(make_hub: Any) -> None:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    hub.trigger("d")
    hub.tick()
    aid = hub.assignments_sent()[0].body.assignment_id
    hub.send("a1", Result(aid, 1, "success"))
    [ack] = hub.acks()  # hub.acks() verifies each with the hub's ring
    assert ack.recipient == "a1" and ack.seq is None and ack.body.assignment_ids == (aid,)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_flipping_any_byte_of_a_device_frame_gets_it_refused_by_the_hub(make_hub: Any, data: st.DataObject) -> None:
    # One hub for all examples of this test (keyed by the fixture: a new test, a new hub).
    if id(make_hub) not in _HUB:
        hub = make_hub({"d.py": DAG})
        hub.agent_online("a1")
        hub.trigger("d")
        hub.tick()
        aid = hub.assignments_sent()[0].body.assignment_id
        _HUB.clear()
        _HUB[id(make_hub)] = (hub, hub.frame("a1", Result(aid, 1, "success", {"x": 1})))
    hub, frame = _HUB[id(make_hub)]
    position = data.draw(st.integers(0, len(frame) - 1))
    flip = data.draw(st.one_of(st.integers(1, 255).map(lambda x: ("xor", x))))
    flipped = frame[:position] + bytes([frame[position] ^ flip[1]]) + frame[position + 1:]
    hub.send_raw(events_topic("a1"), flipped)
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TaskResult)) == 0, f"byte {position} ^ {flip[1]} was applied"
    assert hub.ingester.counters["security.bad_signature"] + hub.ingester.counters["security.unknown_key"] >= 1


_HUB: dict[str, Any] = {}


def test_rotation_is_announced_as_a_chain_devices_walk_and_running_processes_follow(make_hub: Any, tmp_path: Any) -> None:
    _HUB.clear()
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    hub.keyring.check_every = 0
    ring = LiveRing(hub.keyring.folder, check_every=0)  # as a running hub process sees the folder
    hub.ingester.keyring = ring
    publisher = hub.publisher()
    publisher.keyring, publisher.hlc = ring, hub.ingester.hlc
    first = ring.current
    assert publisher.announce_keys() and not publisher.announce_keys()  # once per ring state

    b, _link = hubkeys.rotate(hub.keyring.folder, 1.0)
    c, _link = hubkeys.rotate(hub.keyring.folder, 2.0)
    hubkeys.retire(hub.keyring.folder, first.kid, 3.0)
    assert ring.current.kid == c.kid  # the running process signs with the new key at once
    assert publisher.announce_keys()
    frame = [p for t, p in hub.link.published if t == HUB_KEYS_TOPIC][-1]
    # A device that was away the whole time trusts only the first key.
    announcement = decode(unsigned_part(frame)).body
    assert isinstance(announcement, KeyAnnouncement) and announcement.current == c.kid
    walked = walk(announcement.links, {first.kid: first.public})
    assert set(walked.trusted) == {b.kid, c.kid}
    assert open_frame(frame, HUB_TO_AGENT, walked.trusted.get).body == announcement  # signed by the new current key
    # New messages are signed by C.
    hub.trigger("d")
    hub.tick()
    hub.publisher().flush()
    assert open_frame(published(hub, assign_topic("a1"))[-1], HUB_TO_AGENT, {c.kid: c.public}.get).type == "assign"
    assert first.kid not in HubKeyring.load(hub.keyring.folder).keys  # the retired private key is gone


def test_the_keys_and_register_commands_change_the_ring_and_are_audited(tmp_path: Any, capsys: Any, monkeypatch: Any) -> None:
    from shared.signing import SigningKey

    env = ["--log-level", "WARNING"]
    monkeypatch.setenv("OUTPOST_HUB_STATE_DIR", str(tmp_path / "hub"))
    assert hub_main([*env, "keys", "list"]) == 0
    first = capsys.readouterr().out.splitlines()[1].split()[0]
    assert hub_main([*env, "keys", "rotate"]) == 0
    assert hub_main([*env, "keys", "retire", first]) == 0
    assert hub_main([*env, "keys", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{first}  retired" in out and "current" in out
    current = [line.split()[0] for line in out.splitlines() if "current" in line][-1]
    assert hub_main([*env, "keys", "retire", current]) == 1  # never the key that signs
    device = SigningKey.generate()
    assert hub_main([*env, "agents", "register", "--id", "gw-1", "--public-key", device.public.to_text()]) == 0
    assert hub_main([*env, "agents", "register", "--id", "gw-1", "--public-key", SigningKey.generate().public.to_text()]) == 1  # a different key: --replace
    from hub.config import HubSettings
    from hub.db import make_engine, make_sessionmaker

    engine = make_engine(HubSettings.load().db_url)
    with make_sessionmaker(engine)() as session:
        actions = [(r.action, r.actor) for r in reversed(recent(session))]
        assert session.get(Agent, "gw-1").public_key == device.public.to_text()
    engine.dispose()
    assert actions == [("hub_key.rotate", "cli"), ("hub_key.retire", "cli"), ("agent.register", "cli")]
