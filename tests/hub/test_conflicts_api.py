"""Conflict records where the operator looks: the REST API, ``outpost
conflicts list`` and the dashboard, over conflicts made by the real hub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.db import make_engine
from shared.messages import Result, Status
from shared.topics import status_topic
from tests.hub.api_harness import XSS, Hub, LiveServer
from tests.hub.conftest import HubHarness
from tests.hub.test_ctl import Cli
from tests.hub.test_reconcile import ANY, assigns, give_up, started
from tests.hub.test_web import CSP, Page

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hub_db_url(tmp_path: Path) -> str:
    """SQLite only here: the rule itself runs on both stores in test_reconcile."""
    return f"sqlite:///{tmp_path / 'hub.db'}"


@pytest.fixture
def with_conflicts(make_hub: Any, hub_db_url: str) -> Iterator[tuple[HubHarness, Hub, int]]:
    """Run d: a1's try given up, its late success wins (device_success_wins),
    a2's retry then succeeds too (duplicate_success, with a hostile output)."""
    harness, run_pk = started(make_hub, ANY, "d", ("a1",))
    [first] = assigns(harness)
    harness.send("a1", Status("offline"), topic=status_topic("a1"))
    give_up(harness, run_pk)
    harness.agent_online("a2")
    harness.tick()
    second = assigns(harness)[-1]
    harness.send("a1", Result(first.assignment_id, 1, "success", {"from": "a1"}))
    harness.clock.advance(1)
    assert second_agent(harness, second.assignment_id) == "a2"
    harness.send("a2", Result(second.assignment_id, 2, "success", {"note": XSS}))
    engine = make_engine(hub_db_url)
    api = Hub(hub_db_url, engine, harness.sessions, harness.clock)
    yield harness, api, run_pk
    engine.dispose()


def second_agent(harness: HubHarness, assignment_id: str) -> str:
    from sqlalchemy import select

    from hub.models import Assignment

    with harness.sessions() as session:
        return session.scalar(select(Assignment.agent_id).where(Assignment.id == assignment_id))


def test_the_api_lists_conflicts_with_filters_counts_and_both_sides(with_conflicts: tuple[HubHarness, Hub, int]) -> None:
    _harness, api, run_pk = with_conflicts
    with api.client() as client:
        page = client.get("/api/v1/conflicts").json()
        assert page["total"] == 2 and page["counts"] == {"operator_wins": 0, "device_success_wins": 1, "duplicate_success": 1}
        newest, oldest = page["items"]
        assert (newest["rule"], oldest["rule"]) == ("duplicate_success", "device_success_wins")
        assert newest["overridden"]["output"] == {"note": XSS} and newest["kept"]["output"] == {"from": "a1"}
        assert oldest["overridden"] == {**oldest["overridden"], "type": "hub_decision", "kind": "execution_timeout"}
        assert (oldest["dag_id"], oldest["run_pk"], oldest["task_id"], oldest["map_index"]) == ("d", run_pk, "t", -1)
        assert [c["rule"] for c in client.get("/api/v1/conflicts", params={"rule": "device_success_wins"}).json()["items"]] == ["device_success_wins"]
        assert client.get("/api/v1/conflicts", params={"agent_id": "a1"}).json()["total"] == 1
        assert client.get("/api/v1/conflicts", params={"dag_id": "nope"}).json()["total"] == 0
        assert client.get("/api/v1/conflicts", params={"run": run_pk, "limit": 1}).json()["items"][0]["id"] == newest["id"]
        bad = client.get("/api/v1/conflicts", params={"rule": "last_writer_wins"})
        assert bad.status_code == 422 and "operator_wins, device_success_wins, duplicate_success" in bad.json()["error"]["message"]
        per_task = client.get(f"/api/v1/runs/{run_pk}/tasks/t/conflicts").json()
        assert per_task["total"] == 2
        assert client.get(f"/api/v1/runs/{run_pk}/tasks/after/conflicts").json()["total"] == 0


def test_the_dashboard_lists_conflicts_escaped_and_links_them_from_the_top_bar_and_the_run(with_conflicts: tuple[HubHarness, Hub, int]) -> None:
    _harness, api, run_pk = with_conflicts
    with api.client() as client:
        response = client.get("/conflicts")
        run_page = client.get(f"/runs/{run_pk}")
        filtered = client.get("/conflicts", params={"rule": "operator_wins"})
        bad = client.get("/conflicts", params={"run": "x"})
    assert response.status_code == 200 and response.headers["content-security-policy"].startswith(CSP)
    # The device's output is shown as text, never as markup.
    assert XSS not in response.text and "&lt;img src=x onerror=alert(1)&gt;" in response.text
    page = Page(response.text)
    assert page.find("a", href="/conflicts", aria_current="page")
    assert len([a for t, a in page.tags if t == "tr" and "data-conflict" in a]) == 2
    assert "device_success_wins" in page.all_text and "never lost to an automatic decision" in page.all_text
    assert Page(run_page.text).find("a", href=f"/conflicts?run={run_pk}")
    assert "No conflicts matching." in Page(filtered.text).all_text
    assert bad.status_code == 422


def test_outpost_conflicts_list(with_conflicts: tuple[HubHarness, Hub, int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    _harness, api, run_pk = with_conflicts
    monkeypatch.setenv("OUTPOST_TOKEN", api.token())
    with LiveServer(api.app) as server:
        cli = Cli(server.url, capsys)
        code, out, err = cli("conflicts", "list")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["ID", "DAG_ID", "RUN", "TASK", "AGENT", "RULE", "KEPT", "OVERRIDDEN", "RECORDED"]
        assert "duplicate_success" in lines[1] and "a1 success try 1" in lines[1]
        assert "device_success_wins" in lines[2] and "hub execution_timeout try 1" in lines[2]
        body = cli.json("conflicts", "list", "--rule", "device_success_wins")
        assert [c["rule"] for c in body["items"]] == ["device_success_wins"] and body["items"][0]["kept"]["output"] == {"from": "a1"}
        assert cli.json("conflicts", "list", "--run", str(run_pk), "--task", "t")["total"] == 2
        assert cli("conflicts", "list", "--agent", "nobody") == (0, "", "no conflicts\n")
        code, _, err = cli("conflicts", "list", "--task", "t")
        assert code == 2 and "--task needs --run" in err
