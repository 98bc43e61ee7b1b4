"""Offline handling (hub.offline) and the conflict rule (hub.reconcile)
together, through the real hub: the device goes silent, the scheduler's
offline_grace step takes its work back on its own, and then the device
returns and reports what it did meanwhile. What an operator relies on:
the instance's state and output, what is cancelled where, and the conflict
records as ``GET /api/v1/conflicts`` shows them (docs/conflicts.md)."""

from __future__ import annotations

import json
from shared.frames import unsigned_part

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from hub.api.app import create_app
from hub.db import transaction
from hub.identity import register_agent
from hub.ingest import Ingester
from hub.models import Assignment, DagRun, Decision, TaskInstance
from shared.clock import utcnow
from shared.hlc import HybridClock
from shared.messages import Accepted, Cancel, Heartbeat, Result, Started
from shared.requestsig import HEADER, sign_request
from shared.signing import SigningKey
from tests.hub.conftest import HubHarness
from tests.hub.test_offline import assignment_of, publish, silent
from tests.hub.api_harness import admin_headers, hub_settings

pytestmark = pytest.mark.timeout(90)

#: Re-targetable: any agent, no retries (a re-target is not a retry), a
#: downstream task that uses the output.
ANYWHERE = """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("anywhere", default_args={"retries": 0}) as dag:
    work = AgentOperator(task_id="work", job_type="noop", target=any_agent(), offline_grace=600)
    work >> PythonOperator(task_id="after", python_callable=lambda ti: ti.xcom_pull("work"))
"""

#: Pinned, one retry: given up twice with device_offline, the run fails.
PINNED = """
from hub.dag import DAG, AgentOperator, PythonOperator, on_agent
with DAG("pinned", default_args={"retries": 1, "retry_delay": 0}) as dag:
    flash = AgentOperator(task_id="flash", job_type="noop", target=on_agent("a1"), offline_grace=600)
    flash >> PythonOperator(task_id="verify", python_callable=lambda ti: ti.xcom_pull("flash"))
"""


@pytest.fixture
def hub_db_url(tmp_path: Path) -> str:
    """SQLite here (the rule and the offline steps each run on PostgreSQL in
    their own tests); the seams between them are store-independent."""
    return f"sqlite:///{tmp_path / 'hub.db'}"


def api_conflicts(hub: HubHarness, **params: Any) -> dict[str, Any]:
    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock)
    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        response = client.get("/api/v1/conflicts", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def ti_of(hub: HubHarness, run_pk: int, task_id: str) -> TaskInstance:
    return next(t for t in hub.tis(run_pk) if t.task_id == task_id)


def cancels_to(hub: HubHarness, agent_id: str) -> list[str]:
    """Assignment ids of the Cancel messages written to ``agent_id``'s topic."""
    from hub.models import OutboxMessage
    from shared.envelope import decode

    with hub.sessions() as session:
        rows = session.scalars(select(OutboxMessage).where(OutboxMessage.topic == f"outpost/v1/agents/{agent_id}/assign").order_by(OutboxMessage.id))
        bodies = [decode(unsigned_part(r.payload)).body for r in rows]
    return [b.assignment_id for b in bodies if isinstance(b, Cancel)]


def retargeted(make_hub: Any) -> tuple[HubHarness, int, str, str]:
    """a1 holds ``work`` (accepted, started), goes silent; past its grace the
    hub re-targets it to a2. Returns (hub, run pk, a1's and a2's assignment)."""
    hub = make_hub({"anywhere.py": ANYWHERE}, agent_offline_after=35)
    hub.agent_online("a1")
    hub.agent_online("a2")
    run_pk = hub.trigger("anywhere")
    hub.tick()
    publish(hub)
    ti = ti_of(hub, run_pk, "work")
    assert (ti.agent_id, ti.try_number) == ("a1", 1)
    old = assignment_of(hub, ti).id
    hub.send("a1", Accepted(old))
    hub.send("a1", Started(old, hub.clock.now()))
    silent(hub, 40, "a2")
    assert ti_of(hub, run_pk, "work").state == "device_offline"
    silent(hub, 620, "a2")
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.agent_id, ti.try_number) == ("queued", "a2", 2)
    publish(hub)
    with hub.sessions() as session:
        [decision] = session.scalars(select(Decision)).all()
        assert (decision.source, decision.kind, decision.try_number, decision.agent_id) == ("hub", "offline_grace", 1, "a1")
    assert cancels_to(hub, "a1") == [old]
    return hub, run_pk, old, assignment_of(hub, ti).id


