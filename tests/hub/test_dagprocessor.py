"""DAG files are parsed in other processes: a file that hangs, exits, calls
sys.exit or eats memory fails alone, with its reason, and the hub process
(this one) never imports it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from hub.dagprocessor import DagFileProcessor, DagProcessorError, SerializedDagBag
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.models import Dag, DagImportError
from shared.clock import ManualClock, utcnow

GOOD = """
from hub.dag import DAG, AgentOperator
print("DAG files may print; it must not corrupt the answer")
with DAG("good") as dag:
    AgentOperator(task_id="a", job_type="noop") >> AgentOperator(task_id="b", job_type="noop")
"""
SLEEPS = "import time\ntime.sleep(3600)\n"
OS_EXIT = "import os\nprint('leaving now')\nos._exit(3)\n"
SYS_EXIT = "import sys\nsys.exit(2)\n"
EATS_MEMORY = "hog = []\nwhile True:\n    hog.append(bytearray(16 * 1024 * 1024))\n"
SYNTAX = "from hub.dag import DAG\nwith DAG('broken' as dag:\n    pass\n"
CYCLE = """
from hub.dag import DAG, AgentOperator
with DAG("loop") as dag:
    a = AgentOperator(task_id="a", job_type="noop")
    b = AgentOperator(task_id="b", job_type="noop")
    c = AgentOperator(task_id="c", job_type="noop")
    a >> b >> c >> a
