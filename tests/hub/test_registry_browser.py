"""The dashboard's device registry in headless Chromium: the filter form
narrows the agent list (the API's filters, as a GET query), a bad firmware
range is shown, not crashed on, and the agent page shows the inventory."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.hub.api_harness import Hub, browser_login, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_registry import fleet_of
from tests.hub.test_web_browser import browser_page  # noqa: F401  (fixture)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


def rows(page: Any) -> list[str]:
    return page.locator("tr[data-agent-id]").evaluate_all("rows => rows.map(r => r.dataset.agentId)")


def test_filtering_the_agent_list_in_a_real_browser(live_hub: tuple[Hub, str], browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    hub_, url = live_hub
    fleet_of(hub_)
    page, seen = browser_page
    browser_login(page, url, "test-viewer", next_path="/agents")
    page.goto(url + "/agents")
    assert rows(page) == ["edge-1", "edge-2", "edge-3"]
    expect(page.locator("tr[data-agent-id=edge-2] td.hardware")).to_have_text("cm4")

    form = page.locator("form#agent-filters")
    form.get_by_label("Group").fill("berlin")
    form.get_by_label("Firmware").fill(">=1.2,<2.0")
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()
    assert rows(page) == ["edge-1", "edge-3"]
    assert parse_qs(urlsplit(page.url).query)["firmware"] == [">=1.2,<2.0"]
    expect(form.get_by_label("Firmware")).to_have_value(">=1.2,<2.0")  # the form shows what it filtered by
    expect(page.locator("tr[data-agent-id=edge-1] td.groups")).to_contain_text("canary")

    form.get_by_label("State").select_option("false")
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No agents match the filter.")).to_be_visible()

    form.get_by_label("State").select_option("")
    form.get_by_label("Firmware").fill(">=1.2,~2")
    with page.expect_navigation():
        form.get_by_role("button", name="Filter").click()
    expect(page.get_by_role("alert")).to_contain_text("'~2'")

    page.goto(url + "/agents?hardware=rpi4&q=berlin-1")
    assert rows(page) == ["edge-1"]
    page.locator("tr[data-agent-id=edge-1] a").first.click()
    expect(page.locator("table.inventory")).to_contain_text("mem_total_bytes")
    expect(page.locator("dd.firmware")).to_have_text("1.2.0")
    assert seen["pageerror"] == [] and [m for m in seen["console"] if "error" in m and "400" not in m] == []
    assert page.evaluate("window.__csp") == []
