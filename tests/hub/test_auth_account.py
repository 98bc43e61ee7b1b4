"""Rate-limited device enrolment, and users changing their own password
(API and the dashboard's account page). Real app and SQLite; the dashboard
over https TestClient so the Secure cookie round-trips as in a browser."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from hub.ctl import main as ctl_main
from hub.ctl.errors import ExitCode
from hub.models import AuditRecord
from hub.models_auth import LoginFailure
from shared.signing import SigningKey
from tests.hub.api_harness import TEST_USERS, Hub, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_auth_web import browser, csrf_of, login

NEW = "a-brand-new-password-1"


def audited(hub: Hub, action: str) -> list[AuditRecord]:
    with hub.sessions() as s:
        return list(s.scalars(select(AuditRecord).where(AuditRecord.action == action).order_by(AuditRecord.id)))


# --- enrolment -----------------------------------------------------------------------


def test_guessing_enrolment_tokens_is_rate_limited_per_address_and_audited(hub: Hub) -> None:
    key = SigningKey.generate().public.to_text()
    with hub.client(role=None) as client:
        def enrol(token: str) -> Any:
            return client.post("/api/v1/enroll", json={"token": token, "agent_id": "pump-1", "public_key": key})

        for i in range(20):
            assert enrol(f"opte_guess{i}").status_code == 401
        limited = enrol("opte_guess-more")
        assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limited"
        assert int(limited.headers["retry-after"]) == 900
        # Logins from that address are counted apart: enrolment guesses do not lock users out.
    with browser(hub) as web:
        assert login(web).status_code == 303
    refusals = [r.detail.get("code") for r in audited(hub, "agent.enrol")]
    assert refusals == ["token_unknown"] * 20 + ["rate_limited"]
    assert all(r.remote == "testclient" and not r.success for r in audited(hub, "agent.enrol"))
    with hub.sessions() as s:  # one row per refused token, none for the refusal by the limit
        assert len(s.scalars(select(LoginFailure).where(LoginFailure.username == "#enroll")).all()) == 20
    hub.clock.advance(600)
    with hub.client(role=None) as client:
        again = client.post("/api/v1/enroll", json={"token": "opte_x", "agent_id": "pump-1", "public_key": key})
        assert again.status_code == 429 and int(again.headers["retry-after"]) == 300
        hub.clock.advance(301)
        assert client.post("/api/v1/enroll", json={"token": "opte_x", "agent_id": "pump-1", "public_key": key}).status_code == 401


def test_failed_logins_do_not_block_enrolment(hub: Hub) -> None:
    with browser(hub) as web:
        for i in range(20):
            assert login(web, name=f"guess-{i}", password="x").status_code == 401
        assert login(web, name="test-viewer").status_code == 429
    with hub.client(role=None) as client:
        answer = client.post("/api/v1/enroll", json={"token": "opte_x", "agent_id": "p", "public_key": SigningKey.generate().public.to_text()})
        assert answer.status_code == 401


# --- own password over the API ------------------------------------------------------------


def change(client: TestClient, current: str, new: str = NEW) -> Any:
    return client.post("/api/v1/whoami/password", json={"current_password": current, "new_password": new})


def test_a_viewer_changes_their_password_and_their_sessions_end(hub: Hub) -> None:
    old = TEST_USERS["test-viewer"][1]
    with browser(hub) as other:
        assert login(other, name="test-viewer").status_code == 303
        assert other.get("/").status_code == 200
        with hub.client("viewer") as api:
            wrong = change(api, "not the password")
            assert wrong.status_code == 422 and wrong.json()["error"]["code"] == "wrong_password"
            short = change(api, old, "short")
            assert short.status_code == 422 and "at least 10" in short.json()["error"]["message"]
            assert change(api, old).status_code == 204
            # The token goes on working; the dashboard session ended.
            assert api.get("/api/v1/whoami").json()["name"] == "test-viewer"
        assert other.get("/").status_code == 303
    with browser(hub) as web:
        assert login(web, name="test-viewer").status_code == 401
        assert login(web, name="test-viewer", password=NEW).status_code == 303
    records = [(r.actor, r.target, r.success, r.detail.get("reason")) for r in audited(hub, "user.set_password")]
    assert records == [("user:test-viewer", "test-viewer", False, "wrong_password"), ("user:test-viewer", "test-viewer", True, None)]


def test_guessing_the_current_password_is_rate_limited_like_login(hub: Hub) -> None:
    with hub.client("operator") as api:
        for _ in range(5):
            assert change(api, "not the password").status_code == 422
        limited = change(api, TEST_USERS["test-operator"][1])  # even the right one, while limited
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) == 900
    # The same count as logins: the user name is limited at the login form too.
    with browser(hub) as web:
        assert login(web, name="test-operator").status_code == 429
    assert [r.detail.get("reason") for r in audited(hub, "user.set_password")] == ["wrong_password"] * 5 + ["rate_limited"]


def test_changing_the_password_needs_credentials_and_a_strict_body(hub: Hub) -> None:
    with hub.client(role=None) as anonymous:
        assert change(anonymous, "x").status_code == 401
    with hub.client("viewer") as api:
        extra = api.post("/api/v1/whoami/password", json={"current_password": "x", "new_password": NEW, "user": "test-admin"})
        assert extra.status_code == 422


# --- the account page --------------------------------------------------------------------------


def test_the_account_page_changes_the_password_and_keeps_this_session(hub: Hub) -> None:
    old = TEST_USERS["test-operator"][1]
    with browser(hub) as other, browser(hub) as web:
        assert login(other, name="test-operator").status_code == 303
        assert login(web, name="test-operator").status_code == 303
        page = web.get("/account")
        assert page.status_code == 200 and "data-account-name" in page.text and "<script>" not in page.text and "style=" not in page.text
        assert "/account" in web.get("/").text  # linked from the user menu
        csrf = csrf_of(page.text)
        form = {"current_password": old, "new_password": NEW, "confirm_password": NEW}
        assert web.post("/account/password", data=form).status_code == 403  # no CSRF value
        assert web.post("/account/password", data={**form, "csrf_token": csrf}, headers={"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}).status_code == 403
        differ = web.post("/account/password", data={**form, "confirm_password": NEW + "x", "csrf_token": csrf})
        assert differ.status_code == 422 and "differ" in differ.text
        wrong = web.post("/account/password", data={**form, "current_password": "nope", "csrf_token": csrf})
        assert wrong.status_code == 422 and "current password is wrong" in wrong.text
        done = web.post("/account/password", data={**form, "csrf_token": csrf})
        assert done.status_code == 200 and "data-account-changed" in done.text
        assert web.get("/account").status_code == 200  # this session goes on
        assert other.get("/account").status_code == 303  # the other one ended
    with browser(hub) as web:
        assert login(web, name="test-operator").status_code == 401
        assert login(web, name="test-operator", password=NEW).status_code == 303


# --- the outpost CLI ------------------------------------------------------------------------------


def test_outpost_password_changes_the_tokens_user_password(live_hub: tuple[Hub, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hub_, url = live_hub
    monkeypatch.setenv("OUTPOST_TOKEN", hub_.token("viewer"))

    def run(stdin: str) -> tuple[int, str, str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = ctl_main(["--hub", url, "password", "--stdin"])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert run("only one line\n")[0] == ExitCode.USAGE
    code, _out, err = run(f"wrong password\n{NEW}\n")
    assert code == ExitCode.API_ERROR and "wrong_password: the current password is wrong" in err
    code, out, _err = run(f"{TEST_USERS['test-viewer'][1]}\n{NEW}\n")
    assert code == 0 and "password changed" in out
    with browser(hub_) as web:
        assert login(web, name="test-viewer", password=NEW).status_code == 303
