"""Event-driven scheduling: task outlets and posted events update assets,
and DAGs scheduled on assets run when their condition holds (Airflow's
semantics: every asset of a list updated since the DAG's last
asset-triggered run; ``|`` for any of them)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select

from hub.api.app import create_app
from hub.asset_events import triggering_asset_events
from hub.events import EventBus
from hub.models import AssetDagRunQueue, AssetEvent, DagRun
from shared.messages import Accepted, Result, Started
from tests.hub.api_harness import admin_headers, hub_settings

DAGS = """
from hub.sdk import DAG, AgentOperator, Asset, Dataset, PythonOperator

def produce():
    return "ok"

with DAG("make_a") as make_a:
    PythonOperator(task_id="write", python_callable=produce, outlets=[Asset("s3://lake/a")])

with DAG("make_b") as make_b:
    PythonOperator(task_id="write", python_callable=produce, outlets=[Dataset("s3://lake/b")])

with DAG("fail_a") as fail_a:
    PythonOperator(task_id="write", python_callable=lambda: 1 / 0, outlets=[Asset("s3://lake/a")])

with DAG("device_a") as device_a:
    AgentOperator(task_id="upload", job_type="noop", outlets=[Asset("s3://lake/a")])

with DAG("needs_both", schedule=[Asset("s3://lake/a"), Asset("s3://lake/b")]) as needs_both:
    PythonOperator(task_id="use", python_callable=produce)

with DAG("needs_either", schedule=Asset("s3://lake/a") | Asset("s3://lake/b")) as needs_either:
    PythonOperator(task_id="use", python_callable=produce)
"""


def asset_runs(hub: Any, dag_id: str) -> list[DagRun]:
    with hub.sessions() as session:
        return list(session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_type == "asset_triggered").order_by(DagRun.id)))


def events(hub: Any) -> list[tuple[str, str | None, str | None]]:
    with hub.sessions() as session:
        return [(e.source_dag_id, e.source_task_id, e.source_agent_id) for e in session.scalars(select(AssetEvent).order_by(AssetEvent.id))]


def test_a_list_schedule_runs_once_every_asset_was_updated_and_an_or_on_either(make_hub: Any) -> None:
    hub = make_hub({"assets.py": DAGS})
    hub.trigger("make_a")
    hub.tick()
    assert events(hub) == [("make_a", "write", None)]
    assert asset_runs(hub, "needs_both") == []  # b not updated yet
    assert len(asset_runs(hub, "needs_either")) == 1
    with hub.sessions() as session:
        assert [q.target_dag_id for q in session.scalars(select(AssetDagRunQueue))] == ["needs_both"]
    hub.clock.advance(60)
    hub.trigger("make_b")
    hub.tick()
    both = asset_runs(hub, "needs_both")
    assert len(both) == 1 and len(asset_runs(hub, "needs_either")) == 2
    with hub.sessions() as session:
        run = session.get(DagRun, both[0].id)
        consumed = triggering_asset_events(session, run)
        assert sorted(consumed) == ["s3://lake/a", "s3://lake/b"]
        assert [e["source_dag_id"] for e in consumed["s3://lake/a"]] == ["make_a"]
        assert (run.data_interval_start, run.data_interval_end) == (consumed["s3://lake/a"][0]["timestamp"], consumed["s3://lake/b"][0]["timestamp"])
        assert session.scalars(select(AssetDagRunQueue)).all() == []
    assert {r.state for r in both} == {"success"}
    # A second update of a alone does not run needs_both again.
    hub.clock.advance(60)
    hub.trigger("make_a")
    hub.tick()
    assert len(asset_runs(hub, "needs_both")) == 1 and len(asset_runs(hub, "needs_either")) == 3


def test_a_failed_task_updates_nothing(make_hub: Any) -> None:
    hub = make_hub({"assets.py": DAGS})
    hub.trigger("fail_a")
    hub.tick()
    assert events(hub) == [] and asset_runs(hub, "needs_either") == []


def test_an_agent_task_outlet_records_the_device(make_hub: Any) -> None:
    hub = make_hub({"assets.py": DAGS})
    hub.agent_online("pump-7", job_types=("noop",))
    hub.trigger("device_a")
    hub.tick()
    assign = hub.assignments_sent()[-1].body
    hub.send("pump-7", Accepted(assign.assignment_id))
    hub.send("pump-7", Started(assign.assignment_id, hub.clock.now()))
    hub.send("pump-7", Result(assign.assignment_id, assign.try_number, "success", {}))
    hub.tick()
    assert events(hub) == [("device_a", "upload", "pump-7")]
    assert len(asset_runs(hub, "needs_either")) == 1


def test_the_api_lists_assets_and_takes_events_from_external_producers(make_hub: Any) -> None:
    hub = make_hub({"assets.py": DAGS})
    app = create_app(hub_settings(), hub.sessions, EventBus(), hub.clock)
    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        answer = client.post("/api/v1/assets/events", json={"uri": "s3://lake/b", "extra": {"rows": 12}})
        assert answer.status_code == 201, answer.text
        assert answer.json()["uri"] == "s3://lake/b" and answer.json()["extra"] == {"rows": 12} and answer.json()["source_dag_id"] is None
        for bad in ({"uri": "has space"}, {"uri": "airflow://x"}, {"uri": "s3://x", "extra": {"blob": "x" * 20000}}, {"uri": 5}):
            answer = client.post("/api/v1/assets/events", json=bad)
            assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request", bad
        hub.tick()
        assets = client.get("/api/v1/assets").json()["items"]
        assert [(a["uri"], a["event_count"], a["consuming_dags"], a["queued_for"]) for a in assets] == [("s3://lake/b", 1, ["needs_both", "needs_either"], ["needs_both"])]
        listed = client.get("/api/v1/assets/events", params={"uri": "s3://lake/b"}).json()
        assert listed["total"] == 1 and listed["items"][0]["extra"] == {"rows": 12}
    assert len(asset_runs(hub, "needs_either")) == 1 and asset_runs(hub, "needs_both") == []


# --- agent events ------------------------------------------------------------------

DEVICE_DAGS = """
from hub.sdk import DAG, AgentEvent, PythonOperator

