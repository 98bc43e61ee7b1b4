"""Login, logout, CSRF and roles in headless Chromium against a real uvicorn.

The session cookie is Secure (the default, ``session_cookie_secure``) and
the hub is on http://127.0.0.1: Chromium treats loopback as a secure
context and keeps Secure cookies there, so the login holds. These tests
would fail if it did not.
"""

from __future__ import annotations

from typing import Any

import pytest

from sqlalchemy import update

from hub.db import transaction
from hub.models import DagRun
from hub.models_auth import WebSession
from shared.clock import utcnow
from tests.hub.api_harness import Hub, browser_login, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_web_browser import browser_page  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


def run_count(hub_: Hub) -> int:
    with hub_.sessions() as s:
        return s.query(DagRun).count()


def test_login_logout_and_csrf_in_a_real_browser(live_hub: tuple[Hub, str], browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    hub_, url = live_hub
    page, seen = browser_page

    # Logged out, a page sends the browser to the login form.
    page.goto(url + "/agents")
    assert page.url == url + "/login?next=%2Fagents"
    page.fill("#username", "test-admin")
    page.fill("#password", "wrong password!")
    page.click("form.login-form button[type=submit]")
    expect(page.locator("[data-login-error]")).to_have_text("Wrong user name or password.")

    # The real form, then back where we were going.
    page.fill("#username", "test-admin")
    page.fill("#password", "admin-password-1")
    with page.expect_navigation():
        page.click("form.login-form button[type=submit]")
    assert page.url == url + "/agents"
    expect(page.locator("[data-user='test-admin']")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "outpost_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script sees it

    # A form whose CSRF token was tampered with is refused, and nothing runs.
    page.goto(url + "/")
    before = run_count(hub_)
    page.evaluate("document.querySelectorAll('input[name=csrf_token]').forEach(i => i.value = 'forged')")
    page.get_by_role("button", name="Trigger fleet_health").click()
    expect(page.locator("h1")).to_have_text("Csrf failed")
    assert run_count(hub_) == before
    # The untouched form works.
    page.goto(url + "/")
    page.get_by_role("button", name="Trigger fleet_health").click()
    page.wait_for_url(f"{url}/runs/*")
    assert run_count(hub_) == before + 1

    # Log out: back to the login form, and the old pages need a login again.
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(url + "/login")
    page.goto(url + "/runs")
    assert page.url.startswith(url + "/login?next=")

    assert seen["dialog"] == [] and seen["pageerror"] == []
    assert [m for m in seen["console"] if "401" not in m and "403" not in m] == [], seen["console"]


def test_a_viewer_sees_no_action_buttons(live_hub: tuple[Hub, str], browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    hub_, url = live_hub
    assert hub_.seeded is not None
    page, seen = browser_page
    browser_login(page, url, "test-viewer")
    expect(page.locator("[data-user='test-viewer']")).to_contain_text("viewer")
    for path in ("/", "/dags/fleet_health", f"/runs/{hub_.seeded.run_failed}"):
        page.goto(url + path)
        expect(page.locator("main")).to_be_visible()
        for name in ("Trigger", "Rerun", "Clear", "Mark success", "Mark failed", "Mark run success"):
            assert page.get_by_role("button", name=name).count() == 0, (path, name)
    assert page.locator("nav a[href='/audit']").count() == 0
    page.goto(url + "/audit")
    expect(page.locator("h1")).to_have_text("Forbidden")

    # When the session ends, the page's live refresh goes to the login form.
    page.goto(url + "/agents")
    with transaction(hub_.sessions) as s:
        s.execute(update(WebSession).values(ended_at=utcnow(hub_.clock)))
    page.wait_for_url(url + "/login?next=%2Fagents", timeout=20_000)
    assert seen["dialog"] == [] and seen["pageerror"] == []
