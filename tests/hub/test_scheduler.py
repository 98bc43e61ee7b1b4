"""The scheduler, driven with a manual clock: runs, dependencies, fan-out,
retries, redelivery, cron schedules, offline agents."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from hub.models import Agent, Assignment, DagRun
from shared.messages import Accepted, JobError, Result, Started

FLEET_DAG = """
from hub.dag import DAG, AgentOperator, PythonOperator, every_agent

def total(ti):
    return sum(o["echo"] for o in ti.xcom_pull("ping"))

with DAG("fleet", default_args={"retries": 1, "retry_delay": 30}) as dag:
    ping = AgentOperator(task_id="ping", job_type="noop", params={"echo": 2}, target=every_agent())
    ping >> PythonOperator(task_id="total", python_callable=total)
"""

ANY_DAG = """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("one", schedule="*/10 * * * *") as dag:
    AgentOperator(task_id="work", job_type="noop", target=any_agent(site="x"))
"""


def run_state(hub: Any, run_pk: int) -> str:
    with hub.sessions() as session:
        return session.get(DagRun, run_pk).state


def succeed_all(hub: Any, output: Any = None) -> None:
    for env in hub.assignments_sent():
        body = env.body
        agent_id = env.hlc and _agent_of(hub, body.assignment_id)
        hub.send(agent_id, Accepted(body.assignment_id))
        hub.send(agent_id, Started(body.assignment_id, hub.clock.now()))
        hub.send(agent_id, Result(body.assignment_id, body.try_number, "success", output if output is not None else body.params))


def _agent_of(hub: Any, assignment_id: str) -> str:
    with hub.sessions() as session:
        return session.get(Assignment, assignment_id).agent_id


def test_fleet_task_fans_out_one_instance_per_online_agent(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": FLEET_DAG})
    for agent in ("a1", "a2", "a3"):
        hub.agent_online(agent)
    hub.agent_online("old", job_types=("diagnostics.collect",))  # lacks the job type
    run_pk = hub.trigger("fleet")
    hub.tick()
    ping = [ti for ti in hub.tis(run_pk) if ti.task_id == "ping"]
    assert [(ti.map_index, ti.agent_id, ti.state, ti.try_number) for ti in ping] == [(0, "a1", "queued", 1), (1, "a2", "queued", 1), (2, "a3", "queued", 1)]
    sent = hub.assignments_sent()
    assert sorted(e.body.params["echo"] for e in sent) == [2, 2, 2]
    succeed_all(hub)
    hub.tick()
    assert run_state(hub, run_pk) == "success"
    total = [ti for ti in hub.tis(run_pk) if ti.task_id == "total"][0]
    assert total.output == 6


def test_downstream_waits_until_every_fanned_out_instance_is_done(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": FLEET_DAG})
    hub.agent_online("a1")
    hub.agent_online("a2")
    run_pk = hub.trigger("fleet")
    hub.tick()
    first = hub.assignments_sent()[0].body
    hub.send("a1", Result(first.assignment_id, 1, "success", {"echo": 2}))
    hub.tick()
    total = [ti for ti in hub.tis(run_pk) if ti.task_id == "total"][0]
    assert total.state == "none"
    assert run_state(hub, run_pk) == "running"


def test_retryable_failure_retries_on_the_same_device_after_the_delay(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": FLEET_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("fleet")
    hub.tick()
    first = hub.assignments_sent()[0].body
    hub.send("a1", Result(first.assignment_id, 1, "failed", error=JobError("disk_busy", "try later", retryable=True)))
    hub.tick()
    [ping] = [ti for ti in hub.tis(run_pk) if ti.task_id == "ping"]
    assert ping.state == "up_for_retry"
    hub.clock.advance(29)
    hub.tick()
    assert len(hub.assignments_sent()) == 1
    hub.clock.advance(2)
    hub.tick()
    second = hub.assignments_sent()[1].body
    assert second.try_number == 2 and second.assignment_id != first.assignment_id
    assert _agent_of(hub, second.assignment_id) == "a1"


def test_non_retryable_failure_fails_the_run_and_marks_downstream_upstream_failed(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": FLEET_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("fleet")
    hub.tick()
    first = hub.assignments_sent()[0].body
    hub.send("a1", Result(first.assignment_id, 1, "failed", error=JobError("unknown_job_type", "not installed", retryable=False)))
    hub.tick()
    states = {ti.task_id: ti.state for ti in hub.tis(run_pk)}
    assert states == {"ping": "failed", "total": "upstream_failed"}
    assert run_state(hub, run_pk) == "failed"


def test_fan_out_with_no_matching_agent_skips_and_propagates(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": FLEET_DAG})
    run_pk = hub.trigger("fleet")
    hub.tick()
    assert {ti.task_id: ti.state for ti in hub.tis(run_pk)} == {"ping": "skipped", "total": "skipped"}
    assert run_state(hub, run_pk) == "success"


def test_unaccepted_assignment_is_redelivered_with_the_same_id_and_body(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": FLEET_DAG}, redeliver_after=30)
    hub.agent_online("a1")
    hub.trigger("fleet")
    hub.tick()
    _mark_published(hub)
    hub.clock.advance(31)
    hub.tick()
    first, again = hub.assignments_sent()
    assert again.body == first.body and again.id != first.id
    hub.send("a1", Accepted(first.body.assignment_id))
    _mark_published(hub)
    hub.clock.advance(31)
    hub.tick()
    assert len(hub.assignments_sent()) == 2  # accepted: no more copies


def _mark_published(hub: Any) -> None:
    from hub.outbox import OutboxPublisher

    hub.publisher().flush()


def test_any_target_waits_for_a_matching_agent(make_hub: Any) -> None:
    hub = make_hub({"one.py": ANY_DAG})
    hub.agent_online("a1", site="y")
    run_pk = hub.trigger("one")
    hub.tick()
    assert hub.tis(run_pk)[0].state == "scheduled"
    hub.agent_online("a2", site="x")
    hub.tick()
    ti = hub.tis(run_pk)[0]
    assert (ti.state, ti.agent_id) == ("queued", "a2")


def test_cron_schedule_creates_one_run_when_due(make_hub: Any) -> None:
    hub = make_hub({"one.py": ANY_DAG})  # every 10 minutes; clock starts at 00:00
    hub.tick()
    with hub.sessions() as session:
        assert session.scalars(select(DagRun)).all() == []
    hub.clock.advance(10 * 60)
    hub.tick()
    with hub.sessions() as session:
        runs = session.scalars(select(DagRun)).all()
    # The run for [00:00, 00:10) is created at 00:10; its logical date is the interval's start.
    assert [(r.run_type, r.logical_date.minute, r.data_interval_end.minute) for r in runs] == [("scheduled", 0, 10)]
    hub.clock.advance(35 * 60)  # missed intervals collapse into the latest one without catchup
    hub.tick()
    with hub.sessions() as session:
        assert len(session.scalars(select(DagRun)).all()) == 2


def test_silent_agent_is_marked_offline(make_hub: Any) -> None:
    hub = make_hub({"one.py": ANY_DAG}, agent_offline_after=35)
    hub.agent_online("a1", site="x")
    hub.clock.advance(36)
    hub.tick()
    with hub.sessions() as session:
        assert session.get(Agent, "a1").state == "offline"


SPREAD_DAG = """
from hub.dag import DAG, AgentOperator, any_agent
with DAG("spread") as dag:
    for i in range(9):
        AgentOperator(task_id=f"t{i}", job_type="noop", target=any_agent())