def come_back(hub: HubHarness, agent_id: str) -> None:
    hub.clock.advance(5)
    hub.agent_online(agent_id)
    hub.send(agent_id, Heartbeat("0.1.0", clock=hub.clock.now()))


@pytest.mark.parametrize("then_a2", [None, "success", "failed"])
def test_a_device_back_after_its_work_was_retargeted_wins_with_its_success(make_hub: Any, then_a2: str | None) -> None:
    """a1 reports success for the try the hub took back: the instance succeeds
    with a1's output, a2's try is cancelled, one device_success_wins record.
    Whatever a2 reports afterwards (a success it finished before the Cancel
    reached it, a failure, nothing) never replaces a1's output."""
    hub, run_pk, old, new = retargeted(make_hub)
    come_back(hub, "a1")
    assert cancels_to(hub, "a1") == [old, old]  # the Cancel is sent again: the broker may have lost it
    hub.send("a1", Result(old, 1, "success", output={"from": "a1"}))
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"from": "a1"})
    with hub.sessions() as session:
        assert session.get(Assignment, new).state == "cancelled"
    assert cancels_to(hub, "a2") == [new]
    page = api_conflicts(hub)
    assert page["total"] == 1 and page["counts"]["device_success_wins"] == 1
    [record] = page["items"]
    assert (record["rule"], record["agent_id"], record["task_id"], record["run_pk"]) == ("device_success_wins", "a1", "work", run_pk)
    assert record["kept"] == {**record["kept"], "type": "result", "status": "success", "output": {"from": "a1"}, "try_number": 1, "clock_trusted": True}
    assert record["overridden"] == {**record["overridden"], "type": "hub_decision", "kind": "offline_grace", "try_number": 1, "agent_id": "a1"}
    if then_a2 is not None:
        hub.clock.advance(1)
        hub.send("a2", Result(new, 2, then_a2, output={"from": "a2"} if then_a2 == "success" else None))
    hub.tick()
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"from": "a1"})
    assert ti_of(hub, run_pk, "after").state == "success"
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "success"
    page = api_conflicts(hub)
    rules = [c["rule"] for c in reversed(page["items"])]
    assert rules == (["device_success_wins", "duplicate_success"] if then_a2 == "success" else ["device_success_wins"])
    if then_a2 == "success":
        duplicate = page["items"][0]
        assert (duplicate["kept"]["output"], duplicate["overridden"]["output"], duplicate["agent_id"]) == ({"from": "a1"}, {"from": "a2"}, "a2")


def test_when_the_retry_elsewhere_succeeded_first_the_late_success_is_a_duplicate(make_hub: Any) -> None:
    """a2 finished the re-targeted try first: its output was applied (and may
    have fed downstream). a1's success for the try taken back is then a
    duplicate_success, kept in the record, its output discarded; no
    device_success_wins record (the give-up did not cost a success)."""
    hub, run_pk, old, new = retargeted(make_hub)
    hub.send("a2", Result(new, 2, "success", output={"from": "a2"}))
    hub.tick()
    assert ti_of(hub, run_pk, "after").state == "success"
    come_back(hub, "a1")
    hub.send("a1", Result(old, 1, "success", output={"from": "a1"}))
    hub.tick()
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"from": "a2"})
    page = api_conflicts(hub)
    [record] = page["items"]
    assert (record["rule"], record["agent_id"]) == ("duplicate_success", "a1")
    assert (record["kept"]["output"], record["kept"]["agent_id"], record["overridden"]["output"]) == ({"from": "a2"}, "a2", {"from": "a1"})
    # Delivered again (its ack was lost): still one record.
    hub.send("a1", Result(old, 1, "success", output={"from": "a1"}))
    assert api_conflicts(hub)["total"] == 1


