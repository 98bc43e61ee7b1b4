"""Loading DAG files (what the parsing process does, and what the in-process
``DagBag`` does for code that needs the Python objects): good files load,
broken ones are reported with file and reason, one broken file never stops
the others."""

from __future__ import annotations

import os
from pathlib import Path

from hub.dagbag import DagBag, load_file, parse_file

GOOD = """
from hub.dag import DAG, AgentOperator, PythonOperator
with DAG("good", description="checks", tags=["fleet"]) as dag:
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
    write(tmp_path, "empty.py", "X = 1\n")
    write(tmp_path, "_helper.py", RAISES)  # '_' files are helpers: never loaded on their own
    bag = DagBag(tmp_path)
    bag.collect()
    assert set(bag.dags) == {"good"}
    errors = {Path(e.fileloc).name: e for e in bag.errors.values()}
    assert set(errors) == {"syntax.py", "cycle.py", "raises.py", "empty.py"}
    assert errors["syntax.py"].kind == "syntax"
    assert "line 2" in errors["syntax.py"].error
    assert errors["cycle.py"].kind == "cycle"
    assert "a >> b >> c >> a" in errors["cycle.py"].error
    assert errors["raises.py"].kind == "import"
    assert "cannot reach the inventory service" in errors["raises.py"].error
    assert errors["empty.py"].kind == "no_dag"


def test_parse_file_answers_serialized_dags_and_the_row_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "good.py", GOOD)
    result = parse_file(str(path))
    assert result["error"] is None and result["duration"] >= 0
    [dag] = result["dags"]
    assert dag["dag_id"] == "good"
    assert [t["task_id"] for t in dag["structure"]["tasks"]] == ["a", "b"]
    assert dag["fields"] == {"description": "checks", "schedule": None, "tags": ["fleet"], "is_paused_upon_creation": False}
    assert parse_file(str(write(tmp_path, "cycle.py", CYCLE)))["error"]["kind"] == "cycle"


def test_sys_exit_in_a_dag_file_is_an_import_error_not_an_exit(tmp_path: Path) -> None:
    dags, error = load_file(write(tmp_path, "exits.py", "import sys\nsys.exit('bye')\n"))
    assert dags == [] and error is not None
    assert error.kind == "import" and "SystemExit: bye" in error.error


def test_a_file_that_breaks_keeps_its_last_good_dag(tmp_path: Path) -> None:
    path = write(tmp_path, "good.py", GOOD)
    bag = DagBag(tmp_path)
    bag.collect()
    path.write_text(GOOD + "\ndef broken(:\n")
    os.utime(path, (2, 2))
    bag.collect()
    assert "good" in bag.dags
    assert bag.errors[str(path)].kind == "syntax"


def test_removed_file_forgets_its_dags(tmp_path: Path) -> None:
    path = write(tmp_path, "good.py", GOOD)
    bag = DagBag(tmp_path)
    bag.collect()
    path.unlink()
    assert bag.collect()
    assert bag.dags == {} and bag.errors == {}


def test_get_dag_loads_only_the_file_asked_for(tmp_path: Path) -> None:
    good = write(tmp_path, "good.py", GOOD)
    write(tmp_path, "raises.py", RAISES)
    bag = DagBag(tmp_path)
    dag = bag.get_dag("good", str(good))
    assert dag is not None and set(dag.tasks) == {"a", "b"}
    assert bag.errors == {}  # raises.py was never imported
    assert bag.get_dag("good", str(tmp_path / "elsewhere.py")) is None


def test_a_dag_id_defined_twice_keeps_the_first(tmp_path: Path) -> None:
    first = write(tmp_path, "a.py", GOOD)
    second = write(tmp_path, "b.py", GOOD)
    bag = DagBag(tmp_path)
    bag.collect()
    assert bag.dags["good"].fileloc == str(first)
    assert bag.errors[str(second)].kind == "duplicate"


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
