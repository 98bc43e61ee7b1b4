"""The run page's operator actions: rerun, clear with downstream, mark."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from hub.models import DagRun, TaskInstance
from tests.hub.api_harness import Hub, hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_web import Page

ORIGIN = {"Origin": "http://testserver"}


def _states(hub: Hub, run_pk: int) -> dict[tuple[str, int], str]:
    with hub.sessions() as session:
        return {(ti.task_id, ti.map_index): ti.state for ti in session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run_pk))}


def test_run_page_offers_rerun_and_task_actions(hub: Hub) -> None:
    assert hub.seeded is not None
    with hub.client() as client:
        page = Page(client.get(f"/runs/{hub.seeded.run_running}").text)
    forms = [a for t, a in page.tags if t == "form"]
    assert [f["action"] for f in forms] == [f"/runs/{hub.seeded.run_running}/action"] * 2
    buttons = [a.get("value") for t, a in page.tags if t == "button" and a.get("name") == "action"]
    assert buttons == ["rerun", "mark_run_success", "mark_run_failed", "clear", "mark_success", "mark_failed"]
    assert [a["value"] for t, a in page.tags if t == "option"] == ["collect", "summarise"]


def test_clear_with_downstream_then_rerun_from_the_run_page(hub: Hub) -> None:
    ids = hub.seeded
    assert ids is not None
    with hub.client() as client:
        marked = client.post(f"/runs/{ids.run_running}/action", data={"action": "mark_failed", "task_id": "collect"}, headers=ORIGIN, follow_redirects=False)
        assert marked.status_code == 303 and marked.headers["location"] == f"/runs/{ids.run_running}"
        assert _states(hub, ids.run_running) == {("collect", 0): "failed", ("collect", 1): "failed", ("summarise", -1): "none"}
        cleared = client.post(f"/runs/{ids.run_running}/action", data={"action": "clear", "task_id": "collect", "downstream": "1"}, headers=ORIGIN, follow_redirects=False)
        assert cleared.status_code == 303
        assert set(_states(hub, ids.run_running).values()) == {"none"}
        rerun = client.post(f"/runs/{ids.run_success}/action", data={"action": "rerun"}, headers=ORIGIN, follow_redirects=False)
        assert rerun.status_code == 303
        failed = client.post(f"/runs/{ids.run_running}/action", data={"action": "mark_run_failed"}, headers=ORIGIN, follow_redirects=False)
        assert failed.status_code == 303
        assert set(_states(hub, ids.run_running).values()) == {"skipped"}
        finished_page = Page(client.get(f"/runs/{ids.run_running}").text)
        assert [a.get("value") for t, a in finished_page.tags if t == "button"][:1] == ["rerun"]
        assert "mark_run_failed" not in [a.get("value") for t, a in finished_page.tags if t == "button"]
    with hub.sessions() as session:
        assert session.get(DagRun, ids.run_success).clear_number == 1


@pytest.mark.parametrize(
    ("data", "headers", "status", "message"),
    [
        ({"action": "explode", "task_id": "collect"}, ORIGIN, 422, "unknown action 'explode'"),
        ({"action": "clear"}, ORIGIN, 422, "choose a task first"),
        ({"action": "mark_success", "task_id": "nope"}, ORIGIN, 422, "has no task 'nope'"),
        ({"action": "rerun"}, {"Origin": "http://evil.example"}, 403, "cross-site form posts are refused"),
    ],
)
def test_bad_run_actions_are_refused_with_a_reason(hub: Hub, data: dict[str, str], headers: dict[str, str], status: int, message: str) -> None:
    assert hub.seeded is not None
    before = _states(hub, hub.seeded.run_running)
    with hub.client() as client:
        response = client.post(f"/runs/{hub.seeded.run_running}/action", data=data, headers=headers, follow_redirects=False)
    assert response.status_code == status and message in Page(response.text).all_text
    assert _states(hub, hub.seeded.run_running) == before


def test_pools_page_lists_pools_and_deadline_misses(hub: Hub) -> None:
    from datetime import timedelta

    from hub import actions
    from hub.db import transaction
    from hub.models import DeadlineMiss
    from shared.clock import to_datetime
    from tests.hub.api_harness import START, XSS

    assert hub.seeded is not None
    actions.set_pool(hub.sessions, "uplink", 3, XSS)
    t0 = to_datetime(START)
    with transaction(hub.sessions) as session:
        session.add(DeadlineMiss(run_pk=hub.seeded.run_running, dag_id="fleet_health", run_id="r", task_id="summarise", kind="task_sla",
                                 deadline=t0 - timedelta(minutes=1), detected_at=t0, description="task summarise had not succeeded 60 s after its logical date (sla)"))
    with hub.client() as client:
        response = client.get("/pools")
    assert response.status_code == 200
    page = Page(response.text)
    assert [a["data-pool"] for t, a in page.tags if t == "tr" and "data-pool" in a] == ["default_pool", "uplink"]
    assert XSS in page.all_text and "<img" not in response.text.split("<main", 1)[1].split("uplink", 1)[1].split("</tr>", 1)[0]
    assert "had not succeeded 60 s after its logical date" in page.all_text
    assert ("a", {"href": f"/runs/{hub.seeded.run_running}"}) in [(t, {k: v for k, v in a.items() if k == "href"}) for t, a in page.tags if t == "a"]
