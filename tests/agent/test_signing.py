"""Signed work on the agent, over a real broker: what it refuses before
queueing (and reports as security events), its replay window across a
restart, duplicates, its own signatures, and hub key announcements."""

from __future__ import annotations

import time

from agent.daemon import Agent
from shared.frames import AGENT_TO_HUB, open_frame, unsigned_part
from shared.keychain import make_add, make_retire
from shared.messages import Assign, Cancel, KeyAnnouncement
from shared.signing import SigningKey
from shared.topics import HUB_KEYS_TOPIC, events_topic

from .conftest import AGENT_ID, HUB_KEY, HubPeer, wait_until


def assign(aid: str) -> Assign:
    return Assign(aid, "dag", "run-1", "task", 1, "noop")


def security_refusals(hub: HubPeer) -> dict[str, str | None]:
    return {r.code: r.message_id for r in hub.of("rejected") if r.code.startswith("security.")}


def test_forged_foreign_expired_and_unsigned_assignments_are_refused_never_queued(make_agent, hub) -> None:
    agent: Agent = make_agent()
    stranger = SigningKey.generate()
    ids = {
        "security.bad_signature": hub.publish(raw=unsigned_part(hub.frame(assign("unsigned")))),
        "security.unknown_key": hub.publish(assign("forged"), key=stranger),
        "security.wrong_device": hub.publish(assign("elsewhere"), to="dev-2"),
        "security.expired": hub.publish(assign("stale"), expires_at=time.time() - 5),
    }
    got = wait_until(lambda: len(security_refusals(hub)) == 4 and security_refusals(hub), what="four security refusals")
    assert set(got) == set(ids)
    assert got["security.unknown_key"] is not None  # the id is read from the (unverified) JSON, for the report only
    # Nothing was queued or run; the agent still works and counted each.
    hub.assign("good")
    assert hub.wait_for("result", "good")[0].status == "success"
    assert agent.inbox.get("unsigned") is None and agent.inbox.get("forged") is None and agent.inbox.get("stale") is None
    assert not hub.of("accepted", "forged") and not hub.of("accepted", "elsewhere")
    counters = agent.counters.snapshot()
    assert all(counters[code] == 1 for code in ids)
    # ...and says so in its heartbeat.
    beat = wait_until(lambda: [h for h in hub.of("heartbeat") if h.counters.get("security.unknown_key")], what="heartbeat counters")
    assert beat[-1].counters["security.bad_signature"] == 1


def test_a_replayed_sequence_is_refused_also_after_a_restart(make_agent, hub) -> None:
    agent = make_agent()
    frame = hub.frame(assign("a-1"))
    hub.publish(raw=frame)
    hub.wait_for("result", "a-1")
    # The very same frame again: a copy of what the inbox holds is a duplicate, not an attack.
    hub.publish(raw=frame)
    assert hub.wait_for("accepted", "a-1", count=2)[1].duplicate is True
    # A used sequence number on another assignment is refused.
    used = hub.seq
    hub.publish(assign("a-2"), seq=used)
    wait_until(lambda: "security.replayed" in security_refusals(hub), what="replayed refusal")
    assert agent.inbox.get("a-2") is None

    agent.stop(timeout=2)
    again = make_agent()
    hub.publish(assign("a-3"), seq=used)  # the window survived the restart
    wait_until(lambda: len([r for r in hub.of("rejected") if r.code == "security.replayed"]) == 2, what="second replayed refusal")
    assert again.inbox.get("a-3") is None
    # Far behind the window: refused too.
    hub.seq += 10_000
    hub.assign("a-4")
    hub.wait_for("result", "a-4")
    hub.publish(assign("a-5"), seq=hub.seq - 5000)
    wait_until(lambda: len([r for r in hub.of("rejected") if r.code == "security.replayed"]) == 3, what="third replayed refusal")
    assert again.counters.snapshot()["security.replayed"] == 2


