"""The pages an operator opens after a device came back from offline, in
headless Chromium: the conflicts list, the log of the try the hub took back,
and the device's page with its clock flagged. The state is made by the real
hub (offline_grace re-target, late results, a skewed heartbeat); the device
supplied hostile strings (label, hostname, log line, output), which must
show as text and never run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hub.api.app import create_app
from hub.web import views
from shared.messages import Heartbeat, JobTypeInfo, LogChunk, Result, Status
from shared.topics import status_topic
from tests.hub.api_harness import XSS, LiveServer, browser_login, hub_settings, make_token
from tests.hub.test_offline_conflicts import retargeted, skewed_return, ti_of
from tests.hub.test_web_browser import browser_page  # noqa: F401 (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

SCRIPT = "<script>alert('log')</script>"


@pytest.fixture
def hub_db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.db'}"


def test_conflicts_log_and_flagged_agent_pages_in_a_real_browser(make_hub: Any, browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    hub, run_pk, old, new = retargeted(make_hub)
    skewed_return(hub, "a1", -86400.0)
    # Its status, like everything it sends, is the device's to word.
    hub.send("a1", Status("online", "0.1.0", XSS, {"site": XSS}, (JobTypeInfo("noop", "1.0"),)), topic=status_topic("a1"))
    # Its stamps never go back, so the skew shown is the one its heartbeat's wall clock gives.
    hub.send("a1", Heartbeat("0.1.0", clock=hub.clock.now() - 86400.0))
    hub.send("a1", LogChunk(old, 0, f"starting\n{XSS}\n{SCRIPT}\n", final=True))
    hub.send("a1", Result(old, 1, "success", output={"note": XSS}))
    hub.send("a2", Result(new, 2, "success", output={"note": SCRIPT}))
    ti = ti_of(hub, run_pk, "work")
    assert (ti.state, ti.output) == ("success", {"note": XSS})

    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock, extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()})
    page, seen = browser_page
    csp: list[str] = []

    def settled() -> None:
        """What this page reported, and that nothing the device sent became markup."""
        csp.extend(page.evaluate("window.__csp"))
        assert page.evaluate("document.querySelectorAll('main img, main script, main iframe').length") == 0, page.url

    make_token(hub.sessions)  # creates the test admin
    with LiveServer(app) as server:
        url = server.url
        browser_login(page, url)
        page.goto(url + "/conflicts")
        expect(page.locator("tr[data-conflict]")).to_have_count(2)
        expect(page.locator("main")).to_contain_text("device_success_wins")
        expect(page.locator("main")).to_contain_text("duplicate_success")
        expect(page.locator("main")).to_contain_text("untrusted clock")
        expect(page.locator("main")).to_contain_text(XSS)
        settled()

        page.goto(f"{url}/runs/{run_pk}/tasks/{ti.id}/tries/1/log")
        expect(page.locator("pre.log")).to_contain_text(XSS)
        expect(page.locator("pre.log")).to_contain_text(SCRIPT)
        expect(page.locator("main")).to_contain_text("a1")
        settled()

        page.goto(f"{url}/agents/a1")
        expect(page.locator(".clock-flagged")).to_contain_text("clock not trusted")
        expect(page.locator(".clock-flagged")).to_contain_text("-86400.0 s")
        expect(page.locator("main")).to_contain_text(XSS)
        settled()

        page.goto(f"{url}/agents")
        expect(page.locator("tr[data-agent-id='a1'] .clock-flagged")).to_be_visible()
        settled()
        page.goto(f"{url}/runs/{run_pk}")
        expect(page.locator("main")).to_contain_text("work")
        settled()

    assert seen["dialog"] == [], "a device-supplied string ran as script"
    assert csp == [], f"Content-Security-Policy violations: {csp}"
    assert seen["console"] == [] and seen["pageerror"] == [], seen
