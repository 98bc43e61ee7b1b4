"""The rollout pages of the dashboard: the list, the rollout page (phase,
counts, failure rate against the threshold, devices with links to their
tries' logs), the pause/resume/abort form (operator role, same-origin,
CSRF in a browser session), and one page and one action in Chromium."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.hub.api_harness import Hub, LiveServer, browser_login
from tests.hub.test_rollouts import dag, fleet, open_work, report, rollout, succeed_all
from tests.hub.test_rollouts_api import api  # noqa: F401  (fixture)
from tests.hub.test_web import Page
from tests.hub.test_web_browser import browser_page  # noqa: F401  (fixture)

ORIGIN = {"Origin": "http://testserver"}


def test_the_list_and_the_rollout_page(api: tuple[Any, Hub]) -> None:
    harness, hub = api
    report(harness, "dev000", ok=False)
    harness.tick()
    record = rollout(harness)
    with hub.client("viewer") as client:
        listing = Page(client.get("/rollouts").text)
        assert listing.find("tr", data_rollout=str(record.id)) and "aborted" in listing.all_text
        assert Page(client.get("/rollouts?state=running").text).find("tr", data_rollout=str(record.id)) == []
        bad = client.get("/rollouts?state=exploded")
        assert bad.status_code == 422 and "unknown rollout state" in bad.text
        page = Page(client.get(f"/rollouts/{record.id}").text)
        meter = page.find("meter")[0]
        assert (meter["value"], meter["high"]) == ("1.0", "0.25")
        assert "100.0% failed of finished devices; aborts above 25.0%" in page.all_text
        assert [a["href"] for a in page.find("a", data_log="1")] == [f"/runs/{record.run_pk}/tasks/{_ti(harness, 'dev000')}/tries/1/log"]
        assert [a.get("data-device") for t, a in page.tags if t == "tr" and a.get("data-device")] == [f"dev{i:03d}" for i in range(6)]
        assert page.find("form", method="post") == [] or all(f["action"] == "/logout" for f in page.find("form", method="post"))  # aborted: no actions
        failed_only = Page(client.get(f"/rollouts/{record.id}?state=failed").text)
        assert [a.get("data-device") for t, a in failed_only.tags if a.get("data-device")] == ["dev000"]
        assert client.get("/rollouts/999").status_code == 404


def _ti(harness: Any, agent_id: str) -> int:
    from sqlalchemy import select

    from hub.models import RolloutDevice

    with harness.sessions() as session:
        return int(session.scalar(select(RolloutDevice.ti_id).where(RolloutDevice.agent_id == agent_id)))


def test_the_action_form_pauses_and_resumes_and_viewers_get_no_form(api: tuple[Any, Hub]) -> None:
    harness, hub = api
    rollout_id = rollout(harness).id
    with hub.client("viewer") as client:
        assert not [a for t, a in Page(client.get(f"/rollouts/{rollout_id}").text).tags if t == "button"]
        assert client.post(f"/rollouts/{rollout_id}/action", data={"action": "pause"}, headers=ORIGIN).status_code == 403
    with hub.client("operator") as client:
        buttons = [a["value"] for t, a in Page(client.get(f"/rollouts/{rollout_id}").text).tags if t == "button" and a.get("name") == "action"]
        assert buttons == ["pause", "abort"]
        done = client.post(f"/rollouts/{rollout_id}/action", data={"action": "pause", "reason": "lunch"}, headers=ORIGIN, follow_redirects=False)
        assert done.status_code == 303 and done.headers["location"] == f"/rollouts/{rollout_id}"
        assert (rollout(harness).state, rollout(harness).reason) == ("paused", "lunch")
        again = client.post(f"/rollouts/{rollout_id}/action", data={"action": "pause"}, headers=ORIGIN)
        assert again.status_code == 409 and "cannot be paused" in again.text
        assert client.post(f"/rollouts/{rollout_id}/action", data={"action": "explode"}, headers=ORIGIN).status_code == 422
        assert client.post(f"/rollouts/{rollout_id}/action", data={"action": "resume"}, headers={"Origin": "http://evil.example"}).status_code == 403
        assert client.post(f"/rollouts/{rollout_id}/action", data={"action": "resume"}, headers=ORIGIN, follow_redirects=False).status_code == 303
    assert rollout(harness).state == "running"


@pytest.mark.browser
@pytest.mark.timeout(120)
def test_a_rollout_page_and_its_abort_button_in_a_browser(make_hub: Any, browser_page: tuple[Any, dict[str, list[str]]]) -> None:
    from playwright.sync_api import expect

    harness = make_hub(dag("canary=1, batch_size=2, failure_threshold=0.25"))
    fleet(harness, 5)
    harness.trigger("fw")
    harness.tick()
    succeed_all(harness)
    engine = harness.sessions.kw["bind"]
    hub = Hub(engine.url.render_as_string(hide_password=False), engine, harness.sessions, harness.clock)
    hub.token("operator")  # creates the test operator
    record = rollout(harness)
    page, seen = browser_page
    with LiveServer(hub.app) as server:
        browser_login(page, server.url, "test-operator", next_path=f"/rollouts/{record.id}")
        page.wait_for_url(re.compile(rf".*/rollouts/{record.id}$"))
        expect(page.get_by_role("heading", name=re.compile(rf"Rollout #{record.id}"))).to_contain_text("running")
        expect(page.locator("[data-phase]")).to_have_text("batches")
        expect(page.locator("[data-count='succeeded']")).to_have_text("1 succeeded")
        expect(page.locator("[data-count='notified']")).to_have_text("2 notified")
        expect(page.locator("tr[data-device]")).to_have_count(5)
        page.screenshot(path="/tmp/outpost-rollout.png", full_page=True)
        page.fill("#rollout-reason", "wrong image")
        page.get_by_role("button", name="Abort").click()
        page.wait_for_url(re.compile(rf".*/rollouts/{record.id}$"))
        expect(page.locator("[data-rollout-state]")).to_contain_text("aborted")
        expect(page.locator("[data-rollout-reason]")).to_have_text("wrong image")
        expect(page.locator("[data-count='skipped']")).to_have_text("2 skipped")
        expect(page.get_by_role("button", name="Abort")).to_have_count(0)
        csp = page.evaluate("window.__csp")
    assert sorted(open_work(harness)) == ["dev001", "dev002"]  # in flight: they finish
    assert csp == [] and seen["console"] == [] and seen["pageerror"] == [], (csp, seen)