def given_up_twice(make_hub: Any) -> tuple[HubHarness, int, list[str]]:
    """flash, pinned to a1 (one retry): a1 goes silent holding try 1; both
    tries are given up with device_offline; verify is upstream_failed, the
    run failed."""
    hub = make_hub({"pinned.py": PINNED}, agent_offline_after=35)
    hub.agent_online("a1")
    run_pk = hub.trigger("pinned")
    hub.tick()
    publish(hub)
    first = assignment_of(hub, ti_of(hub, run_pk, "flash")).id
    hub.send("a1", Accepted(first))
    hub.send("a1", Started(first, hub.clock.now()))
    silent(hub, 40)
    silent(hub, 620)
    ti = ti_of(hub, run_pk, "flash")
    assert (ti.state, ti.try_number, ti.agent_id) == ("device_offline", 2, "a1")  # the retry waits for its device
    publish(hub)
    second = assignment_of(hub, ti).id
    silent(hub, 620)
    ti = ti_of(hub, run_pk, "flash")
    assert (ti.state, ti.error["code"]) == ("failed", "device_offline")
    assert ti_of(hub, run_pk, "verify").state == "upstream_failed"
    with hub.sessions() as session:
        run = session.get(DagRun, run_pk)
        assert (run.state, run.clear_number) == ("failed", 0)
        assert [(d.kind, d.try_number) for d in session.scalars(select(Decision).order_by(Decision.id))] == [("offline_grace", 1), ("offline_grace", 2)]
    return hub, run_pk, [first, second]


@pytest.mark.parametrize("reported_try", [1, 2])
def test_a_pinned_task_given_up_for_good_re_opens_when_its_device_returns_with_success(make_hub: Any, reported_try: int) -> None:
    """docs/conflicts.md, R2 terminal: the success re-opens what the
    device_offline failure decided (verify runs, the run finishes again,
    clear_number one higher), one record against that try's give-up."""
    hub, run_pk, ids = given_up_twice(make_hub)
    come_back(hub, "a1")
    assert ti_of(hub, run_pk, "flash").state == "failed"  # nothing open on the device: returning alone changes nothing
    hub.send("a1", Result(ids[reported_try - 1], reported_try, "success", output={"flashed": reported_try}))
    ti = ti_of(hub, run_pk, "flash")
    assert (ti.state, ti.output, ti.error) == ("success", {"flashed": reported_try}, None)
    with hub.sessions() as session:
        run = session.get(DagRun, run_pk)
        assert (run.state, run.clear_number) == ("queued", 1)
    assert ti_of(hub, run_pk, "verify").state == "none"
    hub.tick()
    assert ti_of(hub, run_pk, "verify").state == "success"
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "success"
    [record] = api_conflicts(hub)["items"]
    assert (record["rule"], record["overridden"]["kind"], record["overridden"]["try_number"]) == ("device_success_wins", "offline_grace", reported_try)
    assert "Outcome: success." in record["resolution"]


# --- clock skew --------------------------------------------------------------------


def skewed_return(hub: HubHarness, agent_id: str, offset: float) -> None:
    """``agent_id`` comes back with its clock ``offset`` seconds off: its
    heartbeat (carrying the device clock) gets it flagged."""
    hub.clock.advance(5)
    skewed = HybridClock(agent_id, lambda: int((hub.clock.now() + offset) * 1000))
    if agent_id in hub.agent_clocks:
        skewed.update(hub.agent_clocks[agent_id].last)  # a device's stamps never go back (agent/identity.py keeps the floor)
    hub.agent_clocks[agent_id] = skewed
    hub.agent_online(agent_id)
    hub.send(agent_id, Heartbeat("0.1.0", clock=hub.clock.now() + offset))
    agents = {a["agent_id"]: a for a in _agents(hub)}
    assert agents[agent_id]["clock_trusted"] is False