def test_a_cancel_is_checked_like_an_assignment(make_agent, hub) -> None:
    agent = make_agent()
    hub.publish(Cancel("nothing"), to="dev-2")
    hub.publish(Cancel("nothing"), seq=5)
    hub.publish(Cancel("nothing"), seq=5)  # replayed
    wait_until(lambda: {"security.wrong_device", "security.replayed"} <= set(security_refusals(hub)), what="cancel refusals")
    counters = agent.counters.snapshot()
    assert sum(v for k, v in counters.items() if k.startswith("cancel.")) == 1  # only the first one was acted on


def test_everything_the_agent_sends_is_signed_with_its_device_key(make_agent, hub, mosquitto) -> None:
    agent = make_agent()
    seen: list[bytes] = []
    hub.client.on_message = lambda c, u, msg: seen.append(msg.payload) if msg.topic == events_topic(AGENT_ID) else None
    hub.publish(raw=hub.frame(assign("a-1")))
    lookup = {agent.device_key.kid: agent.device_key.public}.get
    # Heartbeats go on the same topic: wait for the result itself, not for any three messages.
    wait_until(lambda: "result" in [open_frame(p, AGENT_TO_HUB, lookup).type for p in list(seen)], what="accepted, started and result")
    kinds = [open_frame(payload, AGENT_TO_HUB, lookup).type for payload in seen]
    assert {"accepted", "started", "result"} <= set(kinds)
    assert (agent.settings.state_dir / "identity" / "device.key").stat().st_mode & 0o777 == 0o600
    from agent.identity import load_hlc_floor

    floor = load_hlc_floor(agent.settings)  # saved before each heartbeat and status is sent
    assert floor is not None and floor <= agent.hlc.last


def test_a_key_announcement_chain_moves_the_agent_to_the_new_hub_key(make_agent, hub) -> None:
    agent = make_agent()
    b, c = SigningKey.generate(), SigningKey.generate()
    links = (make_add(b.public, HUB_KEY, 1.0), make_add(c.public, b, 2.0), make_retire(HUB_KEY.kid, c, 3.0))
    from shared.envelope import Envelope
    from shared.frames import HUB_TO_AGENT, sign_envelope

    frame = sign_envelope(Envelope(KeyAnnouncement(c.kid, links), sender="hub", hlc=hub.hlc.now()), c, HUB_TO_AGENT)
    hub.client.publish(HUB_KEYS_TOPIC, frame, qos=1, retain=True).wait_for_publish(5)
    wait_until(lambda: set(agent.trust.keys()) == {b.kid, c.kid}, what="the walked chain")
    hub.publish(assign("by-c"), key=c)
    assert hub.wait_for("result", "by-c")[0].status == "success"
    hub.publish(assign("by-old"))  # the retired key
    wait_until(lambda: "security.unknown_key" in security_refusals(hub), what="old key refused")
    # Persisted: a restarted agent trusts the new keys and still not the retired one (the setting names it).
    agent.stop(timeout=2)
    again = make_agent()
    assert set(again.trust.keys()) == {b.kid, c.kid}
    # A forged announcement (signed by a stranger) changes nothing and is reported.
    mallory = SigningKey.generate()
    forged = sign_envelope(Envelope(KeyAnnouncement(mallory.kid, (make_add(mallory.public, mallory, 4.0),)), sender="hub", hlc=hub.hlc.now()), mallory, HUB_TO_AGENT)
    hub.client.publish(HUB_KEYS_TOPIC, forged, qos=1, retain=True).wait_for_publish(5)
    wait_until(lambda: "security.bad_announcement" in security_refusals(hub), what="forged announcement reported")
    assert set(again.trust.keys()) == {b.kid, c.kid}
    hub.client.publish(HUB_KEYS_TOPIC, b"", qos=1, retain=True).wait_for_publish(5)  # leave no retained message for other tests
