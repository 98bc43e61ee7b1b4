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