def _agents(hub: HubHarness) -> list[dict[str, Any]]:
    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock)
    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        return client.get("/api/v1/agents").json()["items"]


@pytest.mark.parametrize("offset", [-86400.0, 86400.0])
def test_a_flagged_clock_neither_wins_nor_loses_by_its_stamps(make_hub: Any, offset: float) -> None:
    """a1 comes back a day behind (its stamps claim it finished long before
    a2) or a day ahead. a2's success was received first, so it is kept
    either way: the record says a1's clock is untrusted, and the outcome is
    the one an honest clock gets."""
    hub, run_pk, old, new = retargeted(make_hub)
    hub.send("a2", Result(new, 2, "success", output={"from": "a2"}))
    skewed_return(hub, "a1", offset)
    hub.send("a1", Result(old, 1, "success", output={"from": "a1"}, finished_at=hub.clock.now() + offset))
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"from": "a2"})
    [record] = api_conflicts(hub)["items"]
    assert (record["rule"], record["agent_id"]) == ("duplicate_success", "a1")
    assert record["overridden"]["clock_trusted"] is False and record["kept"]["clock_trusted"] is True
    assert record["resolution"].startswith("Device a1's success for try 1 came after device a2's success for try 2")


def test_a_flagged_clock_s_late_success_is_explained_without_its_stamps(make_hub: Any) -> None:
    """a1 comes back a day behind and reports first: its success wins by R2
    as any device's would; the record says its clock cannot tell when it
    finished, instead of claiming it finished before the hub gave up."""
    hub, run_pk, old, new = retargeted(make_hub)
    skewed_return(hub, "a1", -86400.0)
    hub.send("a1", Result(old, 1, "success", output={"from": "a1"}, finished_at=hub.clock.now() - 86400))
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"from": "a1"})
    [record] = api_conflicts(hub)["items"]
    assert record["rule"] == "device_success_wins" and record["kept"]["clock_trusted"] is False
    assert "finished at a time its untrusted clock cannot tell" in record["resolution"]
    assert "before the hub gave up" not in record["resolution"]


def test_a_clock_flagged_by_one_hub_process_is_untrusted_in_another(make_hub: Any) -> None:
    """A hub runs ingestion over MQTT and the HTTP sync route in separate
    processes (each with its own Ingester). The flag is in the database: a
    late result applied by the other process must not be explained with the
    flagged device's stamps."""
    hub, run_pk, old, new = retargeted(make_hub)
    other = Ingester(hub.sessions, hub.link, hub.clock, hub.ingester.hlc, hub.ingester.events, keyring=hub.keyring)  # type: ignore[arg-type]
    hub.clock.advance(1)
    hub.send("a2", Heartbeat("0.1.0", clock=hub.clock.now()))  # the other process has read the flags once, before a1's
    hub.ingester, first = other, hub.ingester
    hub.send("a2", Heartbeat("0.1.0", clock=hub.clock.now()))
    hub.ingester = first
    skewed_return(hub, "a1", -86400.0)
    hub.ingester = other
    hub.send("a1", Result(old, 1, "success", output={"from": "a1"}))
    [record] = api_conflicts(hub)["items"]
    assert record["rule"] == "device_success_wins"
    assert record["kept"]["clock_trusted"] is False and "untrusted clock" in record["resolution"]


DEADLINE = """
from datetime import timedelta
from hub.dag import DAG, AgentOperator, PythonOperator, on_agent
with DAG("deadline", default_args={"retries": 0}, dagrun_timeout=timedelta(seconds=120)) as dag:
    flash = AgentOperator(task_id="flash", job_type="noop", target=on_agent("a1"), offline_grace=600)
    flash >> PythonOperator(task_id="verify", python_callable=lambda ti: "ran")
"""


