"""Dashboard login: the form, the session cookie, CSRF, expiry, logout and
the login rate limit (real app and SQLite; TestClient over https so the
Secure cookie round-trips as in a browser)."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from hub.models import AuditRecord, DagRun
from hub.models_auth import LoginFailure, WebSession
from tests.hub.api_harness import TEST_USERS, Hub, hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_web import CSP, Page

BASE = "https://testserver"


def browser(hub: Hub) -> TestClient:
    """A cookie-keeping client without credentials, like a browser."""
    return hub.client(role=None, base_url=BASE, follow_redirects=False)


def login(client: TestClient, name: str = "test-admin", password: str | None = None, next_path: str = "/") -> Any:
    form = Page(client.get(f"/login?next={next_path}").text)
    csrf = form.find("input", name="csrf_token")[0]["value"]
    return client.post("/login", data={"username": name, "password": password if password is not None else TEST_USERS[name][1], "csrf_token": csrf, "next": next_path})


def csrf_of(html: str) -> str:
    values = {a["value"] for a in Page(html).find("input", name="csrf_token")}
    assert len(values) == 1, values
    return str(values.pop())


def runs(hub: Hub) -> int:
    with hub.sessions() as s:
        return s.scalar(select(func.count()).select_from(DagRun)) or 0


def test_logging_in_sets_a_hardened_session_cookie_and_goes_back(hub: Hub) -> None:
    with browser(hub) as client:
        first = client.get("/runs?x=1")
        assert first.status_code == 303 and first.headers["location"] == "/login?next=%2Fruns%3Fx%3D1"
        page = client.get(first.headers["location"])
        assert page.status_code == 200 and page.headers["content-security-policy"].startswith(CSP)
        assert Page(page.text).find("input", name="next")[0]["value"] == "/runs?x=1"
        answer = login(client, next_path="/runs?x=1")
        assert answer.status_code == 303 and answer.headers["location"] == "/runs?x=1"
        cookie = next(c for c in answer.headers.get_list("set-cookie") if c.startswith("outpost_session="))
        flags = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "secure", "samesite=strict", "path=/"} <= flags
        secret = cookie.split(";")[0].split("=", 1)[1]
        # At rest only its hash.
        with hub.sessions() as s:
            stored = s.scalars(select(WebSession.id_hash)).all()
        assert stored == [hashlib.sha256(secret.encode()).hexdigest()]
        runs_page = client.get("/runs")
        assert runs_page.status_code == 200 and runs_page.headers["cache-control"] == "no-store"
        assert Page(runs_page.text).find("span", data_user="test-admin")
        # The session is the dashboard's only: the API wants a token.
        assert client.get("/api/v1/dags").status_code == 401


def test_every_form_carries_the_csrf_token_and_a_post_without_it_is_refused(hub: Hub) -> None:
    assert hub.seeded is not None
    with browser(hub) as client:
        login(client)
        dag_page = client.get("/dags/fleet_health").text
        token = csrf_of(dag_page)
        for path in ("/", f"/runs/{hub.seeded.run_failed}"):
            html = client.get(path).text
            forms = len(Page(html).find("form", method="post"))
            assert forms >= 2 and len(Page(html).find("input", name="csrf_token")) == forms, path
            assert csrf_of(html) == token
        before = runs(hub)
        for data in ({}, {"csrf_token": "0" * 64}, {"csrf_token": token[:-1]}):
            refused = client.post("/dags/fleet_health/trigger", data=data)
            assert refused.status_code == 403 and "CSRF" in refused.text and refused.headers["content-security-policy"].startswith(CSP)
        assert runs(hub) == before
        ok = client.post("/dags/fleet_health/trigger", data={"csrf_token": token, "conf": ""})
        assert ok.status_code == 303 and runs(hub) == before + 1
        with hub.sessions() as s:
            record = s.scalars(select(AuditRecord).where(AuditRecord.action == "run.trigger")).one()
        assert (record.actor, record.target, record.detail["via"]) == ("user:test-admin", "fleet_health", "session")
        # The header works too (for scripts of the dashboard).
        assert client.post("/dags/fleet_health/trigger", headers={"X-CSRF-Token": token}).status_code == 303


def test_login_refuses_forms_from_other_sites_and_without_the_login_token(hub: Hub) -> None:
    with browser(hub) as client:
        no_token = client.post("/login", data={"username": "test-admin", "password": TEST_USERS["test-admin"][1]})
        assert no_token.status_code == 403 and "outpost_session" not in no_token.headers.get("set-cookie", "")
        form = Page(client.get("/login").text)
        csrf = form.find("input", name="csrf_token")[0]["value"]
        cross = client.post("/login", data={"username": "test-admin", "password": TEST_USERS["test-admin"][1], "csrf_token": csrf},
                            headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"})
        assert cross.status_code == 403
        for target in ("//evil.example/x", "https://evil.example", "/\\evil.example"):
            assert login(client, next_path=target).headers["location"] == "/"


def test_wrong_passwords_are_rate_limited_per_user_name_across_hub_processes(hub: Hub) -> None:
    with browser(hub) as client:
        for _ in range(5):
            wrong = login(client, password="not the password")
            assert wrong.status_code == 401 and "Wrong user name or password." in wrong.text
        limited = login(client)  # even the right password, while limited
        assert limited.status_code == 429 and "Too many failed logins" in limited.text
        assert int(limited.headers["retry-after"]) == 900
        unknown = login(client, name="nobody", password="x")  # other names are not limited (yet)
        assert unknown.status_code == 401
    with hub.sessions() as s:
        assert s.scalar(select(func.count()).select_from(LoginFailure).where(LoginFailure.username == "test-admin")) == 5
    # Another hub process over the same database counts the same failures.
    other = Hub(hub.url, hub.engine, hub.sessions, hub.clock)
    with other.client(role=None, base_url=BASE, follow_redirects=False) as client:
        assert login(client).status_code == 429
        hub.clock.advance(600)
        assert int(login(client).headers["retry-after"]) == 300
        hub.clock.advance(301)
        assert login(client).status_code == 303
    with hub.sessions() as s:
        audited = [(r.action, r.success, r.detail.get("reason")) for r in s.scalars(select(AuditRecord).where(AuditRecord.target == "test-admin").order_by(AuditRecord.id))]
    assert audited == [("auth.login_failed", False, "bad_credentials")] * 5 + [("auth.login_failed", False, "rate_limited")] * 3 + [("auth.login", True, None)]


def test_many_user_names_from_one_address_are_rate_limited(hub: Hub) -> None:
    with browser(hub) as client:
        for i in range(20):
            assert login(client, name=f"guess-{i}", password="x").status_code == 401
        assert login(client, name="test-viewer").status_code == 429


@pytest.mark.parametrize(("idle", "expired"), [(3599, False), (3601, True)])
def test_sessions_end_after_an_idle_hour(hub: Hub, idle: int, expired: bool) -> None:
    with browser(hub) as client:
        login(client)
        hub.clock.advance(idle)
        answer = client.get("/runs")
        assert (answer.status_code == 303) is expired


def test_sessions_end_after_twelve_hours_even_when_busy(hub: Hub) -> None:
    with browser(hub) as client:
        login(client)
        for _ in range(23):
            hub.clock.advance(1800)
            assert client.get("/runs").status_code == 200
        hub.clock.advance(1801)
        assert client.get("/runs").status_code == 303


def test_logout_ends_the_session_for_good(hub: Hub) -> None:
    with browser(hub) as client:
        login(client)
        html = client.get("/").text
        cookie = client.cookies.get("outpost_session")
        assert client.post("/logout", data={}).status_code == 403  # CSRF-checked too
        out = client.post("/logout", data={"csrf_token": csrf_of(html)})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert 'outpost_session=""' in out.headers["set-cookie"] or "max-age=0" in out.headers["set-cookie"].lower()
        client.cookies.set("outpost_session", cookie or "", domain="testserver")
        assert client.get("/").status_code == 303  # the old cookie no longer works
    with hub.sessions() as s:
        assert s.scalar(select(WebSession.ended_at)) is not None
        assert [r.action for r in s.scalars(select(AuditRecord).order_by(AuditRecord.id))][-2:] == ["auth.login", "auth.logout"]


def test_a_viewer_sees_no_actions_and_cannot_post_them(hub: Hub) -> None:
    assert hub.seeded is not None
    with browser(hub) as client:
        login(client, name="test-viewer")
        for path in ("/", "/dags/fleet_health", f"/runs/{hub.seeded.run_failed}"):
            html = client.get(path).text
            assert not re.search(r"<button[^>]*>(Trigger|Rerun|Clear|Mark)", html), path
            assert Page(html).find("form", action="/logout")
        token = csrf_of(client.get("/").text)
        refused = client.post("/dags/fleet_health/trigger", data={"csrf_token": token})
        assert refused.status_code == 403 and "needs the operator role" in refused.text
        assert client.get("/audit").status_code == 403


def test_the_audit_page_lists_logins_for_admins(hub: Hub) -> None:
    with browser(hub) as client:
        login(client, password="wrong password")
        login(client)
        page = client.get("/audit?action=auth.*")
        assert page.status_code == 200
        rows = Page(page.text).find("tr", data_action="auth.login") + Page(page.text).find("tr", data_action="auth.login_failed")
        assert len(rows) == 2
        assert client.get("/audit?since=yesterday").status_code == 422