def react(triggering_asset_events):
    return [(e["source_agent_id"], e["extra"]) for e in triggering_asset_events["agent-event://battery_low"]]

with DAG("on_battery_low", schedule=[AgentEvent("battery_low")]) as on_battery_low:
    PythonOperator(task_id="react", python_callable=react)
"""


def test_an_agent_event_is_an_asset_event_that_triggers_the_dags_scheduled_on_it(make_hub: Any) -> None:
    from hub.models import RejectedMessage
    from shared.messages import AgentEvent as AgentEventBody

    hub = make_hub({"device.py": DEVICE_DAGS})
    hub.agent_online("pump-7")
    hub.send("pump-7", AgentEventBody("ev-1", "battery_low", {"level": 0.08}, hub.clock.now()))
    hub.send("pump-7", AgentEventBody("ev-1", "battery_low", {"level": 0.08}, hub.clock.now()))  # redelivered: applied once
    hub.tick()
    with hub.sessions() as session:
        recorded = session.scalars(select(AssetEvent)).all()
        assert [(e.source_agent_id, e.source_event_id, e.extra) for e in recorded] == [("pump-7", "pump-7/ev-1", {"level": 0.08})]
        runs = asset_runs(hub, "on_battery_low")
        assert len(runs) == 1 and runs[0].triggered_by == {"asset_event_ids": [recorded[0].id]} and runs[0].state == "success"
        assert list(triggering_asset_events(session, runs[0])) == ["agent-event://battery_low"]
        # The task receives them too, as Airflow's triggering_asset_events.
        assert [ti.output for ti in hub.tis(runs[0].id)] == [[["pump-7", {"level": 0.08}]]]
    assert [a.body.event_ids for a in hub.acks()] == [("ev-1",), ("ev-1",)]
    # Bad events are refused with a record, and acknowledged so they do not block the device's outbox.
    hub.send("pump-7", AgentEventBody("ev-2", "battery low!", {}))
    hub.send("pump-7", AgentEventBody("ev-3", "battery_low", {"blob": "x" * 20_000}))
    hub.send("pump-7", AgentEventBody("", "battery_low", {}))
    with hub.sessions() as session:
        codes = [(r.code, r.agent_id) for r in session.scalars(select(RejectedMessage).order_by(RejectedMessage.id))]
        assert codes == [("bad_event_name", "pump-7"), ("event_too_large", "pump-7"), ("bad_event_id", "pump-7")]
        assert len(session.scalars(select(AssetEvent)).all()) == 1
    assert [a.body.event_ids for a in hub.acks()][2:] == [("ev-2",), ("ev-3",), ("",)]
    hub.tick()
    assert len(asset_runs(hub, "on_battery_low")) == 1


def test_a_bad_outlet_uri_is_a_dag_error_naming_the_task() -> None:
    import pytest

    from hub.dag import DAG, PythonOperator
    from hub.errors import InvalidDag

    with pytest.raises(InvalidDag, match="task 'write': outlets: asset URI 'airflow://x'"):
        with DAG("bad_outlet"):
            PythonOperator(task_id="write", python_callable=lambda: 1, outlets=["airflow://x"])