def test_a_run_deadline_passing_while_the_device_is_offline_then_its_success(make_hub: Any) -> None:
    """The run's dagrun_timeout passes while its device is offline (before
    offline_grace): the run fails, the try is given up as a deadline
    decision. The device returns with success: the instance succeeds, the
    run stays failed (docs/conflicts.md, R2's exception)."""
    hub = make_hub({"deadline.py": DEADLINE}, agent_offline_after=35)
    hub.agent_online("a1")
    run_pk = hub.trigger("deadline")
    hub.tick()
    publish(hub)
    aid = assignment_of(hub, ti_of(hub, run_pk, "flash")).id
    hub.send("a1", Accepted(aid))
    silent(hub, 40)
    assert ti_of(hub, run_pk, "flash").state == "device_offline"
    silent(hub, 100)
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "failed"
        assert [(d.source, d.kind, d.try_number) for d in session.scalars(select(Decision))] == [("hub", "deadline", 1)]
        assert session.get(Assignment, aid).state == "cancelled"
    assert ti_of(hub, run_pk, "flash").state not in ("device_offline", "running", "queued")
    come_back(hub, "a1")
    hub.send("a1", Result(aid, 1, "success", output={"flashed": True}))
    hub.tick()
    ti = ti_of(hub, run_pk, "flash")
    assert (ti.state, ti.output) == ("success", {"flashed": True})
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).state == "failed"
    [record] = api_conflicts(hub)["items"]
    assert (record["rule"], record["overridden"]["kind"]) == ("device_success_wins", "deadline")


def test_a_late_success_and_its_log_synced_over_http_settle_like_over_mqtt(make_hub: Any) -> None:
    """The returning device's backlog comes over HTTP bulk sync (the API's
    own ingester, as in a hub whose API runs apart from ingestion): the
    late success wins by R2 the same way, the re-targeted try is cancelled,
    and the taken-back try's log is stored and readable."""
    from shared.envelope import Envelope
    from shared.messages import LogChunk

    hub, run_pk, old, new = retargeted(make_hub)
    key = hub.agent_key("a1")
    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock)
    clock = hub.agent_clocks["a1"]
    envelopes = [hub.sign(Envelope(body, sender="a1", hlc=clock.now())).decode() for body in (
        LogChunk(old, 0, "flashing\ndone\n", final=True), Result(old, 1, "success", output={"from": "a1"}),
    )]
    batch = {"stream": "s1", "first_seq": "0001", "last_seq": "0002", "envelopes": envelopes}
    body = json.dumps(batch).encode()

    def auth() -> dict[str, str]:
        return {HEADER: sign_request(key, "a1", "POST", "/api/v1/agents/a1/sync", body, hub.clock.now())}

    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        answer = client.post("/api/v1/agents/a1/sync", content=body, headers=auth())
        assert answer.status_code == 200, answer.text
        assert (answer.json()["assignment_ids"], answer.json()["refused"]) == ([old], [])
        again = client.post("/api/v1/agents/a1/sync", content=body, headers=auth())  # its answer was lost
        assert again.status_code == 200 and again.json()["assignment_ids"] == [old]
        log = client.get(f"/api/v1/runs/{run_pk}/tasks/{ti_of(hub, run_pk, 'work').id}/tries/1/log").json()
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"from": "a1"})
    with hub.sessions() as session:
        assert session.get(Assignment, new).state == "cancelled"
    assert cancels_to(hub, "a2") == [new]
    [record] = api_conflicts(hub)["items"]
    assert (record["rule"], record["agent_id"], record["overridden"]["kind"]) == ("device_success_wins", "a1", "offline_grace")
    [entry] = log["logs"]
    assert (entry["agent_id"], entry["complete"], entry["text"]) == ("a1", True, "flashing\ndone\n")
