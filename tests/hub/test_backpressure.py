"""The hub's side of agent back-pressure: an agent whose heartbeat says it is
not accepting gets no new fleet work, and an assignment it refused with
``agent_backpressure`` is not failed but sent again later."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from hub.ingest import FINAL_REFUSALS
from hub.models import Assignment, RejectedMessage
from hub.targeting import AgentView, choose
from shared.messages import Accepted, Heartbeat, Rejected

ANY_DAG = """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("one") as dag:
    AgentOperator(task_id="work", job_type="noop", target=any_agent())
"""

PINNED_DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("pinned") as dag:
    AgentOperator(task_id="work", job_type="noop", target=on_agent("a1"))
"""


def test_targeting_skips_agents_that_are_not_accepting_unless_named() -> None:
    fleet = [AgentView("a1", True, {}, frozenset({"noop"}), load=0, accepting=False), AgentView("a2", True, {}, frozenset({"noop"}), load=5)]
    assert choose("any", "noop", fleet) == ["a2"]
    assert choose("all", "noop", fleet) == ["a2"]
    assert choose("agent", "noop", fleet, agent_id="a1") == ["a1"]


def test_backpressure_refusal_is_not_final() -> None:
    assert "agent_backpressure" not in FINAL_REFUSALS


def test_any_target_avoids_an_agent_whose_heartbeat_says_not_accepting(make_hub: Any) -> None:
    hub = make_hub({"one.py": ANY_DAG})
    hub.agent_online("a1")
    hub.agent_online("a2")
    hub.send("a1", Heartbeat("0.1.0", accepting=False, not_accepting="outbox holds 300 bytes, over its 200 byte quota"))
    hub.send("a2", Heartbeat("0.1.0", outbox_depth=40))
    run_pk = hub.trigger("one")
    hub.tick()
    assert [ti.agent_id for ti in hub.tis(run_pk)] == ["a2"]


def test_refused_for_backpressure_stays_queued_and_is_redelivered(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED_DAG}, redeliver_after=30)
    hub.agent_online("a1")
    run_pk = hub.trigger("pinned")
    hub.tick()
    _mark_published(hub)
    [first] = hub.assignments_sent()
    aid = first.body.assignment_id
    hub.send("a1", Rejected("agent_backpressure", "not accepting new work: outbox over quota", first.id, aid))
    [ti] = hub.tis(run_pk)
    assert ti.state == "queued" and ti.try_number == 1  # not failed, not retried: the same try waits
    with hub.sessions() as session:
        assert session.get(Assignment, aid).state == "sent"
        assert [r.code for r in session.scalars(select(RejectedMessage))] == ["agent_backpressure"]  # on record
    hub.clock.advance(31)
    hub.tick()
    first_again, again = hub.assignments_sent()
    assert again.body == first.body  # the same assignment, sent again
    hub.send("a1", Accepted(aid))
    [ti] = hub.tis(run_pk)
    assert ti.state == "delivered"


def test_no_redelivery_to_an_agent_that_is_not_accepting_and_at_once_when_it_accepts_again(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED_DAG}, redeliver_after=30)
    hub.agent_online("a1")
    hub.trigger("pinned")
    hub.tick()
    _mark_published(hub)
    [first] = hub.assignments_sent()
    aid = first.body.assignment_id
    hub.send("a1", Rejected("agent_backpressure", "not accepting new work: outbox over quota", first.id, aid))
    hub.send("a1", Heartbeat("0.1.0", accepting=False, not_accepting="outbox holds 300 bytes, over its 200 byte quota"))
    for _ in range(4):  # two hours: no copy that the agent would only refuse
        hub.clock.advance(1800)
        hub.send("a1", Heartbeat("0.1.0", accepting=False, not_accepting="outbox holds 300 bytes, over its 200 byte quota"))
        hub.tick()
        _mark_published(hub)
    assert len(hub.assignments_sent()) == 1
    with hub.sessions() as session:
        assert session.get(Assignment, aid).send_count == 1  # so no grown backoff either
    hub.clock.advance(1)
    hub.send("a1", Heartbeat("0.1.0", accepting=True))
    hub.tick()
    _mark_published(hub)
    assert [a.body for a in hub.assignments_sent()] == [first.body, first.body]  # re-sent at once


def test_after_a_refusal_streak_an_agent_accepting_again_gets_its_work_without_the_backoff(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED_DAG}, redeliver_after=30)
    hub.agent_online("a1")
    hub.trigger("pinned")
    hub.tick()
    _mark_published(hub)
    for _ in range(4):  # refused before the hub heard the heartbeat: the backoff grew to 8 x 30 s
        hub.clock.advance(300)
        hub.send("a1", Heartbeat("0.1.0", accepting=True))
        hub.tick()
        _mark_published(hub)
    sent = len(hub.assignments_sent())
    assert sent == 5
    hub.send("a1", Heartbeat("0.1.0", accepting=False, not_accepting="quota"))
    hub.clock.advance(31)
    hub.tick()
    hub.send("a1", Heartbeat("0.1.0", accepting=True))
    hub.clock.advance(1)
    hub.tick()  # 32 s after the last copy, well inside its 240 s backoff
    _mark_published(hub)
    assert len(hub.assignments_sent()) == sent + 1


def _mark_published(hub: Any) -> None:
    from hub.outbox import OutboxPublisher

    hub.publisher().flush()
