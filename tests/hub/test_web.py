"""The dashboard's pages over a real SQLite hub (no browser; see
test_web_browser.py for Chromium): content, escaping, security headers and
the trigger form."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from sqlalchemy import func, select

from hub import events as ev
from hub.models import DagRun
from hub.web.views import task_groups
from tests.hub.api_harness import XSS, Hub, hub, seeded_sqlite_template  # noqa: F401  (fixtures)

CSP = "default-src 'self'"


class Page(HTMLParser):
    """The bits of a page the tests look at: tags with attributes, and text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(" ".join(data.split()))

    def find(self, tag: str, **attrs: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    @property
    def all_text(self) -> str:
        return " ".join(self.text)


def get_page(hub: Hub, path: str, status: int = 200) -> Page:
    with hub.client() as client:
        response = client.get(path)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["content-security-policy"].startswith(CSP)
    return Page(response.text)


def test_dag_list_shows_active_dags_with_schedule_state_last_run_and_a_trigger_button(hub: Hub) -> None:
    page = get_page(hub, "/")
    text = page.all_text
    assert "fleet_health" in text and "@hourly" in text and "reboot_one" in text
    assert "gone_dag" not in text  # its file was removed: not offered for triggering
    assert "paused" in text and "running" in text and "failed" in text
    forms = page.find("form", method="post")
    assert [f["action"] for f in forms] == ["/dags/fleet_health/trigger", "/dags/reboot_one/trigger"]
    assert page.find("a", href=f"/runs/{hub.seeded.run_running}")


def test_import_errors_are_shown_prominently_with_file_and_reason(hub: Hub) -> None:
    page = get_page(hub, "/")
    assert page.find("section", role="alert")
    assert "1 DAG file failed to load" in page.all_text
    assert "/dags/broken.py" in page.all_text and "SyntaxError: invalid syntax (broken.py, line 3)" in page.all_text


def test_dag_page_shows_tasks_dependencies_and_recent_runs(hub: Hub) -> None:
    page = get_page(hub, "/dags/fleet_health")
    text = page.all_text
    assert "diagnostics.collect" in text and "every agent" in text and "site=berlin" in text
    assert "_summarise()" in text and "collect" in text
    assert page.find("a", href=f"/runs/{hub.seeded.run_running}") and page.find("a", href=f"/runs/{hub.seeded.run_success}")
    assert page.find("textarea", name="conf")


def test_run_page_groups_fan_out_instances_under_their_task_with_agents(hub: Hub) -> None:
    page = get_page(hub, f"/runs/{hub.seeded.run_success}")
    rows = [(a["data-task-id"], a["data-map-index"]) for t, a in page.tags if t == "tr" and "data-task-id" in a]
    assert rows == [("collect", "0"), ("collect", "1"), ("collect", "2"), ("summarise", "-1")]
    assert "fan-out · 3 agents" in page.all_text and "3 success" in page.all_text
    assert [a["href"] for a in page.find("a") if (a["href"] or "").startswith("/agents/")] == ["/agents/edge-1", "/agents/edge-2", "/agents/edge-3"]
    assert len(page.find("details", **{"class": "json"})) == 4  # one collapsible output per task instance
    badges = {a["class"] for t, a in page.tags if t == "span" and (a.get("class") or "").startswith("badge ")}
    assert "badge badge-success" in badges


def test_run_page_shows_errors_collapsible(hub: Hub) -> None:
    page = get_page(hub, f"/runs/{hub.seeded.run_failed}")
    assert "exit status 1" in page.all_text and "badge badge-failed" in {a.get("class") for t, a in page.tags if t == "span"}


def test_agents_page_shows_online_state_and_last_seen_relative_and_absolute(hub: Hub) -> None:
    page = get_page(hub, "/agents")
    text = page.all_text
    assert "2 of 3 online" in text
    assert "5 s ago" in text and "2025-12-31 23:59:55 UTC" in text
    assert "3 h ago" in text and "2025-12-31 21:00:00 UTC" in text
    assert page.find("time", datetime="2025-12-31T23:59:55+00:00")


def test_device_supplied_strings_are_text_not_markup(hub: Hub) -> None:
    for path in ("/agents", "/agents/edge-2", f"/runs/{hub.seeded.run_running}"):
        with hub.client() as client:
            html = client.get(path).text
        assert "<img" not in html, path
        assert "&lt;img src=x onerror=alert(1)&gt;" in html, path
    assert XSS in get_page(hub, "/agents").all_text  # the user still sees what the device sent


def test_pages_have_no_inline_script_inline_style_or_external_assets(hub: Hub) -> None:
    with hub.client() as client:
        for path in ("/", "/dags/fleet_health", "/runs", f"/runs/{hub.seeded.run_success}", "/agents", "/agents/edge-1", "/runs/999999"):
            html = client.get(path).text
            page = Page(html)
            scripts = [a for t, a in page.tags if t == "script"]
            assert scripts == [{"src": "/static/app.js", "defer": None}], path
            assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), path
            assert not any("style" in a or any(k.startswith("on") for k in a) for _, a in page.tags), path
            assert not re.search(r"""(?:src|href)=["']?(?:https?:)?//""", html), path


