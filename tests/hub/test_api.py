"""REST API v1: every route over a real migrated database.

The read tests run twice, on a SQLite file and on a throwaway PostgreSQL
database (``-m postgres`` selects the second); writes run on SQLite.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import sessionmaker

from tests.hub.api_harness import Hub, Seeded, hub, hub_settings, live_hub, open_hub, pg_url, seed, seeded_sqlite_template  # noqa: F401  (fixtures)
from hub import events as ev
from hub import queries
from hub.api.app import create_app
from hub.models import DagRun, TaskInstance
from shared.clock import ManualClock

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def read_hub(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Seeded]]:
    """One seeded hub per backend, shared by the read-only tests."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'hub.db'}"
    else:
        url = request.getfixturevalue("pg_url")
    h = open_hub(url)
    ids = seed(h)
    with h.client() as client:
        yield client, ids
    h.engine.dispose()


def error_of(response: httpx.Response, status: int) -> dict[str, str]:
    """The error body, after checking the status and the one error shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# --- reads (SQLite and PostgreSQL) --------------------------------------------


def test_dag_list_shows_state_task_count_last_and_next_run(read_hub: tuple[TestClient, Seeded]) -> None:
    client, ids = read_hub
    page = client.get("/api/v1/dags").json()
    assert page["total"] == 3 and page["limit"] == 100 and page["offset"] == 0
    dags = {d["dag_id"]: d for d in page["items"]}
    assert list(dags) == ["fleet_health", "gone_dag", "reboot_one"]
    fleet = dags["fleet_health"]
    assert fleet["is_paused"] is False and fleet["is_active"] is True and fleet["task_count"] == 2
    assert fleet["last_run"] == {"id": ids.run_running, "run_id": "manual__2025-12-31T23:55:00+00:00", "state": "running", "logical_date": "2025-12-31T23:55:00Z"}
    assert fleet["next_run_at"] == "2026-01-01T01:00:00Z"
    assert dags["reboot_one"]["is_paused"] is True and dags["reboot_one"]["last_run"]["state"] == "failed"
    assert dags["gone_dag"]["is_active"] is False and dags["gone_dag"]["last_run"] is None
    assert "structure" not in fleet


def test_dag_list_filters_on_paused_and_active(read_hub: tuple[TestClient, Seeded]) -> None:
    client, _ = read_hub
    assert [d["dag_id"] for d in client.get("/api/v1/dags", params={"is_paused": "true"}).json()["items"]] == ["reboot_one"]
    assert [d["dag_id"] for d in client.get("/api/v1/dags", params={"is_active": "false"}).json()["items"]] == ["gone_dag"]


def test_dag_detail_has_the_structure_with_dependencies(read_hub: tuple[TestClient, Seeded]) -> None:
    client, _ = read_hub
    dag = client.get("/api/v1/dags/fleet_health").json()
    tasks = {t["task_id"]: t for t in dag["structure"]["tasks"]}
    assert tasks["summarise"]["upstream"] == ["collect"]
    assert tasks["collect"]["job_type"] == "diagnostics.collect"
    assert tasks["collect"]["target"] == {"mode": "all", "agent_id": None, "labels": {"site": "berlin"}}
    assert dag["fileloc"] == "/dags/fleet_health.py" and dag["schedule"] == "@hourly"


def test_runs_of_a_dag_newest_first(read_hub: tuple[TestClient, Seeded]) -> None:
    client, ids = read_hub
    page = client.get("/api/v1/dags/fleet_health/runs").json()
    assert [r["id"] for r in page["items"]] == [ids.run_running, ids.run_success]
    assert page["items"][0]["conf"] == {"reason": "audit"}
    assert page["items"][0]["task_counts"] == {"none": 1, "running": 1, "success": 1}
    assert [r["id"] for r in client.get("/api/v1/dags/fleet_health/runs", params={"state": "success"}).json()["items"]] == [ids.run_success]


def test_import_errors_name_the_file_and_reason(read_hub: tuple[TestClient, Seeded]) -> None:
    client, _ = read_hub
    page = client.get("/api/v1/import-errors").json()
    assert page["total"] == 1
    (error,) = page["items"]
    assert error["fileloc"] == "/dags/broken.py" and error["kind"] == "syntax"
    assert error["error"].startswith("SyntaxError") and error["recorded_at"] == "2026-01-01T00:00:00Z"


def test_run_list_filters_on_dag_and_state(read_hub: tuple[TestClient, Seeded]) -> None:
    client, ids = read_hub
    assert [r["id"] for r in client.get("/api/v1/runs").json()["items"]] == [ids.run_failed, ids.run_running, ids.run_success]
    assert [r["id"] for r in client.get("/api/v1/runs", params={"dag_id": "reboot_one"}).json()["items"]] == [ids.run_failed]
    assert [r["id"] for r in client.get("/api/v1/runs", params={"state": "running"}).json()["items"]] == [ids.run_running]
    assert client.get("/api/v1/runs", params={"dag_id": "fleet_health", "state": "failed"}).json() == {"items": [], "total": 0, "limit": 100, "offset": 0}


def test_run_detail_lists_task_instances_with_fan_out_agents(read_hub: tuple[TestClient, Seeded]) -> None:
    client, ids = read_hub
    run = client.get(f"/api/v1/runs/{ids.run_success}").json()
    assert run["dag_id"] == "fleet_health" and run["state"] == "success" and run["run_type"] == "scheduled"
    tis = run["task_instances"]
    assert [(t["task_id"], t["map_index"], t["agent_id"]) for t in tis] == [
        ("collect", 0, "edge-1"), ("collect", 1, "edge-2"), ("collect", 2, "edge-3"), ("summarise", -1, None),
    ]
    first = tis[0]
    assert first["state"] == "success" and first["try_number"] == 1 and first["kind"] == "agent" and first["job_type"] == "diagnostics.collect"
    assert first["output"] == {"disk": {"free_bytes": 1000}} and first["error"] is None
    assert first["started_at"] == "2025-12-31T22:00:00Z" and first["ended_at"] == "2025-12-31T22:00:03Z"
    failed = client.get(f"/api/v1/runs/{ids.run_failed}").json()["task_instances"][0]
    assert failed["error"] == {"code": "exit_status", "message": "exit status 1"}


def test_run_tasks_are_paginated(read_hub: tuple[TestClient, Seeded]) -> None:
    client, ids = read_hub
    page = client.get(f"/api/v1/runs/{ids.run_success}/tasks", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and page["limit"] == 2 and page["offset"] == 1
    assert [(t["task_id"], t["map_index"]) for t in page["items"]] == [("collect", 1), ("collect", 2)]


def test_agents_filter_on_state_and_labels(read_hub: tuple[TestClient, Seeded]) -> None:
    client, _ = read_hub
    ids = lambda **params: [a["agent_id"] for a in client.get("/api/v1/agents", params=params).json()["items"]]  # noqa: E731
    assert ids() == ["edge-1", "edge-2", "edge-3"]
    assert ids(state="online") == ["edge-1", "edge-3"]
    assert ids(state="offline") == ["edge-2"]
    assert ids(label="site=berlin") == ["edge-1", "edge-3"]
    assert ids(label=["site=berlin", "rack=b"]) == ["edge-3"]
    assert ids(label="site=mars") == []
    agent = client.get("/api/v1/agents", params={"label": "site=paris"}).json()["items"][0]
    assert agent["hostname"] == "<img src=x onerror=alert(1)>" and agent["state"] == "offline" and agent["version"] == "0.1.0"


def test_agent_detail_has_heartbeat_and_recent_task_instances(read_hub: tuple[TestClient, Seeded]) -> None:
    client, ids = read_hub
    agent = client.get("/api/v1/agents/edge-1").json()
    assert agent["labels"] == {"site": "berlin", "rack": "a"}
    assert agent["job_types"][0] == {"name": "diagnostics.collect", "version": "1"}
    assert agent["last_heartbeat"] == {"inbox": 0, "outbox": 1}
    assert agent["first_seen"] == "2025-12-30T00:00:00Z" and agent["last_seen"] == "2025-12-31T23:59:55Z"
    recent = agent["recent_task_instances"]
    assert [(t["run_pk"], t["dag_id"], t["task_id"]) for t in recent] == [
        (ids.run_failed, "reboot_one", "reboot"), (ids.run_running, "fleet_health", "collect"), (ids.run_success, "fleet_health", "collect"),
    ]


def test_rejected_messages_newest_first_with_counts_per_code(read_hub: tuple[TestClient, Seeded]) -> None:
    client, _ = read_hub
    page = client.get("/api/v1/rejected").json()
    assert [r["detail"] for r in page["items"]] == ["rejected #2", "rejected #1", "rejected #0"]
    assert page["counts"] == {"bad_signature": 2, "decode_error": 1}
    first = page["items"][0]
    assert first["code"] == "decode_error" and first["topic"] == "outpost/v1/agents/edge-2/events" and first["agent_id"] == "edge-2"
    only = client.get("/api/v1/rejected", params={"code": "bad_signature", "limit": 1}).json()
    assert only["total"] == 2 and len(only["items"]) == 1 and only["counts"] == page["counts"]


def test_lists_page_with_limit_and_offset(read_hub: tuple[TestClient, Seeded]) -> None:
    client, _ = read_hub
    page = client.get("/api/v1/agents", params={"limit": 1, "offset": 1}).json()
    assert [a["agent_id"] for a in page["items"]] == ["edge-2"]
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1)
    assert client.get("/api/v1/agents", params={"limit": 1000, "offset": 50}).json()["items"] == []


@pytest.mark.parametrize(
    ("path", "code", "names"),
    [
        ("/api/v1/dags/no_such_dag", "dag_not_found", "no_such_dag"),
        ("/api/v1/dags/no_such_dag/runs", "dag_not_found", "no_such_dag"),
        ("/api/v1/runs/999999", "run_not_found", "999999"),
        ("/api/v1/runs/999999/tasks", "run_not_found", "999999"),
        ("/api/v1/agents/no-such-agent", "agent_not_found", "no-such-agent"),
        ("/api/v1/no-such-route", "not_found", "/api/v1/no-such-route"),
    ],
)
def test_missing_things_are_404_in_the_error_shape(read_hub: tuple[TestClient, Seeded], path: str, code: str, names: str) -> None:
    client, _ = read_hub
    error = error_of(client.get(path), 404)
    assert error["code"] == code and names in error["message"]


@pytest.mark.parametrize(
    ("path", "params", "mentions"),
    [
        ("/api/v1/dags", {"limit": 1001}, "query.limit: Input should be less than or equal to 1000"),
        ("/api/v1/runs", {"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
        ("/api/v1/agents", {"offset": -1}, "query.offset: Input should be greater than or equal to 0"),
        ("/api/v1/runs", {"dag_id": "no_such_dag"}, "unknown dag_id 'no_such_dag'"),
        ("/api/v1/runs", {"state": "exploded"}, "query.state: Input should be 'queued', 'running', 'success' or 'failed'"),
        ("/api/v1/agents", {"state": "asleep"}, "query.state: Input should be 'online' or 'offline'"),
        ("/api/v1/agents", {"label": "site"}, "label filter 'site' is not key=value"),
        ("/api/v1/dags", {"is_paused": "maybe"}, "query.is_paused: Input should be a valid boolean"),
        ("/api/v1/runs/abc", {}, "path.run_pk: Input should be a valid integer"),
    ],
)
def test_bad_input_is_422_invalid_request(read_hub: tuple[TestClient, Seeded], path: str, params: dict[str, Any], mentions: str) -> None:
    client, _ = read_hub
    error = error_of(client.get(path, params=params), 422)
    assert error["code"] == "invalid_request"
    assert mentions in error["message"]


# --- writes (SQLite) ----------------------------------------------------------


def test_trigger_creates_the_run_and_its_task_instances_then_emits_the_event(hub: Hub) -> None:
    seen: list[tuple[dict[str, Any], int]] = []

    def on_triggered(_name: str, data: dict[str, Any]) -> None:
        # The scheduler this wakes must find the run committed: look from another session.
        with hub.sessions() as session:
            seen.append((data, session.scalar(select(func.count()).select_from(TaskInstance).where(TaskInstance.run_pk == data["run_pk"])) or 0))

    hub.events.subscribe(ev.RUN_TRIGGERED, on_triggered)
    with hub.client() as client:
        response = client.post("/api/v1/dags/fleet_health/runs", json={"conf": {"site": "berlin", "batch": 2}})
    assert response.status_code == 201, response.text
    run = response.json()
    assert run["dag_id"] == "fleet_health" and run["run_type"] == "manual" and run["conf"] == {"site": "berlin", "batch": 2}
    assert sorted(t["task_id"] for t in run["task_instances"]) == ["collect", "summarise"]
    assert seen == [({"dag_id": "fleet_health", "run_pk": run["id"]}, 2)]


def test_trigger_without_a_body_runs_with_empty_conf(hub: Hub) -> None:
    with hub.client() as client:
        response = client.post("/api/v1/dags/reboot_one/runs")
    assert response.status_code == 201, response.text
    assert response.json()["conf"] == {}


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"conf": [1, 2]}, "conf: Input should be a valid dictionary"),
        ({"conf": "x=1"}, "conf: Input should be a valid dictionary"),
        ({"conf": {}, "logical_date": "2026-01-01"}, "logical_date: Extra inputs are not permitted"),
    ],
)
def test_trigger_with_bad_conf_is_422_and_creates_nothing(hub: Hub, body: dict[str, Any], mentions: str) -> None:
    triggered = hub.recorded(ev.RUN_TRIGGERED)
    with hub.client() as client:
        error = error_of(client.post("/api/v1/dags/fleet_health/runs", json=body), 422)
    assert error["code"] == "invalid_request" and mentions in error["message"]
    assert triggered == [] and _run_count(hub) == 3


def test_trigger_with_malformed_json_is_422(hub: Hub) -> None:
    with hub.client() as client:
        error = error_of(client.post("/api/v1/dags/fleet_health/runs", content=b'{"conf": ', headers={"Content-Type": "application/json"}), 422)
    assert error["code"] == "invalid_request" and "JSON" in error["message"]


def test_trigger_of_an_unknown_dag_is_404_and_emits_nothing(hub: Hub) -> None:
    triggered = hub.recorded(ev.RUN_TRIGGERED)
    with hub.client() as client:
        error = error_of(client.post("/api/v1/dags/no_such_dag/runs", json={"conf": {}}), 404)
    assert error["code"] == "dag_not_found" and "no_such_dag" in error["message"]
    assert triggered == [] and _run_count(hub) == 3


def test_patch_pauses_and_unpauses_a_dag(hub: Hub) -> None:
    with hub.client() as client:
        paused = client.patch("/api/v1/dags/fleet_health", json={"is_paused": True})
        assert paused.status_code == 200 and paused.json()["is_paused"] is True
        assert client.get("/api/v1/dags/fleet_health").json()["is_paused"] is True
        assert client.patch("/api/v1/dags/fleet_health", json={"is_paused": False}).json()["is_paused"] is False
        assert error_of(client.patch("/api/v1/dags/fleet_health", json={"is_paused": "yes"}), 422)["message"] == "is_paused: Input should be a valid boolean"
        assert error_of(client.patch("/api/v1/dags/fleet_health", json={}), 422)["message"] == "is_paused: Field required"
        assert error_of(client.patch("/api/v1/dags/no_such_dag", json={"is_paused": True}), 404)["code"] == "dag_not_found"


def test_wrong_method_is_405_in_the_error_shape(hub: Hub) -> None:
    with hub.client() as client:
        error = error_of(client.delete("/api/v1/dags/fleet_health"), 405)
    assert error["code"] == "method_not_allowed"


def test_an_unexpected_failure_is_500_in_the_error_shape_without_internals(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(queries, "list_dags", broken)
    with hub.client(raise_server_exceptions=False) as client:
        error = error_of(client.get("/api/v1/dags"), 500)
    assert error["code"] == "internal_error" and "secret" not in error["message"]


# --- health -------------------------------------------------------------------


def test_healthz_is_always_ok(hub: Hub) -> None:
    hub.ready["broker"] = False
    with hub.client() as client:
        response = client.get("/api/v1/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_reports_the_database_and_every_readiness_check(hub: Hub) -> None:
    hub.ready.update(broker=True, scheduler=True)
    with hub.client() as client:
        ok = client.get("/api/v1/readyz")
        assert ok.status_code == 200 and ok.json() == {"status": "ready", "checks": {"database": True, "broker": True, "scheduler": True}}
        hub.ready["broker"] = False
        down = client.get("/api/v1/readyz")
    assert down.status_code == 503 and down.json() == {"status": "not_ready", "checks": {"database": True, "broker": False, "scheduler": True}}


def test_readyz_is_503_when_the_database_is_unreachable(tmp_path: Path) -> None:
    unreachable = sessionmaker(create_engine(f"sqlite:///{tmp_path}/missing-dir/hub.db"))
    app = create_app(hub_settings(), unreachable, ev.EventBus(), ManualClock(), None)
    with TestClient(app) as client:
        response = client.get("/api/v1/readyz")
    assert response.status_code == 503 and response.json() == {"status": "not_ready", "checks": {"database": False}}


def test_readyz_is_503_when_the_readiness_callback_fails(hub: Hub) -> None:
    def failing() -> dict[str, bool]:
        raise RuntimeError("broken check")

    hub.app.state.readiness = failing
    with hub.client() as client:
        response = client.get("/api/v1/readyz")
    assert response.status_code == 503 and response.json()["checks"] == {"database": True, "readiness_callback": False}


# --- OpenAPI, docs, real HTTP -------------------------------------------------


def test_openapi_describes_every_route(hub: Hub) -> None:
    with hub.client() as client:
        spec = client.get("/api/v1/openapi.json").json()
    assert set(spec["paths"]) == {
        "/api/v1/dags", "/api/v1/dags/{dag_id}", "/api/v1/dags/{dag_id}/runs", "/api/v1/import-errors",
        "/api/v1/dags/{dag_id}/versions", "/api/v1/dags/{dag_id}/versions/{version_number}", "/api/v1/runs", "/api/v1/runs/{run_pk}",
        "/api/v1/runs/{run_pk}/tasks", "/api/v1/agents", "/api/v1/agents/{agent_id}", "/api/v1/agents/{agent_id}/sync", "/api/v1/agents/{agent_id}/groups", "/api/v1/rejected", "/api/v1/healthz", "/api/v1/readyz",
        "/api/v1/runs/{run_pk}/clear", "/api/v1/runs/{run_pk}/rerun", "/api/v1/runs/{run_pk}/mark", "/api/v1/pools", "/api/v1/pools/{name}",
        "/api/v1/deadline-misses", "/api/v1/backfills", "/api/v1/backfills/dry_run", "/api/v1/backfills/{backfill_id}", "/api/v1/backfills/{backfill_id}/pause",
        "/api/v1/backfills/{backfill_id}/unpause", "/api/v1/backfills/{backfill_id}/cancel", "/api/v1/assets", "/api/v1/assets/events",
        "/api/v1/runs/{run_pk}/tasks/{ti_id}/tries/{try_number}/log", "/api/v1/runs/{run_pk}/tasks/{ti_id}/logs", "/api/v1/conflicts", "/api/v1/runs/{run_pk}/tasks/{task_id}/conflicts",
        "/api/v1/variables", "/api/v1/variables/{key}", "/api/v1/connections", "/api/v1/connections/{conn_id}",
        "/api/v1/enroll", "/api/v1/enrolment-tokens", "/api/v1/agents/{agent_id}/public-key", "/api/v1/agents/{agent_id}/revoke",
        "/api/v1/whoami", "/api/v1/whoami/password", "/api/v1/users", "/api/v1/users/{name}", "/api/v1/tokens", "/api/v1/tokens/{token_id}", "/api/v1/audit",
        "/api/v1/security-events", "/api/v1/metrics",
        "/api/v1/artifacts", "/api/v1/artifacts/{artifact_id}", "/api/v1/artifacts/{artifact_id}/image", "/api/v1/artifacts/{artifact_id}/manifest",
        "/api/v1/rollouts", "/api/v1/rollouts/{rollout_id}", "/api/v1/rollouts/{rollout_id}/devices", "/api/v1/rollouts/{rollout_id}/pause",
        "/api/v1/rollouts/{rollout_id}/resume", "/api/v1/rollouts/{rollout_id}/abort",
    }
    assert set(spec["paths"]["/api/v1/dags/{dag_id}"]) == {"get", "patch"}
    schemas = spec["components"]["schemas"]
    assert "ErrorResponse" in schemas and "HTTPValidationError" not in schemas
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    assert spec["paths"]["/api/v1/runs"]["get"]["responses"]["422"]["content"]["application/json"]["schema"] == error_ref
    assert spec["paths"]["/api/v1/runs/{run_pk}"]["get"]["responses"]["404"]["content"]["application/json"]["schema"] == error_ref


def test_swagger_ui_is_served_without_internet(hub: Hub) -> None:
    with hub.client() as client:
        page = client.get("/api/docs")
        assert page.status_code == 200
        urls = re.findall(r"""(?:src|href)="([^"]+)\"""", page.text)
        assert urls and all(u.startswith("/api/docs/assets/") for u in urls), urls
        assert "validatorUrl" in page.text and "https://" not in page.text
        for url in urls:
            assert client.get(url).status_code == 200, url


def test_api_over_real_http(live_hub: tuple[Hub, str]) -> None:
    hub_, url = live_hub
    with httpx.Client(base_url=url, timeout=10, headers={"Authorization": f"Bearer {hub_.token()}"}) as http:
        assert http.get("/api/v1/healthz").json() == {"status": "ok"}
        assert [d["dag_id"] for d in http.get("/api/v1/dags").json()["items"]] == ["fleet_health", "gone_dag", "reboot_one"]
        created = http.post("/api/v1/dags/fleet_health/runs", json={"conf": {"over": "http"}})
        assert created.status_code == 201
        run = http.get(f"/api/v1/runs/{created.json()['id']}").json()
        assert run["conf"] == {"over": "http"} and len(run["task_instances"]) == 2
        missing = http.get("/api/v1/runs/424242")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"


def _run_count(hub: Hub) -> int:
    with hub.sessions() as session:
        return session.scalar(select(func.count()).select_from(DagRun)) or 0
