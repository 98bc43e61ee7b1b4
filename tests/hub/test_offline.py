"""Offline operation, hub side (hub.offline): device_offline instead of
failed, restore and re-send on return, offline_grace (re-target or give
up), scheduled-ahead assignments, and the clock-skew flag. A real hub
(scheduler, ingestion, outbox) on a real database, driven by a manual clock."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from hub import events as ev
from hub import fleet
from hub.api.app import create_app
from hub.models import Agent, Assignment, OutboxMessage, TaskInstance, TaskResult
from hub.outbox import OutboxPublisher
from hub.web import views
from shared.clock import to_datetime
from shared.envelope import decode
from shared.hlc import HybridClock
from shared.messages import Accepted, Assign, Cancel, Heartbeat, Result, Started, Status
from shared.topics import status_topic
from tests.hub.api_harness import admin_headers, hub_settings

ANYWHERE = """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("anywhere") as dag:
    AgentOperator(task_id="work", job_type="noop", params={"echo": 1}, target=any_agent(), offline_grace=600)
"""

PINNED = """
from datetime import timedelta
from hub.dag import DAG, AgentOperator, on_agent
with DAG("pinned", default_args={"retries": 1, "retry_delay": 0}) as dag:
    AgentOperator(task_id="work", job_type="noop", params={"echo": 1}, target=on_agent("a1"), offline_grace=timedelta(minutes=10))
"""

FANOUT = """
from hub.dag import DAG, AgentOperator, every_agent
with DAG("fanout") as dag:
    AgentOperator(task_id="work", job_type="noop", params={"echo": 1}, target=every_agent(), offline_grace=600)
"""

NIGHTLY = """
from datetime import timedelta
from hub.dag import DAG, AgentOperator, on_agent
with DAG("nightly") as dag:
    AgentOperator(task_id="backup", job_type="noop", target=on_agent("a1"), offline_grace=600,
                  not_before=timedelta(hours=14), deadline=timedelta(hours=18))
    AgentOperator(task_id="templated", job_type="noop", target=on_agent("a1"),
                  not_before="{{ (data_interval_end + macros.timedelta(hours=2)).isoformat() }}")