def test_every_dashboard_response_carries_the_security_headers(hub: Hub) -> None:
    with hub.client() as client:
        responses = [client.get(p) for p in ("/", "/agents", "/static/app.js", "/static/app.css", "/static/favicon.svg", "/runs/999999")]
        responses.append(client.post("/dags/reboot_one/trigger", follow_redirects=False))
    for response in responses:
        assert response.headers["content-security-policy"].startswith(CSP), response.url
        assert response.headers["x-content-type-options"] == "nosniff"
    assert responses[2].headers["content-type"].startswith(("text/javascript", "application/javascript"))


def test_trigger_button_redirects_to_the_new_run_page(hub: Hub) -> None:
    triggered = hub.recorded(ev.RUN_TRIGGERED)
    with hub.client() as client:
        response = client.post("/dags/fleet_health/trigger", headers={"Origin": "http://testserver"}, follow_redirects=False)
        assert response.status_code == 303
        location = response.headers["location"]
        assert re.fullmatch(r"/runs/\d+", location)
        run_page = Page(client.get(location).text)
    assert triggered == [{"dag_id": "fleet_health", "run_pk": int(location.rsplit("/", 1)[1])}]
    rows = [a["data-task-id"] for t, a in run_page.tags if t == "tr" and "data-task-id" in a]
    assert rows == ["collect", "summarise"]


def test_trigger_form_passes_conf_and_refuses_bad_conf(hub: Hub) -> None:
    with hub.client() as client:
        ok = client.post("/dags/fleet_health/trigger", data={"conf": '{"site": "berlin"}'}, follow_redirects=False)
        assert ok.status_code == 303
        assert client.get("/api/v1" + ok.headers["location"]).json()["conf"] == {"site": "berlin"}
        bad = client.post("/dags/fleet_health/trigger", data={"conf": "[1, 2]"})
        assert bad.status_code == 422 and "conf must be a JSON object, not list" in Page(bad.text).all_text
        broken = client.post("/dags/fleet_health/trigger", data={"conf": "{"})
        assert broken.status_code == 422 and "conf is not valid JSON" in Page(broken.text).all_text
        missing = client.post("/dags/no_such_dag/trigger")
        assert missing.status_code == 404 and "no_such_dag" in Page(missing.text).all_text


@pytest.mark.parametrize("headers", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": "null"}])
def test_cross_site_trigger_posts_are_refused(hub: Hub, headers: dict[str, str]) -> None:
    with hub.client() as client:
        response = client.post("/dags/fleet_health/trigger", headers=headers, follow_redirects=False)
    assert response.status_code == 403 and "cross-site form posts are refused" in Page(response.text).all_text
    with hub.sessions() as session:
        assert session.scalar(select(func.count()).select_from(DagRun)) == 3


def test_missing_dag_run_and_agent_pages_are_404_pages(hub: Hub) -> None:
    assert "run 999999 not found" in get_page(hub, "/runs/999999", 404).all_text
    assert "DAG 'nope' not found" in get_page(hub, "/dags/nope", 404).all_text
    assert "agent 'nope' not found" in get_page(hub, "/agents/nope", 404).all_text


def test_live_update_script_refetches_the_page_and_swaps_main(hub: Hub) -> None:
    with hub.client() as client:
        js = client.get("/static/app.js").text
    assert "fetch(window.location.href" in js and 'querySelector("main")' in js and "replaceWith" in js
    assert get_page(hub, "/").find("main", data_refresh="5")
    assert get_page(hub, "/runs/999999", 404).find("main", data_refresh="0")  # error pages stay still


def test_task_groups_follow_the_dag_order_and_keep_tasks_that_left_the_dag() -> None:
    structure = {"tasks": [{"task_id": "a"}, {"task_id": "b"}]}
    tis = [
        {"task_id": "b", "map_index": 1, "state": "running"},
        {"task_id": "old", "map_index": -1, "state": "removed"},
        {"task_id": "b", "map_index": 0, "state": "success"},
        {"task_id": "a", "map_index": -1, "state": "success"},
    ]
    groups = task_groups(tis, structure)
    assert [g["task_id"] for g in groups] == ["a", "b", "old"]
    assert [ti["map_index"] for ti in groups[1]["instances"]] == [0, 1]
    assert groups[1]["mapped"] is True and groups[0]["mapped"] is False
    assert groups[1]["counts"] == {"running": 1, "success": 1}
    assert groups[2]["spec"] == {}
