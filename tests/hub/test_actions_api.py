"""Operator actions over REST and through ``outpost``: clear, rerun, mark,
pools, deadline misses, with their errors."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from hub.db import transaction
from hub.models import DagRun, DeadlineMiss
from shared.clock import to_datetime
from tests.hub.api_harness import START, Hub, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_ctl import Cli

pytestmark = pytest.mark.timeout(60)


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_clear_a_failed_task_of_a_paused_dag(hub: Hub) -> None:
    ids = hub.seeded
    assert ids is not None
    with hub.client() as client:
        answer = client.post(f"/api/v1/runs/{ids.run_failed}/clear", json={"task_ids": ["reboot"], "only_failed": True})
        assert answer.status_code == 200, answer.text
        body = answer.json()
    assert [(a["task_id"], a["state"], a["try_number"]) for a in body["affected"]] == [("reboot", "failed", 1)]
    # reboot_one is paused: the cleared run waits, queued, until it is unpaused (Airflow).
    assert body["run"]["state"] == "queued"
    [ti] = body["run"]["task_instances"]
    assert (ti["state"], ti["try_number"], ti["max_tries"], ti["error"], ti["ended_at"]) == ("none", 1, 2, None, None)
    with hub.sessions() as session:
        assert session.get(DagRun, ids.run_failed).clear_number == 1
    with hub.client() as client:
        client.patch("/api/v1/dags/reboot_one", json={"is_paused": False})
        again = client.post(f"/api/v1/runs/{ids.run_failed}/clear", json={"task_ids": ["reboot"], "dry_run": True}).json()
    assert again["run"]["state"] == "queued" and len(again["affected"]) == 1  # a dry run changes nothing


def test_rerun_clears_every_instance_and_restarts_the_run(hub: Hub) -> None:
    ids = hub.seeded
    assert ids is not None
    woken = hub.recorded("run_triggered")
    with hub.client() as client:
        body = client.post(f"/api/v1/runs/{ids.run_success}/rerun").json()
    assert len(body["affected"]) == 4 and body["run"]["state"] == "running" and body["run"]["ended_at"] is None
    assert {t["state"] for t in body["run"]["task_instances"]} == {"none"}
    assert woken == [{"dag_id": "fleet_health", "run_pk": ids.run_success}]


def test_mark_one_fan_out_instance_failed(hub: Hub) -> None:
    ids = hub.seeded
    assert ids is not None
    with hub.client() as client:
        body = client.post(f"/api/v1/runs/{ids.run_running}/mark", json={"task_ids": ["collect"], "state": "failed", "map_indexes": [1]}).json()
    assert [(a["task_id"], a["map_index"], a["state"]) for a in body["affected"]] == [("collect", 1, "running")]
    collect = {t["map_index"]: t["state"] for t in body["run"]["task_instances"] if t["task_id"] == "collect"}
    assert collect == {0: "success", 1: "failed"}
    assert body["run"]["state"] == "running"  # the scheduler carries on from here


@pytest.mark.parametrize(
    ("path", "body", "status", "code", "message"),
    [
        ("/api/v1/runs/999/clear", {}, 404, "run_not_found", "run 999 not found"),
        ("/api/v1/runs/{failed}/clear", {"task_ids": ["nope"]}, 422, "invalid_request", "has no task 'nope'; its tasks: reboot"),
        ("/api/v1/runs/{failed}/clear", {"task_ids": "reboot"}, 422, "invalid_request", "task_ids: Input should be a valid list"),
        ("/api/v1/runs/{failed}/clear", {"downstream": True}, 422, "invalid_request", "downstream: Extra inputs are not permitted"),
        ("/api/v1/runs/{failed}/mark", {"task_ids": ["reboot"], "state": "running"}, 422, "invalid_request", "state: Input should be 'success', 'failed' or 'skipped'"),
        ("/api/v1/runs/{failed}/mark", {"task_ids": [], "state": "success"}, 422, "invalid_request", "task_ids: List should have at least 1 item"),
        ("/api/v1/runs/{failed}/rerun", {"only_failed": "yes"}, 422, "invalid_request", "only_failed: Input should be a valid boolean"),
    ],
)
def test_action_errors_name_the_problem(hub: Hub, path: str, body: dict[str, Any], status: int, code: str, message: str) -> None:
    assert hub.seeded is not None
    with hub.client() as client:
        error = error_of(client.post(path.format(failed=hub.seeded.run_failed), json=body), status)
    assert error["code"] == code and message in error["message"], error


def test_pools_crud(hub: Hub) -> None:
    with hub.client() as client:
        pools = client.get("/api/v1/pools").json()
        # The seeded running fan-out instance holds one slot of default_pool.
        assert pools["items"] == [{"name": "default_pool", "slots": 128, "description": "The pool of every task that names none.",
                                   "queued_slots": 0, "running_slots": 1, "scheduled_slots": 0, "open_slots": 127}]
        created = client.post("/api/v1/pools", json={"name": "uplink", "slots": 2, "description": "cellular"})
        assert created.status_code == 201 and created.json()["open_slots"] == 2
        assert error_of(client.post("/api/v1/pools", json={"name": "uplink", "slots": 2}), 409)["code"] == "conflict"
        assert error_of(client.post("/api/v1/pools", json={"name": "no spaces", "slots": 2}), 422)["message"].startswith("invalid pool name")
        assert error_of(client.post("/api/v1/pools", json={"name": "x", "slots": -5}), 422)["code"] == "invalid_request"
        assert client.patch("/api/v1/pools/uplink", json={"slots": -1}).json()["open_slots"] is None
        assert client.patch("/api/v1/pools/uplink", json={"description": "lte"}).json()["slots"] == -1
        assert client.patch("/api/v1/pools/default_pool", json={"slots": 4}).json()["open_slots"] == 3
        assert error_of(client.patch("/api/v1/pools/nope", json={"slots": 1}), 404)["code"] == "pool_not_found"
        assert [p["name"] for p in client.get("/api/v1/pools").json()["items"]] == ["default_pool", "uplink"]
        assert client.delete("/api/v1/pools/uplink").status_code == 204
        assert error_of(client.get("/api/v1/pools/uplink"), 404)["code"] == "pool_not_found"
        assert "cannot be deleted" in error_of(client.delete("/api/v1/pools/default_pool"), 422)["message"]


def test_deadline_misses_list_and_filters(hub: Hub) -> None:
    ids = hub.seeded
    assert ids is not None
    t0 = to_datetime(START)
    with transaction(hub.sessions) as session:
        session.add(DeadlineMiss(run_pk=ids.run_running, dag_id="fleet_health", run_id="r", task_id="summarise", kind="task_sla",
                                 deadline=t0, detected_at=t0 + timedelta(seconds=1), description="late", notified_at=t0))
        session.add(DeadlineMiss(run_pk=ids.run_failed, dag_id="reboot_one", run_id="r2", task_id="", kind="dagrun_timeout",
                                 deadline=t0, detected_at=t0, description="timed out"))
    with hub.client() as client:
        page = client.get("/api/v1/deadline-misses").json()
        assert [(m["dag_id"], m["task_id"], m["kind"]) for m in page["items"]] == [("reboot_one", None, "dagrun_timeout"), ("fleet_health", "summarise", "task_sla")]
        assert [m["run_pk"] for m in client.get("/api/v1/deadline-misses", params={"kind": "task_sla"}).json()["items"]] == [ids.run_running]
        assert client.get("/api/v1/deadline-misses", params={"dag_id": "reboot_one"}).json()["total"] == 1
        assert client.get("/api/v1/deadline-misses", params={"run_pk": ids.run_running}).json()["total"] == 1
        assert "kind must be one of" in error_of(client.get("/api/v1/deadline-misses", params={"kind": "late"}), 422)["message"]


# --- the CLI ----------------------------------------------------------------------


@pytest.fixture
def cli(live_hub: tuple[Hub, str], capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(live_hub[1], capsys)


def test_cli_clear_mark_rerun(cli: Cli, live_hub: tuple[Hub, str]) -> None:
    ids = live_hub[0].seeded
    assert ids is not None
    code, out, err = cli("runs", "clear", str(ids.run_failed), "--task", "reboot", "--dry-run")
    assert code == 0, err
    assert out.splitlines()[0] == f"run {ids.run_failed} (reboot_one): would clear 1 task instance(s); run is failed"
    code, out, _ = cli("runs", "clear", str(ids.run_failed), "--task", "reboot")
    assert out.splitlines()[0] == f"run {ids.run_failed} (reboot_one): cleared 1 task instance(s); run is queued"
    assert "reboot   -          failed  1" in out
    marked = cli.json("runs", "mark", str(ids.run_running), "--task", "summarise", "--state", "skipped")
    assert [(a["task_id"], a["state"]) for a in marked["affected"]] == [("summarise", "none")]
    code, out, _ = cli("runs", "rerun", str(ids.run_success), "--only-failed")
    assert (code, out) == (0, f"run {ids.run_success} (fleet_health): cleared 0 task instance(s); run is success\n")
    code, _, err = cli("runs", "clear", "999")
    assert (code, err) == (3, "outpost: error: run_not_found: run 999 not found; list runs with GET /api/v1/runs\n")
    code, _, err = cli("runs", "mark", str(ids.run_running), "--task", "nope", "--state", "success")
    assert code == 4 and "has no task 'nope'" in err


def test_cli_pools_and_deadline_misses(cli: Cli) -> None:
    code, out, err = cli("pools", "set", "uplink", "3", "--description", "cellular")
    assert code == 0, err
    assert "name:" in out and "uplink" in out
    assert cli("pools", "set", "uplink", "5")[0] == 0
    code, out, _ = cli("pools", "list")
    assert out.splitlines()[0].split() == ["NAME", "SLOTS", "RUNNING", "QUEUED", "WAITING", "OPEN", "DESCRIPTION"]
    assert out.splitlines()[2].split() == ["uplink", "5", "0", "0", "0", "5", "cellular"]
    assert cli.json("pools", "show", "uplink")["slots"] == 5
    assert cli("pools", "delete", "uplink") == (0, "pool uplink deleted\n", "")
    code, _, err = cli("pools", "delete", "default_pool")
    assert code == 4 and "default_pool cannot be deleted" in err
    code, _, err = cli("pools", "show", "uplink")
    assert code == 3 and "pool_not_found" in err
    assert cli("deadline-misses", "list") == (0, "", "no deadline misses\n")
    assert cli.json("deadline-misses", "list", "--kind", "task_sla")["items"] == []


def test_mark_a_whole_run(hub: Hub) -> None:
    ids = hub.seeded
    assert ids is not None
    finished = hub.recorded("run_finished")
    with hub.client() as client:
        body = client.patch(f"/api/v1/runs/{ids.run_running}", json={"state": "failed"}).json()
        assert error_of(client.patch(f"/api/v1/runs/{ids.run_running}", json={"state": "skipped"}), 422)["code"] == "invalid_request"
        assert error_of(client.patch("/api/v1/runs/999", json={"state": "success"}), 404)["code"] == "run_not_found"
    # The running fan-out instance fails, the task not started yet is skipped.
    assert sorted((a["task_id"], a["state"]) for a in body["affected"]) == [("collect", "running"), ("summarise", "none")]
    assert body["run"]["state"] == "failed" and body["run"]["ended_at"] is not None
    assert sorted((t["task_id"], t["map_index"], t["state"]) for t in body["run"]["task_instances"]) == [
        ("collect", 0, "success"), ("collect", 1, "failed"), ("summarise", -1, "skipped")]
    assert finished == [{"dag_id": "fleet_health", "run_pk": ids.run_running, "state": "failed"}]


def test_cli_marks_a_whole_run(cli: Cli, live_hub: tuple[Hub, str]) -> None:
    ids = live_hub[0].seeded
    assert ids is not None
    code, out, err = cli("runs", "mark", str(ids.run_running), "--state", "success")
    assert (code, out.splitlines()[0]) == (0, f"run {ids.run_running} (fleet_health): marked success 2 task instance(s); run is success"), err
    code, _, err = cli("runs", "mark", str(ids.run_running), "--state", "skipped")
    assert code == 2 and "only --state success or failed" in err
