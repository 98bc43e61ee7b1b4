"""The account page in headless Chromium against a real uvicorn: a user
changes their own password through the form (CSRF token, no inline script
or style: a CSP violation would show in the console)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.hub.api_harness import Hub, browser_login, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_web_browser import browser_page  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

NEW = "a-brand-new-password-1"


def test_a_viewer_changes_their_password_on_the_account_page(live_hub: tuple[Hub, str], browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    _hub, url = live_hub
    page, seen = browser_page
    browser_login(page, url, "test-viewer")
    with page.expect_navigation():
        page.click("a.user-link")
    assert page.url == url + "/account"
    expect(page.locator("[data-account-name]")).to_have_text("test-viewer")

    page.fill("#current_password", "not my password")
    page.fill("#new_password", NEW)
    page.fill("#confirm_password", NEW)
    with page.expect_navigation():
        page.click("form.login-form button[type=submit]")
    expect(page.locator("[data-account-error]")).to_contain_text("current password is wrong")

    page.fill("#current_password", "viewer-password-1")
    page.fill("#new_password", NEW)
    page.fill("#confirm_password", NEW)
    with page.expect_navigation():
        page.click("form.login-form button[type=submit]")
    expect(page.locator("[data-account-changed]")).to_be_visible()
    # Still logged in in this browser.
    page.goto(url + "/")
    expect(page.locator("[data-user='test-viewer']")).to_be_visible()
    assert seen["dialog"] == [] and seen["pageerror"] == []
    assert [m for m in seen["console"] if "422" not in m] == [], seen["console"]