"""


def publish(hub: Any) -> None:
    """What the outbox publisher does: send the rows, mark assignments sent."""
    hub.publisher().flush()


def assignment_of(hub: Any, ti: TaskInstance) -> Assignment:
    with hub.sessions() as session:
        found = session.scalar(select(Assignment).where(Assignment.ti_id == ti.id, Assignment.try_number == ti.try_number))
        assert found is not None
        return found


def assigns_to(hub: Any, agent_id: str, assignment_id: str) -> int:
    """How many Assign messages for ``assignment_id`` went to ``agent_id`` (the outbox)."""
    envs = [e for e in hub.assignments_sent() if isinstance(e.body, Assign) and e.body.assignment_id == assignment_id]
    with hub.sessions() as session:
        topics = [r.topic for r in session.scalars(select(OutboxMessage).where(OutboxMessage.assignment_id == assignment_id))]
    assert len(topics) == len(envs)
    return sum(1 for t in topics if f"/{agent_id}/" in t)


def cancels(hub: Any) -> list[Cancel]:
    return [e.body for e in hub.assignments_sent() if isinstance(e.body, Cancel)]


def silent(hub: Any, seconds: float, *alive: str) -> None:
    """Let ``seconds`` pass in which only the ``alive`` agents heartbeat (every 20 s)."""
    step = 20.0
    while seconds > 0:
        hub.clock.advance(min(step, seconds))
        seconds -= step
        for agent_id in alive:
            hub.send(agent_id, Heartbeat("0.1.0"))
        hub.tick(2)


def only(hub: Any, run_pk: int) -> TaskInstance:
    (ti,) = hub.tis(run_pk)
    return ti


# --- going offline and coming back ------------------------------------------------


def test_work_on_a_silent_device_shows_device_offline_never_failed(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED}, agent_offline_after=35)
    hub.agent_online("a1")
    run_pk = hub.trigger("pinned")
    hub.tick()
    publish(hub)
    ti = only(hub, run_pk)
    aid = assignment_of(hub, ti).id
    hub.send("a1", Accepted(aid))
    hub.send("a1", Started(aid, hub.clock.now()))
    assert only(hub, run_pk).state == "running"
    silent(hub, 40)
    ti = only(hub, run_pk)
    assert (ti.state, ti.error, ti.offline_since) == ("device_offline", None, to_datetime(hub.clock.now() - 0))
    with hub.sessions() as session:
        assert session.get(Agent, "a1").state == "offline"
    # It came back running it (its heartbeat says so): running again, and its result decides.
    hub.send("a1", Heartbeat("0.1.0", running=(aid,)))
    ti = only(hub, run_pk)
    assert (ti.state, ti.offline_since) == ("running", None)
    hub.send("a1", Result(aid, 1, "success", output={"echo": 1}))
    hub.tick()
    assert only(hub, run_pk).state == "success"


def test_an_offline_status_or_will_marks_queued_and_delivered_work_device_offline(make_hub: Any) -> None:
    hub = make_hub({"fanout.py": FANOUT})
    hub.agent_online("a1")
    hub.agent_online("a2")
    run_pk = hub.trigger("fanout")
    hub.tick()
    publish(hub)
    first, second = hub.tis(run_pk)
    hub.send("a1", Accepted(assignment_of(hub, first).id))
    hub.send("a1", Status("offline"), topic=status_topic("a1"))  # the broker publishes its will
    hub.send("a2", Status("offline"), topic=status_topic("a2"))
    assert [t.state for t in hub.tis(run_pk)] == ["device_offline", "device_offline"]


def test_a_returning_device_gets_what_its_reports_justify_and_unaccepted_work_is_sent_again_at_once(make_hub: Any) -> None:
    hub = make_hub({"fanout.py": FANOUT}, redeliver_after=3600)
    for agent_id in ("a1", "a2", "a3"):
        hub.agent_online(agent_id)
    run_pk = hub.trigger("fanout")
    hub.tick()
    publish(hub)
    accepted, started, unaccepted = hub.tis(run_pk)
    ids = [assignment_of(hub, t).id for t in (accepted, started, unaccepted)]
    hub.send("a1", Accepted(ids[0]))
    hub.send("a2", Accepted(ids[1]))
    hub.send("a2", Started(ids[1], hub.clock.now()))
    for agent_id in ("a1", "a2", "a3"):
        hub.send(agent_id, Status("offline"), topic=status_topic(agent_id))
    assert [t.state for t in hub.tis(run_pk)] == ["device_offline"] * 3
    hub.clock.advance(30)
    hub.tick()
    assert assigns_to(hub, "a3", ids[2]) == 1  # an offline device gets no copies meanwhile
    for agent_id in ("a1", "a2", "a3"):
        hub.agent_online(agent_id)
    assert [t.state for t in hub.tis(run_pk)] == ["delivered", "running", "queued"]
    # Sent again from the hub's DB at once, not after redeliver_after (an hour here):
    # the broker may have lost the copy it held.
    assert assigns_to(hub, "a3", ids[2]) == 2
    assert (assigns_to(hub, "a1", ids[0]), assigns_to(hub, "a2", ids[1])) == (1, 1)  # accepted work is not re-sent
    with hub.sessions() as session:
        assert session.get(Assignment, ids[2]).state == "pending"
    publish(hub)
    with hub.sessions() as session:
        assert session.get(Assignment, ids[2]).state == "sent"


def test_a_device_that_comes_back_by_heartbeat_is_restored_and_its_work_re_sent(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED}, agent_offline_after=35, redeliver_after=3600)
    hub.agent_online("a1")
    run_pk = hub.trigger("pinned")
    hub.tick()
    publish(hub)
    aid = assignment_of(hub, only(hub, run_pk)).id
    silent(hub, 40)
    assert only(hub, run_pk).state == "device_offline"
    hub.send("a1", Heartbeat("0.1.0"))  # the hub never saw it go: only silence
    assert only(hub, run_pk).state == "queued"
    assert assigns_to(hub, "a1", aid) == 2


# --- offline_grace -----------------------------------------------------------------


def test_an_unpinned_task_is_re_targeted_after_its_grace_without_using_a_retry(make_hub: Any) -> None:
    hub = make_hub({"anywhere.py": ANYWHERE}, agent_offline_after=35)
    hub.agent_online("a1")
    hub.agent_online("a2")
    run_pk = hub.trigger("anywhere")
    hub.tick()
    publish(hub)
    ti = only(hub, run_pk)
    assert (ti.agent_id, ti.try_number, ti.max_tries) == ("a1", 1, 1)
    old = assignment_of(hub, ti).id
    hub.send("a1", Accepted(old))
    silent(hub, 40, "a2")
    assert only(hub, run_pk).state == "device_offline"
    silent(hub, 560, "a2")  # 600 s after it went offline: still within its grace
    assert only(hub, run_pk).state == "device_offline"
    silent(hub, 60, "a2")
    ti = only(hub, run_pk)
    assert (ti.state, ti.agent_id, ti.try_number, ti.max_tries) == ("queued", "a2", 2, 2)
    assert [(c.assignment_id, c.reason) for c in cancels(hub)] == [(old, "offline_grace")]
    with hub.sessions() as session:
        assert session.get(Assignment, old).state == "cancelled"
    new = assignment_of(hub, ti).id
    # The first device returns: the Cancel is sent to it again (the broker may have lost it); nothing else is.
    hub.agent_online("a1")
    assert [c.assignment_id for c in cancels(hub)] == [old, old]
    assert assigns_to(hub, "a1", old) == 1
    hub.send("a1", Heartbeat("0.1.0"))
    assert len(cancels(hub)) == 2
    hub.send("a2", Result(new, 2, "success", output={"echo": 1}))
    # The old device's late result is kept, not applied.
    hub.send("a1", Result(old, 1, "success", output={"echo": "late"}))
    hub.tick()
    ti = only(hub, run_pk)
    assert (ti.state, ti.output) == ("success", {"echo": 1})
    with hub.sessions() as session:
        applied = {r.agent_id: r.applied for r in session.scalars(select(TaskResult))}
    assert applied == {"a2": True, "a1": False}


def test_a_pinned_task_gives_up_with_device_offline_and_its_retry_waits_for_the_device(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED})
    hub.agent_online("a1")
    run_pk = hub.trigger("pinned")
    hub.tick()
    publish(hub)
    hub.send("a1", Status("offline"), topic=status_topic("a1"))
    assert only(hub, run_pk).state == "device_offline"
    hub.clock.advance(599)
    hub.tick()
    assert only(hub, run_pk).state == "device_offline"
    hub.clock.advance(2)
    hub.tick(1)
    ti = only(hub, run_pk)
    assert (ti.state, ti.error["code"], ti.error["retryable"]) == ("up_for_retry", "device_offline", True)
    assert [c.reason for c in cancels(hub)] == ["offline_grace"]
    hub.tick()
    ti = only(hub, run_pk)  # the retry went to the same device, and waits for it
    assert (ti.state, ti.agent_id, ti.try_number) == ("device_offline", "a1", 2)
    hub.clock.advance(601)
    hub.tick()
    ti = only(hub, run_pk)
    assert (ti.state, ti.error["code"]) == ("failed", "device_offline")
    with hub.sessions() as session:
        from hub.models import DagRun

        assert session.get(DagRun, run_pk).state == "failed"
    assert [c.reason for c in cancels(hub)] == ["offline_grace", "offline_grace"]


def test_one_device_of_a_fan_out_is_pinned_the_others_finish(make_hub: Any) -> None:
    hub = make_hub({"fanout.py": FANOUT}, agent_offline_after=35)
    hub.agent_online("a1")
    hub.agent_online("a2")
    run_pk = hub.trigger("fanout")
    hub.tick()
    publish(hub)
    _, second = hub.tis(run_pk)
    hub.send("a2", Result(assignment_of(hub, second).id, 1, "success", output={"echo": 1}))
    silent(hub, 700, "a2")
    first, second = hub.tis(run_pk)
    assert (first.agent_id, first.state, first.error["code"]) == ("a1", "failed", "device_offline")
    assert second.state == "success"


def test_the_hub_default_grace_applies_when_the_task_sets_none(make_hub: Any) -> None:
    dag = ANYWHERE.replace(", offline_grace=600", "").replace("any_agent()", 'on_agent("a1")').replace("any_agent", "on_agent")
    hub = make_hub({"d.py": dag}, default_offline_grace=50)
    hub.agent_online("a1")
    run_pk = hub.trigger("anywhere")
    hub.tick()
    hub.send("a1", Status("offline"), topic=status_topic("a1"))
    hub.clock.advance(49)
    hub.tick()
    assert only(hub, run_pk).state == "device_offline"
    hub.clock.advance(2)
    hub.tick()
    assert only(hub, run_pk).state == "failed"


# --- scheduled ahead -----------------------------------------------------------------


def test_work_scheduled_ahead_is_sent_at_once_and_not_offline_before_its_not_before(make_hub: Any) -> None:
    hub = make_hub({"nightly.py": NIGHTLY})
    hub.agent_online("a1")
    start = hub.clock.now()
    run_pk = hub.trigger("nightly")
    hub.tick()
    publish(hub)
    by_task = {e.body.task_id: e.body for e in hub.assignments_sent() if isinstance(e.body, Assign)}
    assert (by_task["backup"].not_before, by_task["backup"].deadline) == (start + 14 * 3600, start + 18 * 3600)
    assert (by_task["templated"].not_before, by_task["templated"].deadline) == (start + 2 * 3600, None)
    backup = next(t for t in hub.tis(run_pk) if t.task_id == "backup")
    hub.send("a1", Accepted(assignment_of(hub, backup).id))
    hub.send("a1", Status("offline"), topic=status_topic("a1"))  # offline by design, holding the job
    backup = next(t for t in hub.tis(run_pk) if t.task_id == "backup")
    assert backup.state == "delivered"
    hub.clock.advance(14 * 3600 - 1)
    hub.tick()
    assert next(t for t in hub.tis(run_pk) if t.task_id == "backup").state == "delivered"
    hub.clock.advance(2)  # not_before passed and it is still gone: now it shows
    hub.tick()
    assert next(t for t in hub.tis(run_pk) if t.task_id == "backup").state == "device_offline"
    hub.clock.advance(598)  # its grace counts from not_before
    hub.tick()
    assert next(t for t in hub.tis(run_pk) if t.task_id == "backup").state == "device_offline"
    # Every copy carries the same window (the inbox compares bodies).
    hub.agent_online("a1")
    again = [e.body for e in hub.assignments_sent() if isinstance(e.body, Assign) and e.body.task_id == "backup"]
    assert {(a.not_before, a.deadline) for a in again} == {(start + 14 * 3600, start + 18 * 3600)}


def test_a_bad_scheduled_ahead_argument_is_a_dag_error() -> None:
    import pytest

    from hub.dag import DAG, AgentOperator
    from hub.errors import InvalidDag

    with DAG("bad"):
        with pytest.raises(InvalidDag, match="not_before"):
            AgentOperator(task_id="t", job_type="noop", not_before="tonight")
        with pytest.raises(InvalidDag, match="deadline"):
            AgentOperator(task_id="u", job_type="noop", not_before=timedelta(hours=2), deadline=timedelta(hours=1))
        with pytest.raises(InvalidDag, match="offline_grace"):
            AgentOperator(task_id="v", job_type="noop", offline_grace=-1)


# --- clock skew ----------------------------------------------------------------------


def test_clock_skew_is_flagged_shown_and_cleared(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED})
    seen: list[dict[str, Any]] = []
    hub.ingester.events.subscribe(ev.AGENT_CLOCK_SKEW, lambda _n, data: seen.append(data))
    hub.agent_online("a1")
    hub.agent_online("a2")
    with hub.sessions() as session:
        assert fleet.clock_trusted(session, "a1") and session.get(Agent, "a1").clock_skew == 0.0

    hub.agent_clocks["a1"] = HybridClock("a1", lambda: int((hub.clock.now() + 900) * 1000))  # 15 min ahead
    hub.agent_clocks["a2"] = HybridClock("a2", lambda: int((hub.clock.now() - 400) * 1000))  # behind
    hub_clock_before = hub.ingester.hlc.now()
    hub.send("a1", Heartbeat("0.1.0"))
    hub.send("a2", Heartbeat("0.1.0"))
    with hub.sessions() as session:
        a1, a2 = session.get(Agent, "a1"), session.get(Agent, "a2")
        assert (a1.clock_skew, a2.clock_skew) == (900.0, -400.0)
        assert a1.clock_skew_flagged_at is not None and a2.clock_skew_flagged_at is not None
        assert not fleet.clock_trusted(session, "a1") and not fleet.clock_trusted(session, "a2")
    assert [(e["agent_id"], e["flagged"]) for e in seen] == [("a1", True), ("a2", True)]
    # Not trusted: the ahead stamp did not drag the hub's clock into the future.
    assert hub.ingester.hlc.now().wall_ms < hub_clock_before.wall_ms + 1000

    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock, extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()})
    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        agents = {a["agent_id"]: a for a in client.get("/api/v1/agents").json()["items"]}
        assert (agents["a1"]["clock_skew"], agents["a1"]["clock_trusted"]) == (900.0, False)
        assert agents["a1"]["clock_skew_flagged_at"] is not None
        page = client.get("/agents/a1")
        assert page.status_code == 200 and "clock not trusted" in page.text and "clock-flagged" in page.text
        listing = client.get("/agents")
        assert listing.status_code == 200 and "+900.0 s" in listing.text and "clock-flagged" in listing.text

    # Fixed (NTP caught up): the flag clears at the next fresh message.
    hub.agent_clocks["a1"] = HybridClock("a1", lambda: int((hub.clock.now() + 2) * 1000))
    hub.clock.advance(1000)  # past the wrong clock's last stamp, so the HLC follows the fixed clock
    hub.send("a1", Heartbeat("0.1.0"))
    with hub.sessions() as session:
        a1 = session.get(Agent, "a1")
        assert (a1.clock_skew, a1.clock_skew_flagged_at) == (2.0, None)
        assert fleet.clock_trusted(session, "a1")
    assert seen[-1] == {"agent_id": "a1", "skew": 2.0, "flagged": False}


def test_a_retained_status_is_not_a_clock_reading(make_hub: Any) -> None:
    from shared.envelope import Envelope
    from shared.frames import unsigned_part
    from shared.mqtt import Inbound

    hub = make_hub({"pinned.py": PINNED})
    old = HybridClock("a1", lambda: int((hub.clock.now() - 86400) * 1000))  # published a day ago, kept by the broker
    payload = hub.sign(Envelope(Status("online", "0.1.0", "a1"), sender="a1", hlc=old.now()))
    hub.ingester.process([Inbound(status_topic("a1"), payload, 1, True, 1)])
    with hub.sessions() as session:
        a1 = session.get(Agent, "a1")
        assert (a1.state, a1.clock_skew, a1.clock_skew_flagged_at) == ("online", None, None)
    assert decode(unsigned_part(payload)).body.state == "online"


def test_the_documented_nightly_example_is_delivered_now_and_runs_at_night(make_hub: Any) -> None:
    """The example of docs/dags.md's scheduled-ahead section, as written."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs" / "dags.md").read_text()
    example = text.split("## Offline devices and scheduled-ahead work", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    hub = make_hub({"nightly_backup.py": example})
    hub.agent_online("edge-7", job_types=("command.run", "diagnostics.collect"))
    run_pk = hub.trigger("nightly_backup")  # 2026-01-01T00:00Z: the last complete interval ended at noon the day before
    hub.tick()
    sent = {e.body.task_id: e.body for e in hub.assignments_sent() if isinstance(e.body, Assign)}
    night = hub.clock.now() + 2 * 3600  # 02:00
    assert (sent["backup"].not_before, sent["backup"].deadline) == (night, night + 4 * 3600)
    assert (sent["report"].not_before, sent["report"].deadline) == (night + 3600, None)
    assert {t.task_id: t.state for t in hub.tis(run_pk)} == {"backup": "queued", "report": "queued"}


def test_a_clock_behind_is_seen_even_after_the_device_merged_a_hub_stamp(make_hub: Any) -> None:
    hub = make_hub({"pinned.py": PINNED})
    hub.agent_online("a1")
    behind = HybridClock("a1", lambda: int((hub.clock.now() - 400) * 1000))
    behind.update(hub.ingester.hlc.now())  # it received an ack: its HLC wall is the hub's time now
    hub.agent_clocks["a1"] = behind
    hub.clock.advance(5)
    hub.send("a1", Heartbeat("0.1.0", clock=hub.clock.now() - 400))
    with hub.sessions() as session:
        a1 = session.get(Agent, "a1")
        assert (a1.clock_skew, a1.clock_skew_flagged_at is not None) == (-400.0, True)
    # An older agent's heartbeat (no clock field) looks fine by its HLC, which proves nothing: still flagged.
    hub.send("a1", Heartbeat("0.1.0"))
    with hub.sessions() as session:
        assert not fleet.clock_trusted(session, "a1")
    hub.send("a1", Heartbeat("0.1.0", clock=hub.clock.now() + 0.5))
    with hub.sessions() as session:
        assert fleet.clock_trusted(session, "a1") and session.get(Agent, "a1").clock_skew == 0.5