"""
KILLS_PARENT = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"


def write(folder: Path, name: str, text: str, mtime: float | None = None) -> Path:
    path = folder / name
    path.write_text(text)
    if mtime is not None:
        os.utime(path, (mtime, mtime))  # a new mtime, whatever the file system's resolution
    return path


def bag(folder: Path, timeout: float = 1.0, memory_mb: int = 512) -> SerializedDagBag:
    return SerializedDagBag(folder, DagFileProcessor(timeout=timeout, parallelism=2, memory_mb=memory_mb))


def test_hostile_files_fail_alone_with_their_reason(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    write(tmp_path, "os_exit.py", OS_EXIT)
    write(tmp_path, "sys_exit.py", SYS_EXIT)
    write(tmp_path, "eats_memory.py", EATS_MEMORY)
    write(tmp_path, "syntax.py", SYNTAX)
    write(tmp_path, "cycle.py", CYCLE)
    dags = bag(tmp_path, timeout=60.0, memory_mb=128)
    assert dags.collect()
    assert set(dags.dags) == {"good"}
    assert [t["task_id"] for t in dags.dags["good"].structure["tasks"]] == ["a", "b"]
    errors = {Path(e.fileloc).name: e for e in dags.errors.values()}
    assert errors["os_exit.py"].kind == "crash"
    assert "exited with code 3" in errors["os_exit.py"].error and "leaving now" in errors["os_exit.py"].error
    assert errors["sys_exit.py"].kind == "import" and "SystemExit: 2" in errors["sys_exit.py"].error
    assert errors["eats_memory.py"].kind == "memory"
    assert errors["syntax.py"].kind == "syntax" and "line 2" in errors["syntax.py"].error
    assert errors["cycle.py"].kind == "cycle" and "a >> b >> c >> a" in errors["cycle.py"].error
    assert len(errors) == 5
    # None of them was imported here.
    assert not [name for name, module in list(sys.modules.items()) if str(tmp_path) in str(getattr(module, "__file__", None))]


def test_a_file_that_never_returns_is_killed_at_the_timeout(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    sleeper = write(tmp_path, "sleeps.py", SLEEPS)
    dags = bag(tmp_path, timeout=1.0)
    started = time.monotonic()
    assert dags.collect()
    assert time.monotonic() - started < 15
    assert set(dags.dags) == {"good"}
    [error] = dags.errors.values()
    assert (error.fileloc, error.kind) == (str(sleeper), "timeout")
    assert "longer than 1 s (dag_file_processor_timeout)" in error.error
    assert dags.processor.last_round.per_file[str(sleeper)] >= 1.0


def test_a_file_that_kills_its_parsing_process_fails_alone(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    killer = write(tmp_path, "kills_parent.py", KILLS_PARENT)
    dags = bag(tmp_path)
    assert dags.collect()
    # The whole round died: its files were parsed again one per round.
    assert set(dags.dags) == {"good"}
    [error] = dags.errors.values()
    assert error.fileloc == str(killer) and error.kind == "crash" and "code -9" in error.error


def test_a_round_whose_process_fails_applies_nothing_and_tries_again(tmp_path: Path) -> None:
    path = write(tmp_path, "good.py", GOOD)
    dags = bag(tmp_path)
    dags.processor.executable = "/bin/false"  # the parse process cannot even start Python
    with pytest.raises(DagProcessorError, match="exited with code 1"):
        dags.processor.process([str(path)])
    dags.collect()
    dags.processor.executable = sys.executable
    assert dags.dags == {} and dags.errors[str(path)].kind == "crash"
    assert dags.collect()  # not settled: parsed again at the next check
    assert set(dags.dags) == {"good"} and dags.errors == {}


def test_a_file_that_starts_hanging_keeps_its_last_good_dags(tmp_path: Path) -> None:
    path = write(tmp_path, "good.py", GOOD)
    dags = bag(tmp_path, timeout=0.5)
    dags.collect()
    write(tmp_path, "good.py", GOOD + "\nimport time\ntime.sleep(3600)\n", mtime=5)
    assert dags.collect()
    assert set(dags.dags) == {"good"}
    assert dags.errors[str(path)].kind == "timeout"
    write(tmp_path, "good.py", GOOD, mtime=10)
    dags.collect()
    assert dags.errors == {}


def test_nothing_is_parsed_when_nothing_changed(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    dags = bag(tmp_path)
    assert dags.collect()
    assert dags.processor.last_round.files == 1
    assert not dags.collect()
    assert dags.processor.last_round.files == 1  # no round was started


def test_dag_files_import_helpers_from_the_dag_folder(tmp_path: Path) -> None:
    write(tmp_path, "_helpers.py", "JOB = 'noop'\n")  # '_' files are helpers, not DAG files
    write(tmp_path, "uses_helper.py", GOOD.replace('job_type="noop"', "job_type=JOB").replace("from hub.dag", "from _helpers import JOB\nfrom hub.dag"))
    dags = bag(tmp_path)
    dags.collect()
    assert dags.errors == {} and set(dags.dags) == {"good"}


def test_a_dag_id_defined_twice_refuses_the_second_file_until_the_first_lets_go(tmp_path: Path) -> None:
    first = write(tmp_path, "a_first.py", GOOD)
    second = write(tmp_path, "b_second.py", GOOD)
    dags = bag(tmp_path)
    dags.collect()
    assert dags.dags["good"].fileloc == str(first)
    assert dags.errors[str(second)].kind == "duplicate"
    assert f"already defined in {first}" in dags.errors[str(second)].error
    first.unlink()
    dags.collect()
    assert dags.dags["good"].fileloc == str(second)
    assert dags.errors == {}


def test_errors_of_every_kind_reach_the_db_and_clear_when_fixed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    sessions = make_sessionmaker(make_engine(url))
    folder = tmp_path / "dags"
    folder.mkdir()
    write(folder, "good.py", GOOD)
    hanging = write(folder, "sleeps.py", SLEEPS)
    dags = bag(folder, timeout=0.5)
    now = utcnow(ManualClock())
    dags.collect()
    with transaction(sessions) as session:
        dags.sync_to_db(session, now)
    with sessions() as session:
        assert [d.dag_id for d in session.scalars(select(Dag))] == ["good"]
        [err] = session.scalars(select(DagImportError)).all()
        assert (err.fileloc, err.kind) == (str(hanging), "timeout")
    write(folder, "sleeps.py", CYCLE.replace("c >> a", "c"), mtime=5)
    dags.collect()
    with transaction(sessions) as session:
        dags.sync_to_db(session, now)
    with sessions() as session:
        assert sorted(d.dag_id for d in session.scalars(select(Dag))) == ["good", "loop"]
        assert session.scalars(select(DagImportError)).all() == []


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for its reaper is gone too
    except FileNotFoundError:
        return True


def test_a_hub_killed_with_9_leaves_no_parse_behind(tmp_path: Path) -> None:
    import signal
    import subprocess

    pid_file = tmp_path / "parsing.pid"
    write(tmp_path, "sleeps.py", f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(3600)\n")
    hub = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys; from pathlib import Path\n"
            "from hub.dagprocessor import DagFileProcessor, SerializedDagBag\n"
            "bag = SerializedDagBag(Path(sys.argv[1]), DagFileProcessor(timeout=600))\n"
            "bag.collect()\n"
        ), str(tmp_path)],
    )
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()):
            assert time.monotonic() < deadline, "the DAG file never started parsing"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        with open(f"/proc/{child}/stat") as stat:
            parse_process = int(stat.read().rsplit(")", 1)[1].split()[1])
        assert parse_process != hub.pid and not _gone(parse_process)
        hub.send_signal(signal.SIGKILL)
        hub.wait(10)
        deadline = time.monotonic() + 10
        while not (_gone(parse_process) and _gone(child)):
            assert time.monotonic() < deadline, "the parse process or its child outlived the hub"
            time.sleep(0.05)
    finally:
        if hub.poll() is None:
            hub.kill()
            hub.wait()


def test_unchanged_files_are_parsed_again_after_min_file_process_interval(tmp_path: Path) -> None:
    # A DAG built from data next to it, as Airflow users write them.
    (tmp_path / "devices.txt").write_text("a b\n")
    write(tmp_path, "dynamic.py", """
from pathlib import Path
from hub.dag import DAG, AgentOperator
with DAG("dynamic") as dag:
    for name in (Path(__file__).parent / "devices.txt").read_text().split():
        AgentOperator(task_id=name, job_type="noop")
""")
    clock = [0.0]
    dags = SerializedDagBag(tmp_path, DagFileProcessor(timeout=10), min_file_process_interval=30, monotonic=lambda: clock[0])
    assert dags.collect()
    assert [t["task_id"] for t in dags.dags["dynamic"].structure["tasks"]] == ["a", "b"]
    first = dags.processor.last_round
    clock[0] = 30
    assert not dags.collect()  # parsed again, same answer: nothing to record
    second = dags.processor.last_round
    assert second is not first and second.files == 1
    (tmp_path / "devices.txt").write_text("a b c\n")
    clock[0] = 59
    assert not dags.collect()  # not due yet: no round at all
    assert dags.processor.last_round is second
    clock[0] = 60
    assert dags.collect()
    assert [t["task_id"] for t in dags.dags["dynamic"].structure["tasks"]] == ["a", "b", "c"]
