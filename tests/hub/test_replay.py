"""Replays of device messages: a captured heartbeat or ``online`` status,
sent again later (by anyone who can publish on the agent's topics, or over
the broker), must not make a dead or offline device look alive. Both are
refused when stamped no later than the newest of their kind the hub applied,
and recorded as the security event ``replayed``. Everything else is
idempotent: a replayed result changes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import select

from hub.models import Agent, SecurityEvent, TaskResult
from shared.envelope import decode
from shared.frames import unsigned_part
from shared.hlc import HLC
from shared.messages import Heartbeat, Result, Status
from shared.mqtt import Inbound
from shared.topics import events_topic, status_topic

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("a1"))
"""


def agent(hub: Any) -> Agent:
    with hub.sessions() as session:
        row = session.get(Agent, "a1")
        assert row is not None
        session.expunge(row)
        return row


def events(hub: Any) -> list[tuple[str | None, str, str]]:
    with hub.sessions() as session:
        return [(e.agent_id, e.source, e.code) for e in session.scalars(select(SecurityEvent).order_by(SecurityEvent.id))]


def test_a_replayed_heartbeat_does_not_bring_an_offline_agent_back(make_hub: Any) -> None:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    captured = hub.frame("a1", Heartbeat("0.1.0"))
    hub.send_raw(events_topic("a1"), captured)
    assert agent(hub).heartbeat_hlc
    hub.send("a1", Status("offline"), topic=status_topic("a1"))
    hub.clock.advance(120)
    seen = agent(hub).last_seen

    hub.send_raw(events_topic("a1"), captured)  # the replay
    after = agent(hub)
    assert after.state == "offline" and after.last_seen == seen
    assert events(hub) == [("a1", "mqtt", "replayed")]
    assert hub.ingester.counters["security.replayed"] == 1
    # Nor does the same heartbeat again in one batch with a genuine one.
    hub.clock.advance(1)
    fresh = hub.frame("a1", Heartbeat("0.1.0"))
    hub.ingester.process([Inbound(events_topic("a1"), fresh, 1, False, 1), Inbound(events_topic("a1"), fresh, 1, False, 2)])
    assert agent(hub).state == "online"  # the genuine one applies
    assert hub.ingester.counters["security.replayed"] == 2


def test_heartbeats_apply_in_order_and_an_older_one_is_refused(make_hub: Any) -> None:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    first = hub.frame("a1", Heartbeat("0.1.0", inbox_depth=1))
    second = hub.frame("a1", Heartbeat("0.1.0", inbox_depth=2))
    hub.send_raw(events_topic("a1"), second)
    hub.send_raw(events_topic("a1"), first)  # older: a replay (heartbeats come from one thread, in order)
    assert agent(hub).last_heartbeat["inbox_depth"] == 2
    assert events(hub) == [("a1", "mqtt", "replayed")]


def test_a_replayed_online_status_after_the_will_is_refused(make_hub: Any) -> None:
    """The will ``offline`` is stamped when the agent connects, before its
    ``online``: it still applies (the broker sends it when the agent is
    gone), and the newest stamp is kept, so the captured ``online`` of that
    session cannot be replayed after it."""
    hub = make_hub({"d.py": DAG})
    will = hub.frame("a1", Status("offline"))  # signed at connect
    hub.agent_online("a1")
    online = agent(hub)
    assert online.state == "online"
    captured = hub.frame("a1", Status("online", "0.1.0", "a1", {}, ()))
    hub.send_raw(status_topic("a1"), captured)
    hub.clock.advance(60)
    hub.send_raw(status_topic("a1"), will)  # the broker publishes the will
    assert agent(hub).state == "offline"
    assert HLC.parse(agent(hub).status_hlc) == decode(unsigned_part(captured)).hlc  # the newest stamp kept, not the will's

    hub.send_raw(status_topic("a1"), captured)  # the replay
    assert agent(hub).state == "offline"
    assert events(hub) == [("a1", "mqtt", "replayed")]
    # The same status as the broker's retained copy, delivered again on a
    # resubscribe: old news, not applied, not an attack.
    hub.ingester.process([Inbound(status_topic("a1"), captured, 1, True, 1)])
    assert agent(hub).state == "offline" and len(events(hub)) == 1
    assert hub.ingester.counters["status.retained_stale"] == 1
    # The agent coming back applies.
    hub.agent_online("a1")
    assert agent(hub).state == "online"


def test_a_replayed_result_changes_nothing_and_is_acknowledged_again(make_hub: Any) -> None:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("d")
    hub.tick()
    assign = hub.assignments_sent()[0].body
    captured = hub.frame("a1", Result(assign.assignment_id, 1, "success", {"n": 1}))
    hub.send_raw(events_topic("a1"), captured)
    finished = hub.tis(run_pk)[0].ended_at
    hub.clock.advance(timedelta(minutes=5).total_seconds())
    hub.send_raw(events_topic("a1"), captured)
    with hub.sessions() as session:
        assert len(list(session.scalars(select(TaskResult)))) == 1
    assert hub.tis(run_pk)[0].ended_at == finished
    assert [ack.body.assignment_ids for ack in hub.acks()] == [(assign.assignment_id,)] * 2
    assert events(hub) == []
