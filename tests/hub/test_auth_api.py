"""Authentication and roles on every route, API tokens, users, scope and the
audit log, through the REST API (real app, real SQLite, TestClient)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from sqlalchemy import select

from hub.api.app import AGENT_ROUTES, PUBLIC_MOUNTS, PUBLIC_ROUTES, create_app
from hub.api.security import SAFE_METHODS, RouteInfo, required_role, route_table
from hub.auth.keys import check_secret_key
from hub.auth.roles import Role
from hub.db import transaction
from hub.errors import ConfigError
from hub.events import EventBus
from hub.models import Agent, AuditRecord
from hub.models_auth import ApiToken
from shared.clock import ManualClock
from tests.hub.api_harness import TEST_USERS, Hub, hub, hub_settings, seeded_sqlite_template  # noqa: F401  (fixtures)

#: Values for path parameters that name nothing, so an allowed request changes nothing.
_MISSING = {"int": "424242", "str": "nope"}


def concrete(route: RouteInfo) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return _MISSING["int"] if name in ("run_pk", "ti_id", "try_number", "backfill_id", "token_id", "version_number") else _MISSING["str"]

    return re.sub(r"\{(\w+)(?::\w+)?\}", fill, route.path)


def protected(hub: Hub) -> list[tuple[str, RouteInfo]]:
    """Every (method, route) of the app that needs a user."""
    out = []
    for route in route_table(hub.app.router):
        for method in sorted(route.methods or {"GET"}):
            if method == "HEAD":
                continue
            if required_role(route, method, PUBLIC_ROUTES | AGENT_ROUTES, PUBLIC_MOUNTS) is not None:
                out.append((method, route))
    return out


def call(client: Any, method: str, route: RouteInfo) -> Any:
    path = concrete(route)
    if route.is_mount:
        path = route.path + "/nope"
    if path.startswith("/api/"):
        return client.request(method, path, json={} if method not in SAFE_METHODS else None)
    return client.request(method, path, data={} if method not in SAFE_METHODS else None)


def test_the_route_table_is_complete_and_the_exemptions_are_exactly_the_listed_ones(hub: Hub) -> None:
    table = route_table(hub.app.router)
    paths = {(m, r.path) for r in table for m in (r.methods or ()) if m != "HEAD"}
    # The table sees routes of included routers (API and dashboard alike).
    assert {("GET", "/api/v1/dags"), ("POST", "/dags/{dag_id}/trigger"), ("GET", "/login"), ("POST", "/logout"), ("GET", "/api/v1/audit")} <= paths
    exempt = {(m, r.path) for r in table if not r.is_mount for m in (r.methods or ()) if m != "HEAD" and required_role(r, m, PUBLIC_ROUTES | AGENT_ROUTES, PUBLIC_MOUNTS) is None}
    assert exempt == set(PUBLIC_ROUTES | AGENT_ROUTES)
    assert {r.path for r in table if r.is_mount} == set(PUBLIC_MOUNTS)
    assert len(protected(hub)) >= 60


def test_every_protected_route_refuses_requests_without_credentials(hub: Hub) -> None:
    with hub.client(role=None, follow_redirects=False) as client:
        for method, route in protected(hub):
            response = call(client, method, route)
            where = f"{method} {route.path}"
            if route.path.startswith("/api/"):
                assert response.status_code == 401, where
                assert response.json()["error"]["code"] == "unauthorized", where
                assert response.headers["www-authenticate"].startswith("Bearer"), where
            elif method == "GET":
                # A browser is sent to the login form, and back here after.
                assert response.status_code == 303, where
                assert response.headers["location"].startswith("/login?next=%2F"), where
            else:
                assert response.status_code == 401, where
    for bad in ("Bearer opt_not-a-token", "Bearer ", "Basic dGVzdDp0ZXN0", f"Bearer {hub.token()}x"):
        with hub.client(role=None, headers={"Authorization": bad}) as client:
            assert client.get("/api/v1/dags").status_code == 401, bad
            assert client.post("/api/v1/dags/fleet_health/runs", json={}).status_code == 401, bad


def test_public_and_agent_routes_answer_without_credentials(hub: Hub) -> None:
    with hub.client(role=None, follow_redirects=False) as client:
        assert client.get("/api/v1/healthz").status_code == 200
        assert client.get("/api/v1/readyz").status_code == 200
        assert client.get("/api/v1/openapi.json").status_code == 200
        assert client.get("/api/docs").status_code == 200
        assert client.get("/login").status_code == 200
        assert client.get("/static/app.js").status_code == 200
        # Agent routes are not user routes: their own checks answer (the agent's signature, the enrolment token).
        assert client.get("/api/v1/agents/a1/sync").json()["error"]["code"] == "signature_missing"
        assert client.get("/api/v1/artifacts/fw-1.0/image").json()["error"]["code"] == "signature_missing"
        enrol = client.post("/api/v1/enroll", json={"token": "x" * 20, "agent_id": "a1", "public_key": "ed25519:" + "A" * 43})
        assert enrol.status_code == 401 and enrol.json()["error"]["code"] == "token_unknown", enrol.text
        # Unknown paths stay 404 (nothing to protect, nothing revealed).
        assert client.get("/api/v1/nope").status_code == 404


@pytest.mark.parametrize("role", ["viewer", "operator", "admin"])
def test_role_rules_on_every_route(hub: Hub, role: str) -> None:
    """viewer: reads only; operator: reads and changes, not admin routes; admin: everything.
    Allowed requests name objects that do not exist, so they answer 404/422, never 401/403."""
    refused, allowed = [], []
    with hub.client(role=role, follow_redirects=False) as client:
        for method, route in protected(hub):
            need = required_role(route, method, PUBLIC_ROUTES | AGENT_ROUTES, PUBLIC_MOUNTS)
            assert need is not None
            response = call(client, method, route)
            (refused if response.status_code == 403 else allowed).append((method, route.path, need, response.status_code))
    ranks = {"viewer": 1, "operator": 2, "admin": 3}
    for method, path, need, status in refused:
        assert ranks[need.value] > ranks[role], (method, path, status)
    for method, path, need, status in allowed:
        assert ranks[need.value] <= ranks[role] and status != 401, (method, path, status)
    if role == "viewer":
        assert ("POST", "/api/v1/dags/{dag_id}/runs", Role.OPERATOR) in {(m, p, n) for m, p, n, _s in refused}
        assert ("POST", "/dags/{dag_id}/trigger", Role.OPERATOR) in {(m, p, n) for m, p, n, _s in refused}
    if role == "operator":
        assert {p for _m, p, _n, _s in refused} == {
            "/api/v1/users", "/api/v1/users/{name}", "/api/v1/tokens", "/api/v1/tokens/{token_id}", "/api/v1/audit", "/audit",
            "/api/v1/variables", "/api/v1/variables/{key}", "/api/v1/connections", "/api/v1/connections/{conn_id}",
            "/api/v1/enrolment-tokens", "/api/v1/agents/{agent_id}/public-key", "/api/v1/agents/{agent_id}/revoke",
            "/api/v1/artifacts/{artifact_id}",
        }
    if role == "admin":
        assert refused == []


def test_a_forbidden_answer_names_the_role_needed(hub: Hub) -> None:
    with hub.client(role="viewer") as client:
        response = client.post("/api/v1/dags/fleet_health/runs", json={})
        assert response.status_code == 403
        assert response.json()["error"] == {"code": "forbidden", "message": "POST /api/v1/dags/{dag_id}/runs needs the operator role; test-viewer acts as viewer"}
        assert client.get("/api/v1/dags/fleet_health").status_code == 200
    with hub.client(role="operator") as client:
        assert client.post("/api/v1/dags/fleet_health/runs", json={}).status_code == 201
        assert client.get("/api/v1/users").status_code == 403


# --- tokens -------------------------------------------------------------------


def test_tokens_are_shown_once_stored_hashed_capped_by_role_and_revocable(hub: Hub) -> None:
    with hub.client() as admin:
        created = admin.post("/api/v1/tokens", json={"user": "test-operator", "name": "laptop", "role": "viewer", "expires_in_days": 1})
        assert created.status_code == 201, created.text
        body = created.json()
        secret = body["token"]
        assert secret.startswith("opt_") and len(secret) > 40 and body["prefix"] == secret[:10] and body["role"] == "viewer"
        listed = admin.get("/api/v1/tokens", params={"user": "test-operator"}).json()["items"]
        assert secret not in str(listed) and [t["name"] for t in listed][0] == "laptop"
        # More than the user's role is refused.
        too_much = admin.post("/api/v1/tokens", json={"user": "test-viewer", "name": "x", "role": "operator"})
        assert too_much.status_code == 422 and "cannot have more than its user's role" in too_much.json()["error"]["message"]
    with hub.sessions() as s:
        row = s.scalar(select(ApiToken).where(ApiToken.id == body["id"]))
        assert row is not None and row.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    with open(hub.url.removeprefix("sqlite:///"), "rb") as handle:
        db_bytes = handle.read()
    assert secret.encode() not in db_bytes
    with hub.client(role=None, headers={"Authorization": f"Bearer {secret}"}) as client:
        me = client.get("/api/v1/whoami").json()
        assert me == {"name": "test-operator", "role": "viewer", "via": "token", "scope_tags": None, "scope_groups": None}
        assert client.post("/api/v1/dags/fleet_health/runs", json={}).status_code == 403  # the token's role, not the user's
    with hub.client() as admin:
        used = next(t for t in admin.get("/api/v1/tokens").json()["items"] if t["id"] == body["id"])
        assert used["last_used_at"] is not None and used["state"] == "active"
        assert admin.delete(f"/api/v1/tokens/{body['id']}").status_code == 204
        assert admin.delete("/api/v1/tokens/424242").status_code == 404
    with hub.client(role=None, headers={"Authorization": f"Bearer {secret}"}) as client:
        assert client.get("/api/v1/whoami").status_code == 401


def test_tokens_expire_and_follow_their_users_role_and_state(hub: Hub) -> None:
    with hub.client() as admin:
        secret = admin.post("/api/v1/tokens", json={"user": "test-operator", "name": "ci", "expires_in_days": 2}).json()["token"]
    auth = {"Authorization": f"Bearer {secret}"}
    with hub.client(role=None, headers=auth) as client:
        assert client.get("/api/v1/whoami").json()["role"] == "operator"
    with hub.client() as admin:
        assert admin.patch("/api/v1/users/test-operator", json={"role": "viewer"}).json()["role"] == "viewer"
    with hub.client(role=None, headers=auth) as client:
        assert client.get("/api/v1/whoami").json()["role"] == "viewer"  # demoting the user demotes the token
    with hub.client() as admin:
        admin.patch("/api/v1/users/test-operator", json={"role": "operator", "disabled": True})
    with hub.client(role=None, headers=auth) as client:
        assert client.get("/api/v1/whoami").status_code == 401
    with hub.client() as admin:
        admin.patch("/api/v1/users/test-operator", json={"disabled": False})
    with hub.client(role=None, headers=auth) as client:
        assert client.get("/api/v1/whoami").status_code == 200
        hub.clock.advance(2 * 86400 + 1)
        assert client.get("/api/v1/whoami").status_code == 401
    with hub.client() as admin:
        assert next(t for t in admin.get("/api/v1/tokens").json()["items"] if t["name"] == "ci")["state"] == "expired"


def test_users_api_creates_changes_and_audits(hub: Hub) -> None:
    with hub.client() as admin:
        made = admin.post("/api/v1/users", json={"name": "alice", "password": "correct horse", "role": "operator", "scope_tags": ["fleet"]})
        assert made.status_code == 201 and made.json()["scope_tags"] == ["fleet"] and made.json()["scope_groups"] is None
        assert admin.post("/api/v1/users", json={"name": "alice", "password": "correct horse"}).status_code == 409
        short = admin.post("/api/v1/users", json={"name": "bob", "password": "short"})
        assert short.status_code == 422 and "at least 10" in short.json()["error"]["message"]
        assert admin.post("/api/v1/users", json={"name": "bob", "password": "long enough!", "role": "root"}).status_code == 422
        assert admin.patch("/api/v1/users/alice", json={"role": "viewer", "scope_tags": []}).json().items() >= {"role": "viewer", "scope_tags": None}.items()
        assert admin.get("/api/v1/users/nope").status_code == 404
        names = [u["name"] for u in admin.get("/api/v1/users").json()["items"]]
        assert "alice" in names and "password_hash" not in str(admin.get("/api/v1/users").json()) and "argon2" not in str(admin.get("/api/v1/users").json())
        actions = [(r["actor"], r["action"], r["target"]) for r in admin.get("/api/v1/audit", params={"action": "user.*"}).json()["items"]]
    assert actions[:3] == [("user:test-admin", "user.set_scope", "alice"), ("user:test-admin", "user.set_role", "alice"), ("user:test-admin", "user.create", "alice")]


# --- scope --------------------------------------------------------------------


def test_a_scoped_user_sees_only_their_dags_and_device_groups(hub: Hub) -> None:
    assert hub.seeded is not None
    with transaction(hub.sessions) as s:
        for agent_id, group in (("edge-1", "berlin"), ("edge-3", "munich")):
            agent = s.get(Agent, agent_id)
            assert agent is not None
            agent.labels = {**agent.labels, "group": group}
    with hub.client() as admin:
        admin.post("/api/v1/users", json={"name": "berlin-ops", "password": "berlin-password", "role": "operator", "scope_tags": ["fleet"], "scope_groups": ["berlin"]})
        secret = admin.post("/api/v1/tokens", json={"user": "berlin-ops", "name": "t"}).json()["token"]
    with hub.client(role=None, headers={"Authorization": f"Bearer {secret}"}) as client:
        assert [d["dag_id"] for d in client.get("/api/v1/dags").json()["items"]] == ["fleet_health"]
        assert {r["dag_id"] for r in client.get("/api/v1/runs").json()["items"]} == {"fleet_health"}
        assert client.get("/api/v1/runs").json()["total"] == 2
        # Outside the scope: 404, exactly as for what does not exist.
        for path in ("/api/v1/dags/reboot_one", f"/api/v1/runs/{hub.seeded.run_failed}", f"/api/v1/runs/{hub.seeded.run_failed}/tasks",
                     "/api/v1/dags/reboot_one/runs", "/api/v1/agents/edge-2", "/api/v1/agents/edge-3"):
            assert client.get(path).status_code == 404, path
        assert client.post("/api/v1/dags/reboot_one/runs", json={}).status_code == 404
        assert client.post(f"/api/v1/runs/{hub.seeded.run_failed}/rerun", json={}).status_code == 404
        assert client.get("/api/v1/runs", params={"dag_id": "reboot_one"}).status_code == 422  # as for an unknown DAG
        assert client.get("/api/v1/dags/fleet_health").status_code == 200
        assert [a["agent_id"] for a in client.get("/api/v1/agents").json()["items"]] == ["edge-1"]
        recent = client.get("/api/v1/agents/edge-1").json()["recent_task_instances"]
        assert recent and {t["dag_id"] for t in recent} == {"fleet_health"}  # edge-1's reboot_one try is left out
        assert client.get("/api/v1/whoami").json().items() >= {"scope_tags": ["fleet"], "scope_groups": ["berlin"]}.items()
    # The dashboard follows the same scope.
    with hub.client(role=None, headers={"Authorization": f"Bearer {secret}"}) as client:
        assert "reboot_one" not in client.get("/").text
        assert client.get("/dags/reboot_one").status_code == 404
        assert client.get(f"/runs/{hub.seeded.run_failed}").status_code == 404
        agents = client.get("/agents").text
        assert "edge-1" in agents and "edge-3" not in agents


# --- audit --------------------------------------------------------------------


def test_operator_actions_are_audited_with_who_and_where(hub: Hub) -> None:
    assert hub.seeded is not None
    with hub.client(role="operator") as client:
        run = client.post("/api/v1/dags/fleet_health/runs", json={"conf": {"k": 1}}).json()
        client.patch("/api/v1/dags/fleet_health", json={"is_paused": True})
        client.post(f"/api/v1/runs/{hub.seeded.run_success}/clear", json={"task_ids": ["summarise"]})
        client.post(f"/api/v1/runs/{hub.seeded.run_failed}/mark", json={"state": "success", "task_ids": ["reboot"]})
        client.patch(f"/api/v1/runs/{run['id']}", json={"state": "failed"})
        client.post(f"/api/v1/runs/{hub.seeded.run_success}/rerun", json={})
        client.post("/api/v1/backfills", json={"dag_id": "fleet_health", "from_date": "2025-12-31T10:00:00Z", "to_date": "2025-12-31T12:00:00Z"})
        assert client.get("/api/v1/audit").status_code == 403
    with hub.client() as admin:
        items = admin.get("/api/v1/audit", params={"actor": "user:test-operator"}).json()["items"]
        assert [r["action"] for r in items] == ["backfill.create", "run.rerun", "run.mark", "task.mark", "run.clear", "dag.pause", "run.trigger"]
        trigger = items[-1]
        assert trigger["target"] == "fleet_health" and trigger["detail"]["run_pk"] == run["id"] and trigger["detail"]["conf_keys"] == ["k"]
        assert trigger["remote"] == "testclient" and trigger["detail"]["via"].startswith("token:")
        assert [r["action"] for r in admin.get("/api/v1/audit", params={"action": "run.*"}).json()["items"]] == ["run.rerun", "run.mark", "run.clear", "run.trigger"]
        assert admin.get("/api/v1/audit", params={"since": "2030-01-01T00:00:00"}).json()["items"] == []
        assert len(admin.get("/api/v1/audit", params={"until": "2030-01-01T00:00:00Z", "limit": 2}).json()["items"]) == 2
    with hub.sessions() as s:
        assert s.scalar(select(AuditRecord).where(AuditRecord.action == "run.trigger")) is not None


# --- the secret key and the OpenAPI document ------------------------------------


@pytest.mark.parametrize("value", ["", "   ", "changeme", "secret", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "short-but-random-Xy7"])
def test_an_empty_default_or_short_secret_key_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="secret_key"):
        check_secret_key(value)
    with pytest.raises(ConfigError, match="secret_key"):
        create_app(hub_settings(secret_key=value), None, EventBus(), ManualClock())  # type: ignore[arg-type]


def test_openapi_marks_every_protected_operation_with_bearer_auth(hub: Hub) -> None:
    with hub.client(role=None) as client:
        spec = client.get("/api/v1/openapi.json").json()
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer", "description": "An API token (opt_...): outpost-hub tokens create."}
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            open_route = (method.upper(), path) in PUBLIC_ROUTES | AGENT_ROUTES
            assert ("security" in op) is not open_route, (method, path)
            if not open_route:
                assert {"401", "403"} <= set(op["responses"]), (method, path)


def test_test_users_are_the_documented_ones() -> None:
    assert {role for role, _pw in TEST_USERS.values()} == {"admin", "operator", "viewer"}
