"""The dashboard in headless Chromium, served by uvicorn on a loopback port.

Needs /usr/bin/chromium (``./dev setup`` installs it); without it these
tests fail, they never skip.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

import pytest

from hub.db import transaction
from hub.models import Agent
from tests.hub.api_harness import XSS, Hub, browser_login, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = "/tmp/outpost-dashboard.png"
# Installed before any page script runs (through DevTools, so the page's CSP does not apply to it).
RECORD_CSP = "window.__csp = []; document.addEventListener('securitypolicyviolation', e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"


@pytest.fixture
def browser_page() -> Iterator[tuple[Any, dict[str, list[str]]]]:
    """A Chromium page plus what it reported: console errors, page errors, dialogs."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install the 'chromium' package (./dev setup does); the dashboard browser tests cannot run without it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        seen: dict[str, list[str]] = {"console": [], "pageerror": [], "dialog": []}
        page.on("console", lambda msg: seen["console"].append(f"{msg.type}: {msg.text}") if msg.type in ("error", "warning") else None)
        page.on("pageerror", lambda exc: seen["pageerror"].append(str(exc)))

        def on_dialog(dialog: Any) -> None:
            seen["dialog"].append(dialog.message)
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.add_init_script(RECORD_CSP)
        try:
            yield page, seen
        finally:
            browser.close()


def test_dashboard_in_a_real_browser(live_hub: tuple[Hub, str], browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    hub_, url = live_hub
    page, seen = browser_page
    csp: list[str] = []
    browser_login(page, url)  # the real login form; the session cookie is Secure, and Chromium keeps it on http://127.0.0.1

    # DAG list: import errors up front, then trigger a run from its button.
    page.goto(url + "/")
    expect(page.get_by_role("heading", name="DAGs", exact=True)).to_be_visible()
    expect(page.get_by_role("alert")).to_contain_text("/dags/broken.py")
    csp += page.evaluate("window.__csp")
    page.get_by_role("button", name="Trigger fleet_health").click()

    # The run page of the new run, with its task rows.
    page.wait_for_url(re.compile(r".*/runs/\d+$"))
    expect(page.locator("tr[data-task-id]")).to_have_count(2)
    expect(page.locator("tr[data-task-id='collect']")).to_contain_text("none")
    csp += page.evaluate("window.__csp")

    # Agents: the hostile hostname is text, and no dialog fires.
    page.goto(url + "/agents")
    expect(page.locator("tr[data-agent-id='edge-2'] .hostname")).to_have_text(XSS)
    assert page.locator("main img").count() == 0
    expect(page.get_by_text("2 of 3 online")).to_be_visible()

    # Live update: the page follows the database without a reload.
    with transaction(hub_.sessions) as session:
        agent = session.get(Agent, "edge-2")
        assert agent is not None
        agent.state = "online"
    page.evaluate("window.__notReloaded = true")
    expect(page.get_by_text("3 of 3 online")).to_be_visible(timeout=15_000)
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("[data-live-status]")).to_contain_text("updated")
    csp += page.evaluate("window.__csp")

    # The fan-out run, for the screenshot: open one output first.
    page.goto(f"{url}/runs/{hub_.seeded.run_success}")
    page.locator("tr[data-map-index='0'] details summary").click()
    expect(page.locator("tr[data-map-index='0'] details pre")).to_contain_text("free_bytes")
    page.screenshot(path=SCREENSHOT, full_page=True)
    csp += page.evaluate("window.__csp")

    assert seen["dialog"] == [], "a device-supplied string ran as script"
    assert csp == [], f"Content-Security-Policy violations: {csp}"
    assert seen["console"] == [] and seen["pageerror"] == [], seen


def test_security_events_page_shows_hostile_text_as_text(live_hub: tuple[Hub, str], browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    """Security events carry attacker-chosen bytes (excerpts, device ids in
    details): the page shows them as text, no script runs, no CSP violation."""
    from playwright.sync_api import expect

    from hub import security
    from shared.clock import utcnow

    hub_, url = live_hub
    page, seen = browser_page
    with transaction(hub_.sessions) as session:
        session.add(security.event(utcnow(hub_.clock), "edge-2", "mqtt", "bad_signature", f"forged by {XSS}", XSS.encode()))
        session.add(security.event(utcnow(hub_.clock), "edge-1", "agent", "replayed", "assign sequence number 7 was already used", "m-7"))
    browser_login(page, url)
    page.goto(url + "/")
    page.get_by_role("link", name="Security").click()
    page.wait_for_url(url + "/security")
    expect(page.get_by_role("heading", name="Security events")).to_be_visible()
    expect(page.locator("tr[data-security-event]")).to_have_count(2)
    expect(page.locator("main")).to_contain_text(f"forged by {XSS}")
    assert page.locator("main img").count() == 0
    page.get_by_role("link", name="1 replayed").click()
    expect(page.locator("tr[data-security-event]")).to_have_count(1)
    assert seen["dialog"] == [], "an excerpt ran as script"
    assert page.evaluate("window.__csp") == []
    assert seen["console"] == [] and seen["pageerror"] == [], seen