"""


def test_many_ready_tasks_are_spread_over_the_agents_in_one_tick(make_hub: Any) -> None:
    hub = make_hub({"spread.py": SPREAD_DAG})
    for agent in ("a1", "a2", "a3"):
        hub.agent_online(agent)
    run_pk = hub.trigger("spread")
    hub.tick()
    per_agent: dict[str, int] = {}
    for ti in hub.tis(run_pk):
        per_agent[ti.agent_id] = per_agent.get(ti.agent_id, 0) + 1
    assert per_agent == {"a1": 3, "a2": 3, "a3": 3}


HOSTILE_HUB_TASKS = """
import sys
from hub.dag import DAG, PythonOperator

def leave():
    sys.exit(1)

def nested():
    out = []
    for _ in range(100_000):
        out = [out]
    return out

with DAG("hostile") as dag:
    PythonOperator(task_id="exits", python_callable=leave)
    PythonOperator(task_id="nests", python_callable=nested)
"""


def test_a_hub_task_that_exits_or_returns_unserialisable_output_fails_cleanly(make_hub: Any) -> None:
    hub = make_hub({"hostile.py": HOSTILE_HUB_TASKS})
    run_pk = hub.trigger("hostile")
    hub.tick()
    states = {ti.task_id: (ti.state, ti.error["code"]) for ti in hub.tis(run_pk)}
    assert states == {"exits": ("failed", "exception"), "nests": ("failed", "output_not_json")}
    assert run_state(hub, run_pk) == "failed"


def test_redelivery_backs_off_and_skips_offline_agents(make_hub: Any) -> None:
    # A grace longer than the offline spell below: this is about redelivery, not giving up.
    hub = make_hub({"fleet.py": FLEET_DAG}, redeliver_after=30, agent_offline_after=1000, default_offline_grace=100_000)
    hub.agent_online("a1")
    hub.trigger("fleet")
    hub.tick()
    _mark_published(hub)
    sends = []
    for _ in range(8):  # ticks every 31 s; copies at 31 s, then 60 s later (93 s), then 120 s later (217 s)
        hub.clock.advance(31)
        hub.tick()
        _mark_published(hub)
        sends.append(len(hub.assignments_sent()))
    assert sends == [2, 2, 3, 3, 3, 3, 4, 4]
    from shared.messages import Status

    hub.send("a1", Status("offline"), topic="outpost/v1/agents/a1/status")
    hub.clock.advance(10_000)
    hub.tick()
    assert len(hub.assignments_sent()) == 4  # the broker's session holds a copy for it
