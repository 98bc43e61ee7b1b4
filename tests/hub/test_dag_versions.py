"""DAG versions: each parse that changes a DAG's structure stores a new
version; a run keeps the version it started with."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from hub.dagprocessor import structure_hash
from hub.models import Dag, DagRun, DagVersion, TaskInstance
from shared.clock import utcnow
from shared.states import TaskState

TWO_TASKS = """
from hub.dag import DAG, AgentOperator
with DAG("fleet") as dag:
    AgentOperator(task_id="collect", job_type="noop") >> AgentOperator(task_id="report", job_type="noop")
"""
# The next version: "report" is gone, "summarise" is new.
REWRITTEN = """
from hub.dag import DAG, AgentOperator
with DAG("fleet") as dag:
    AgentOperator(task_id="collect", job_type="noop") >> AgentOperator(task_id="summarise", job_type="noop")
"""


def rewrite(hub: Any, text: str, mtime: float) -> None:
    path = Path(hub.scheduler.dagbag.folder) / "fleet.py"
    path.write_text(text)
    os.utime(path, (mtime, mtime))  # a new mtime, whatever the file system's resolution
    hub.scheduler.parse_dags(utcnow(hub.clock), force=True)


def versions(hub: Any) -> list[DagVersion]:
    with hub.sessions() as session:
        return list(session.scalars(select(DagVersion).where(DagVersion.dag_id == "fleet").order_by(DagVersion.version_number)))


def test_a_changed_structure_makes_a_new_version_and_an_unchanged_one_does_not(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": TWO_TASKS})
    [first] = versions(hub)
    assert first.version_number == 1
    assert first.structure_hash == structure_hash(first.structure)
    assert first.fileloc.endswith("fleet.py")
    rewrite(hub, TWO_TASKS + "\n# a comment changes the file, not the structure\n", mtime=100)
    assert [v.version_number for v in versions(hub)] == [1]
    rewrite(hub, REWRITTEN, mtime=200)
    old, new = versions(hub)
    assert (old.id, new.version_number) == (first.id, 2)
    assert [t["task_id"] for t in new.structure["tasks"]] == ["collect", "summarise"]
    with hub.sessions() as session:
        dag = session.get(Dag, "fleet")
        assert dag is not None and dag.latest_version_id == new.id and dag.structure == new.structure
    rewrite(hub, TWO_TASKS, mtime=300)  # back to the first structure: a new version, numbers only grow
    assert [v.version_number for v in versions(hub)] == [1, 2, 3]
    assert versions(hub)[2].structure_hash == first.structure_hash


def test_a_run_keeps_the_version_it_started_with(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": TWO_TASKS})
    hub.agent_online("dev-1")
    old_run = hub.trigger("fleet")
    rewrite(hub, REWRITTEN, mtime=100)
    new_run = hub.trigger("fleet")
    with hub.sessions() as session:
        version_of = {r.id: r.dag_version_id for r in session.scalars(select(DagRun))}
    v1, v2 = versions(hub)
    assert (version_of[old_run], version_of[new_run]) == (v1.id, v2.id)
    hub.tick()
    # "report" is not in the new version, but the old run follows version 1: not REMOVED.
    old = {t.task_id: t for t in hub.tis(old_run)}
    assert set(old) == {"collect", "report"}
    assert old["report"].state == TaskState.NONE
    assert {t.task_id for t in hub.tis(new_run)} == {"collect", "summarise"}
    # Its upstream succeeds: "report" runs, by version 1's dependencies.
    with hub.sessions.begin() as session:
        session.execute(update(TaskInstance).where(TaskInstance.id == old["collect"].id).values(state=TaskState.SUCCESS, ended_at=utcnow(hub.clock)))
    hub.tick()
    report = next(t for t in hub.tis(old_run) if t.task_id == "report")
    assert (report.state, report.agent_id) == (TaskState.QUEUED, "dev-1")


def test_runs_from_before_versions_follow_the_dag_structure(make_hub: Any) -> None:
    hub = make_hub({"fleet.py": TWO_TASKS})
    run_pk = hub.trigger("fleet")
    with hub.sessions.begin() as session:
        session.execute(update(DagRun).where(DagRun.id == run_pk).values(dag_version_id=None))
    rewrite(hub, REWRITTEN, mtime=100)
    hub.tick()
    states = {t.task_id: t.state for t in hub.tis(run_pk)}
    # Without a version the run follows the DAG as parsed now, as before versions existed.
    assert states["report"] == TaskState.REMOVED


def test_versions_are_listed_by_the_api_and_shown_on_the_dashboard(make_hub: Any) -> None:
    from fastapi.testclient import TestClient

    from hub.api.app import create_app
    from tests.hub.api_harness import admin_headers, hub_settings
    from hub.events import EventBus
    from hub.web import views

    hub = make_hub({"fleet.py": TWO_TASKS})
    first_run = hub.trigger("fleet")
    rewrite(hub, REWRITTEN, mtime=100)
    app = create_app(hub_settings(), hub.sessions, EventBus(), hub.clock, extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()})
    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        page = client.get("/api/v1/dags/fleet/versions").json()
        assert [(v["version_number"], v["is_latest"], v["task_count"], v["run_count"]) for v in page["items"]] == [(2, True, 2, 0), (1, False, 2, 1)]
        assert page["total"] == 2
        one = client.get("/api/v1/dags/fleet/versions/1").json()
        assert [t["task_id"] for t in one["structure"]["tasks"]] == ["collect", "report"]
        missing = client.get("/api/v1/dags/fleet/versions/9")
        assert missing.status_code == 404 and "no version 9" in missing.json()["error"]["message"]
        assert client.get("/api/v1/dags/nope/versions").status_code == 404
        assert client.get("/api/v1/dags/fleet").json()["latest_version_number"] == 2
        run = client.get(f"/api/v1/runs/{first_run}").json()
        assert run["dag_version_number"] == 1
        # The run's page lists the tasks of its version, "report" included.
        run_page = client.get(f"/runs/{first_run}").text
        assert "v1" in run_page and 'data-task-id="report"' in run_page
        dag_page = client.get("/dags/fleet").text
        assert "Versions" in dag_page and "v2" in dag_page and "latest" in dag_page


def test_the_dag_page_says_when_its_file_now_fails(make_hub: Any) -> None:
    from fastapi.testclient import TestClient

    from hub.api.app import create_app
    from tests.hub.api_harness import admin_headers, hub_settings
    from hub.events import EventBus
    from hub.web import views

    hub = make_hub({"fleet.py": TWO_TASKS})
    rewrite(hub, TWO_TASKS + "\nraise RuntimeError('inventory service down')\n", mtime=100)
    app = create_app(hub_settings(), hub.sessions, EventBus(), hub.clock, extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()})
    with TestClient(app, headers=admin_headers(hub.sessions)) as client:
        page = client.get("/dags/fleet").text
        assert "last good version keeps running" in page and "inventory service down" in page
        errors = client.get("/api/v1/import-errors").json()["items"]
        assert [(Path(e["fileloc"]).name, e["kind"]) for e in errors] == [("fleet.py", "import")]
        assert client.get("/api/v1/dags/fleet").json()["is_active"] is True


def test_outpost_dags_versions_lists_them_newest_first(make_hub: Any, capsys: Any, monkeypatch: Any) -> None:
    from hub.api.app import create_app
    from tests.hub.api_harness import hub_settings, make_token
    from hub.ctl import main
    from hub.events import EventBus
    from tests.hub.api_harness import LiveServer

    hub = make_hub({"fleet.py": TWO_TASKS})
    run_pk = hub.trigger("fleet")
    rewrite(hub, REWRITTEN, mtime=100)
    v1, v2 = versions(hub)
    monkeypatch.setenv("OUTPOST_TOKEN", make_token(hub.sessions))
    with LiveServer(create_app(hub_settings(), hub.sessions, EventBus(), hub.clock)) as server:
        capsys.readouterr()
        assert main(["--hub", server.url, "dags", "versions", "fleet"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].split() == ["VERSION", "CREATED", "TASKS", "RUNS", "HASH", "FILELOC"]
        assert lines[1].split()[:3] == ["2", "(latest)", "2026-01-01"] and v2.structure_hash[:12] in lines[1]
        assert lines[2].split()[0] == "1" and lines[2].split()[4] == "1"  # one run follows version 1
        assert main(["--hub", server.url, "runs", "show", str(run_pk)]) == 0
        assert "dag_version:  1" in capsys.readouterr().out
        assert main(["--hub", server.url, "dags", "versions", "nope"]) != 0
        assert "nope" in capsys.readouterr().err
