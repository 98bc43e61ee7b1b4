"""Event ingestion: results applied exactly once, acknowledged after commit,
bad input recorded and survived."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from hub.models import Agent, RejectedMessage, SecurityEvent, TaskResult
from shared.messages import Heartbeat, Rejected, Result, Status
from shared.mqtt import Inbound
from shared.topics import ack_topic, events_topic, status_topic

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("a1"))
"""


def setup(make_hub: Any) -> tuple[Any, int, Any]:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("d")
    hub.tick()
    return hub, run_pk, hub.assignments_sent()[0].body


def security_codes(hub: Any) -> list[tuple[str | None, str]]:
    with hub.sessions() as session:
        return [(r.agent_id, r.code) for r in session.scalars(select(SecurityEvent).order_by(SecurityEvent.id))]


def rejected_codes(hub: Any) -> list[str]:
    with hub.sessions() as session:
        return [r.code for r in session.scalars(select(RejectedMessage).order_by(RejectedMessage.id))]


def acks_sent(hub: Any) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(topic, acknowledged ids, refused ids) of every ack the hub published."""
    return [(t, (b := hub.open(p).body).assignment_ids, b.refused_ids) for t, p in hub.link.published if t.endswith("/ack")]


def test_duplicate_result_is_applied_once_and_acknowledged_each_time(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    result = Result(assign.assignment_id, 1, "success", {"n": 1})
    hub.send("a1", result)
    hub.send("a1", result)
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(TaskResult)) == 1
    assert [a.body.assignment_ids for a in hub.acks()] == [(assign.assignment_id,), (assign.assignment_id,)]
    assert hub.ingester.counters["result.duplicate"] == 1
    assert hub.tis(run_pk)[0].output == {"n": 1}


def test_bad_messages_are_recorded_and_the_good_ones_still_apply(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    topic = events_topic("a1")
    good = Result(assign.assignment_id, 1, "success", "ok")
    from shared.envelope import Envelope

    good_payload = hub.sign(Envelope(good, "a1", hub.agent_clocks["a1"].now()))
    signed = lambda data: hub.sign_raw("a1", data)  # noqa: E731
    hub.agent_key("a2")
    batch = [
        (topic, signed(b"{not json")),
        (topic, b"x" * 300_000),
        (topic, signed(b'{"v":1,"type":"reboot","id":"1","from":"a1","hlc":"0000000000001.00000@a1","body":{}}')),
        (topic, signed(b'{"v":9,"type":"result","id":"1","from":"a1","hlc":"0000000000001.00000@a1","body":{}}')),
        (topic, signed(b'{"v":1,"type":"result","id":"1","from":"a1","hlc":"0000000000001.00000@a1","body":{"assignment_id":5}}')),
        ("outpost/v1/agents/a2/events", good_payload),  # a1's envelope on a2's topic: a1's signature, not a2's
        ("outpost/v1/agents/a2/events", hub.sign(Envelope(good, "a1", hub.agent_clocks["a1"].now()), "a2")),  # signed by a2, naming a1
        ("some/other/topic", b"hello"),
        (topic, b'{"v":1,"type":"result","id":"1","from":"a1","hlc":"0000000000001.00000@a1","body":{}}'),  # unsigned
        (topic, good_payload),
    ]
    from shared.mqtt import Inbound

    acked: list[int] = []

    class Tracking(Inbound):
        def ack(self) -> None:
            acked.append(self.mid)

    hub.ingester.process([Tracking(t, p, 1, False, i) for i, (t, p) in enumerate(batch)])
    assert rejected_codes(hub) == ["decode_error", "payload_too_large", "unknown_type", "unsupported_version", "invalid_message", "bad_topic"]
    assert security_codes(hub) == [("a2", "unknown_key"), ("a2", "sender_mismatch"), ("a1", "bad_signature")]
    assert sorted(acked) == list(range(len(batch)))  # nothing is left to be redelivered forever
    assert hub.tis(run_pk)[0].state == "success"
    assert hub.ingester.counters["rejected.decode_error"] == 1


def test_result_for_an_unknown_assignment_is_rejected_but_acknowledged(make_hub: Any) -> None:
    hub, _run_pk, _assign = setup(make_hub)
    hub.send("a1", Result("f" * 32, 1, "success"))
    assert rejected_codes(hub) == ["unknown_assignment"]
    # Acknowledged as refused, so the agent sets it aside instead of re-sending it forever.
    assert acks_sent(hub) == [(ack_topic("a1"), (), ("f" * 32,))]


def test_result_from_another_agent_is_refused(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    hub.agent_online("a2")
    hub.send("a2", Result(assign.assignment_id, 1, "success"))
    assert rejected_codes(hub) == ["foreign_assignment"]
    assert hub.tis(run_pk)[0].state == "queued"
    # Refused to the sender only; the assignment's own agent may still report.
    assert acks_sent(hub) == [(ack_topic("a2"), (), (assign.assignment_id,))]
    hub.send("a1", Result(assign.assignment_id, 1, "success"))
    assert hub.tis(run_pk)[0].state == "success"


def test_malformed_result_is_refused_but_one_a_hub_upgrade_could_apply_is_not(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    topic, aid = events_topic("a1"), assign.assignment_id
    hub.send_raw(topic, hub.sign_raw("a1", b'{"v":1,"type":"result","id":"1","from":"a1","hlc":"0000000000001.00000@a1","body":{"assignment_id":"bad-1","try_number":"x"}}'))
    hub.send_raw(topic, hub.sign_raw("a1", ('{"v":9,"type":"result","id":"2","from":"a1","hlc":"0000000000001.00000@a1","body":{"assignment_id":"%s"}}' % aid).encode()))
    hub.send_raw(topic, hub.sign_raw("a1", b"{not json"))
    assert rejected_codes(hub) == ["invalid_message", "unsupported_version", "decode_error"]
    assert [a.body.refused_ids for a in hub.acks()] == [("bad-1",)]  # a newer protocol version may apply later: no answer
    assert hub.tis(run_pk)[0].state == "queued"


def test_the_last_will_marks_the_agent_offline_although_stamped_earlier(make_hub: Any) -> None:
    """The will is stamped when the agent starts, before its later "online"
    messages; the broker sends it last, and it must win."""
    hub, _run_pk, _assign = setup(make_hub)
    clock = hub.agent_clocks["a1"]
    from shared.envelope import Envelope

    will = hub.sign(Envelope(Status("offline"), "a1", clock.now()))
    online = hub.sign(Envelope(Status("online", "0.1.0", "h", {}, ()), "a1", clock.now()))
    hub.send_raw(status_topic("a1"), online)
    hub.send_raw(status_topic("a1"), will)
    with hub.sessions() as session:
        assert session.get(Agent, "a1").state == "offline"


def test_heartbeat_updates_last_seen_and_queue_depths(make_hub: Any) -> None:
    hub, _run_pk, _assign = setup(make_hub)
    hub.clock.advance(5)
    hub.send("a1", Heartbeat("0.1.0", inbox_depth=3, outbox_depth=1, counters={"rejected.decode_error": 2}))
    with hub.sessions() as session:
        agent = session.get(Agent, "a1")
        assert agent.last_heartbeat["inbox_depth"] == 3
        assert agent.last_seen.timestamp() == hub.clock.now()


def test_an_assignment_the_device_refused_fails_that_try_for_good(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    hub.send("a1", Rejected("deadline_passed", "deadline 12:00 passed before delivery", assignment_id=assign.assignment_id))
    [ti] = hub.tis(run_pk)
    assert ti.state == "failed"
    assert ti.error["code"] == "deadline_passed"
    assert rejected_codes(hub) == ["deadline_passed"]


def test_two_manual_triggers_in_the_same_instant_make_two_runs(make_hub: Any) -> None:
    hub, first, _assign = setup(make_hub)
    second = hub.trigger("d")
    third = hub.trigger("d")
    assert len({first, second, third}) == 3


def test_nul_bytes_and_oversized_fields_from_a_device_are_recorded_not_fatal(make_hub: Any) -> None:
    """PostgreSQL text refuses NUL; a hostile payload must still be recorded
    and must not hold up the good message next to it."""
    hub, run_pk, assign = setup(make_hub)
    from shared.envelope import Envelope

    good = hub.sign(Envelope(Result(assign.assignment_id, 1, "success", "ok"), "a1", hub.agent_clocks["a1"].now()))
    hub.ingester.process([
        Inbound(events_topic("a1"), hub.sign_raw("a1", b"\x00\x01\x02 not json"), 1, False, 1),
        Inbound(events_topic("a1"), hub.sign(Envelope(Rejected("x" * 80, "nul \x00 inside", "m\x00"), "a1", hub.agent_clocks["a1"].now())), 1, False, 2),
        Inbound(events_topic("a1"), good, 1, False, 3),
    ])
    assert rejected_codes(hub) == ["decode_error", "x" * 50]
    assert hub.tis(run_pk)[0].state == "success"


def test_a_device_clock_far_ahead_is_counted_and_not_merged(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    hub.ingester.hlc.max_ahead_ms = 300_000
    from shared.envelope import Envelope
    from shared.hlc import HLC

    future = HLC(int((hub.clock.now() + 86_400) * 1000), 0, "a1")
    hub.send_raw(events_topic("a1"), hub.sign(Envelope(Result(assign.assignment_id, 1, "success", "ok"), "a1", future)))
    assert hub.tis(run_pk)[0].state == "success"  # the report still counts
    assert hub.ingester.counters["clock_skew"] == 1
    assert hub.ingester.hlc.now().wall_ms < future.wall_ms
