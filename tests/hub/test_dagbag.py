"""DAG files: good ones load, broken ones are reported with file and reason,
and one broken file never stops the others."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select

from hub.dagbag import DagBag
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.models import Dag, DagImportError
from shared.clock import ManualClock, utcnow

GOOD = """
from hub.dag import DAG, AgentOperator, PythonOperator
with DAG("good") as dag:
    a = AgentOperator(task_id="a", job_type="noop")
    b = PythonOperator(task_id="b", python_callable=lambda: 1)
    a >> b
"""
SYNTAX = "from hub.dag import DAG\nwith DAG('broken' as dag:\n    pass\n"
CYCLE = """
from hub.dag import DAG, AgentOperator
with DAG("loop") as dag:
    a = AgentOperator(task_id="a", job_type="noop")
    b = AgentOperator(task_id="b", job_type="noop")
    c = AgentOperator(task_id="c", job_type="noop")
    a >> b >> c >> a
"""
RAISES = "raise RuntimeError('cannot reach the inventory service')\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_invalid_files_are_reported_and_good_dags_still_load(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    write(tmp_path, "syntax.py", SYNTAX)
    write(tmp_path, "cycle.py", CYCLE)
    write(tmp_path, "raises.py", RAISES)
    bag = DagBag(tmp_path)
    bag.collect()
    assert set(bag.dags) == {"good"}
    errors = {Path(e.fileloc).name: e for e in bag.errors.values()}
    assert errors["syntax.py"].kind == "syntax"
    assert "line 2" in errors["syntax.py"].error
    assert errors["cycle.py"].kind == "cycle"
    assert "a >> b >> c >> a" in errors["cycle.py"].error
    assert errors["raises.py"].kind == "import"
    assert "cannot reach the inventory service" in errors["raises.py"].error


def test_import_errors_are_stored_and_cleared_when_fixed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    folder = tmp_path / "dags"
    folder.mkdir()
    write(folder, "good.py", GOOD)
    broken = write(folder, "cycle.py", CYCLE)
    bag = DagBag(folder)
    now = utcnow(ManualClock())
    bag.collect()
    with transaction(sessions) as session:
        bag.sync_to_db(session, now)
    with sessions() as session:
        assert [d.dag_id for d in session.scalars(select(Dag))] == ["good"]
        [err] = session.scalars(select(DagImportError)).all()
        assert err.fileloc == str(broken) and err.kind == "cycle"
    broken.write_text(CYCLE.replace("c >> a", "c"))
    os.utime(broken, (1, 1))  # a new mtime, whatever the file system's resolution
    assert bag.collect()
    with transaction(sessions) as session:
        bag.sync_to_db(session, now)
    with sessions() as session:
        assert sorted(d.dag_id for d in session.scalars(select(Dag))) == ["good", "loop"]
        assert session.scalars(select(DagImportError)).all() == []


def test_a_file_that_breaks_keeps_its_last_good_dag(tmp_path: Path) -> None:
    path = write(tmp_path, "good.py", GOOD)
    bag = DagBag(tmp_path)
    bag.collect()
    path.write_text(GOOD + "\ndef broken(:\n")
    os.utime(path, (2, 2))
    bag.collect()
    assert "good" in bag.dags
    assert bag.errors[str(path)].kind == "syntax"


def test_removed_file_marks_its_dag_inactive(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    folder = tmp_path / "dags"
    folder.mkdir()
    path = write(folder, "good.py", GOOD)
    bag = DagBag(folder)
    now = utcnow(ManualClock())
    bag.collect()
    with transaction(sessions) as session:
        bag.sync_to_db(session, now)
    path.unlink()
    bag.collect()
    with transaction(sessions) as session:
        bag.sync_to_db(session, now)
    with sessions() as session:
        assert session.get(Dag, "good").is_active is False  # type: ignore[union-attr]


def test_agent_task_params_are_checked_against_the_job_schema_at_parse_time(tmp_path: Path) -> None:
    write(tmp_path, "bad_params.py", """
from hub.dag import DAG, AgentOperator
with DAG("bad_params") as dag:
    AgentOperator(task_id="run", job_type="command.run", params={"argv": [], "timeout": 99999})
""")
    write(tmp_path, "custom_job.py", """
from hub.dag import DAG, AgentOperator
with DAG("custom_job") as dag:
    AgentOperator(task_id="x", job_type="acme.calibrate", params={"anything": 1})  # only on some devices
""")
    bag = DagBag(tmp_path)
    bag.collect()
    assert set(bag.dags) == {"custom_job"}
    [err] = bag.errors.values()
    assert err.kind == "invalid"
    assert "task 'run' (command.run)" in err.error and "argv" in err.error
