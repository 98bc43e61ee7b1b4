"""The hub-task executor: long-lived worker processes that import DAG files
themselves, enforce execution_timeout, survive task code that kills its
process, run callbacks, and leave no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hub import events as ev
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.events import EventBus
from hub.executor import LocalExecutor
from hub.models import CallbackRequest, Dag, DagRun, TaskInstance, XCom
from shared.clock import ManualClock, SystemClock, utcnow
from shared.states import TaskState

DAG_FILE = '''
import os, time
from hub.dag import DAG, PythonOperator, PythonSensor, TaskFailedNoRetry, TaskRescheduled, TaskSkipped

MARKER = "@MARKER@"


def pid():
    return os.getpid()

def nap(seconds):
    time.sleep(seconds)
    return "woke"

def die():
    os._exit(7)

def segfault():
    import ctypes
    ctypes.string_at(0)

def push(ti):
    ti.xcom_push("extra", {"from": os.getpid()})
    return 5

def pull(ti):
    return {"ret": ti.xcom_pull("push"), "extra": ti.xcom_pull(task_ids="push", key="extra"), "both": ti.xcom_pull(["push", "push"])}

def context(ti, params, ds, dag_run, run_id, logical_date, map_index):
    return {"ds": ds, "params": params, "conf": dict(dag_run.conf), "run_id": run_id, "try": ti.try_number, "map_index": map_index}

def not_json():
    return {1, 2}

def too_big():
    return "x" * (1024 * 1024 + 1)

def skip():
    raise TaskSkipped("nothing to do")

def fail_hard():
    raise TaskFailedNoRetry("broken for good")

def reschedule(logical_date):
    from datetime import timedelta
    raise TaskRescheduled(logical_date + timedelta(minutes=5))

def boom():
    raise ValueError("boom")

def exits():
    raise SystemExit(3)

def on_failure(context):
    with open(MARKER, "a") as f:
        f.write(f"{context['ti'].task_id}|{context['exception']}|{context['reason']}|{os.getpid()}\\n")

def bad_callback(context):
    raise RuntimeError("callback broke")

def on_dag_success(context):
    with open(MARKER, "a") as f:
        f.write(f"dag|{context['dag_run'].run_id}|{context['reason']}\\n")

def on_execute(context):
    with open(MARKER, "a") as f:
        f.write(f"execute|{context['ti'].task_id}\\n")
    raise RuntimeError("a failing on_execute_callback is logged, not fatal")

def on_skipped(context):
    with open(MARKER, "a") as f:
        f.write(f"skipped|{context['ti'].task_id}\\n")

with DAG("exec", on_success_callback=on_dag_success) as dag:
    for name, fn in [("pid", pid), ("die", die), ("segfault", segfault), ("push", push), ("pull", pull), ("context", context), ("not_json", not_json),
                     ("too_big", too_big), ("skip", skip), ("fail_hard", fail_hard), ("reschedule", reschedule), ("boom", boom), ("exits", exits)]:
        PythonOperator(task_id=name, python_callable=fn, on_failure_callback=on_failure)
    PythonOperator(task_id="nap", python_callable=nap, op_kwargs={"seconds": 30})
    PythonOperator(task_id="short_nap", python_callable=nap, op_kwargs={"seconds": 0.5})
    PythonOperator(task_id="bad_cb", python_callable=boom, on_failure_callback=bad_callback)
    PythonOperator(task_id="hooked", python_callable=pid, on_execute_callback=on_execute)
    PythonSensor(task_id="waits", python_callable=lambda: False, mode="reschedule", poke_interval=60, timeout=3600)
    hooked_skip = PythonOperator(task_id="hooked_skip", python_callable=skip, on_execute_callback=[on_execute])
    hooked_skip.on_skipped_callback = on_skipped  # Airflow 2.7's; not an Outpost operator argument
'''


@dataclass
class Env:
    sessions: Any
    events: EventBus
    folder: Path
    marker: Path
    run_pk: int = 0

    def add_tis(self, *task_ids: str, timeout: float | None = None, max_tries: int = 1, state: TaskState = TaskState.QUEUED) -> list[int]:
        with transaction(self.sessions) as session:
            tis = [
                TaskInstance(run_pk=self.run_pk, dag_id="exec", run_id="manual__1", task_id=t, map_index=-1, kind="hub", state=state,
                             try_number=1, max_tries=max_tries, retry_delay=0.0, execution_timeout=timeout)
                for t in task_ids
            ]
            session.add_all(tis)
            session.flush()
            return [ti.id for ti in tis]

    def ti(self, ti_id: int) -> TaskInstance:
        with self.sessions() as session:
            ti = session.get(TaskInstance, ti_id)
            assert ti is not None
            return ti


@pytest.fixture
def env(tmp_path: Path, hub_db_url: str) -> Iterator[Env]:
    # A path in the DAG file, not the environment: workers fork from a fork
    # server started once per process, whose environment is the one it had then.
    marker = tmp_path / "marker.txt"
    folder = tmp_path / "dags"
    folder.mkdir()
    (folder / "exec.py").write_text(DAG_FILE.replace("@MARKER@", str(marker)))
    url = hub_db_url  # SQLite and PostgreSQL: workers write XComs from other processes
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    now = utcnow(SystemClock())
    with transaction(sessions) as session:
        session.add(Dag(dag_id="exec", fileloc=str(folder / "exec.py"), structure={}, is_active=True, is_paused=False))
        session.flush()
        run = DagRun(dag_id="exec", run_id="manual__1", run_type="manual", state="running", logical_date=now, conf={"n": 3}, created_at=now, started_at=now)
        session.add(run)
        session.flush()
        run_pk = run.id
    yield Env(sessions, EventBus(), folder, marker, run_pk)
    engine.dispose()


class Finished:
    """Waits for HUB_TASK_FINISHED announcements (sent after commit)."""

    def __init__(self, events: EventBus) -> None:
        self.seen: set[int] = set()
        self.cond = threading.Condition()
        events.subscribe(ev.HUB_TASK_FINISHED, self._on)

    def _on(self, _name: str, data: dict[str, Any]) -> None:
        with self.cond:
            self.seen.add(data["ti_id"])
            self.cond.notify_all()

    def wait(self, ids: list[int], timeout: float = 30.0) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: set(ids) <= self.seen, timeout), f"not finished: {set(ids) - self.seen}"


@pytest.fixture
def executor_factory(env: Env) -> Iterator[Any]:
    made: list[LocalExecutor] = []

    def make(workers: int = 1, **options: Any) -> LocalExecutor:
        executor = LocalExecutor(env.sessions, SystemClock(), env.events, workers=workers, kill_grace=options.pop("kill_grace", 1.0), **options)
        executor.start()
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.stop()


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def zombie_children() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == os.getpid():
                found.append(int(entry))
    return found


def test_long_lived_workers_run_many_tasks_in_the_same_process(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory(workers=1)
    [worker_pid] = executor.worker_pids()
    ids = env.add_tis("pid", "push", "context")
    for ti_id in ids:
        executor.submit(ti_id)
    finished.wait(ids)
    tis = [env.ti(i) for i in ids]
    assert [ti.state for ti in tis] == ["success"] * 3
    assert {ti.pid for ti in tis} == {worker_pid}
    assert tis[0].output == worker_pid != os.getpid()
    assert executor.worker_pids() == [worker_pid]


def test_the_context_has_airflow_names(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory()
    [ti_id] = env.add_tis("context")
    executor.submit(ti_id)
    finished.wait([ti_id])
    ti = env.ti(ti_id)
    assert ti.state == "success", ti.error
    assert ti.output["params"] == {"n": 3} and ti.output["conf"] == {"n": 3}
    assert ti.output["run_id"] == "manual__1" and ti.output["try"] == 1 and ti.output["map_index"] == -1
    assert len(ti.output["ds"]) == 10


def test_xcoms_pushed_in_one_worker_are_pulled_in_another(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory(workers=2)
    [push] = env.add_tis("push")
    executor.submit(push)
    finished.wait([push])
    [pull] = env.add_tis("pull")
    executor.submit(pull)
    finished.wait([pull])
    pushed = env.ti(push)
    assert pushed.state == "success" and pushed.output == 5
    with env.sessions() as session:
        row = session.scalars(select(XCom).where(XCom.task_id == "push")).one()
    assert row.key == "extra" and row.value == {"from": pushed.pid}
    out = env.ti(pull)
    assert out.state == "success", out.error
    assert out.output == {"ret": 5, "extra": {"from": pushed.pid}, "both": [5, 5]}


def test_a_task_past_its_execution_timeout_fails_and_its_worker_is_replaced(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory(workers=2, kill_grace=0.5)
    [slow] = env.add_tis("nap", timeout=0.5, max_tries=2)
    [other] = env.add_tis("short_nap")
    started = time.monotonic()
    executor.submit(slow)
    executor.submit(other)
    finished.wait([slow, other])
    assert time.monotonic() - started < 10
    ti = env.ti(slow)
    assert ti.state == "up_for_retry"  # retryable, like Airflow's AirflowTaskTimeout
    assert ti.error["code"] == "execution_timeout"
    assert env.ti(other).state == "success" and env.ti(other).pid != ti.pid
    deadline = time.monotonic() + 5
    while alive(ti.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(ti.pid), "the timed-out worker still runs"
    assert len(executor.worker_pids()) == 2 and ti.pid not in executor.worker_pids()
    # The replacement serves the next task.
    [after] = env.add_tis("pid")
    executor.submit(after)
    finished.wait([after])
    assert env.ti(after).state == "success"


def test_a_task_that_kills_its_worker_fails_as_worker_died_and_the_hub_carries_on(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory(workers=1)
    [first_pid] = executor.worker_pids()
    [dies] = env.add_tis("die")
    executor.submit(dies)
    finished.wait([dies])
    ti = env.ti(dies)
    assert ti.state == "failed"
    assert ti.error["code"] == "worker_died" and "exit code 7" in ti.error["message"]
    [after] = env.add_tis("pid")
    executor.submit(after)
    finished.wait([after])
    assert env.ti(after).state == "success"
    assert env.ti(after).output not in (first_pid, os.getpid())


def test_a_try_cleared_while_running_is_not_overwritten(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory()
    [ti_id] = env.add_tis("short_nap")
    executor.submit(ti_id)
    deadline = time.monotonic() + 10
    while env.ti(ti_id).state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    with transaction(env.sessions) as session:
        ti = session.get(TaskInstance, ti_id)
        assert ti is not None
        ti.state, ti.try_number = TaskState.NONE, 0  # cleared by a user
    finished.wait([ti_id])
    ti = env.ti(ti_id)
    assert (ti.state, ti.try_number, ti.output) == ("none", 0, None)


def test_orphans_of_a_dead_hub_are_adopted(env: Env) -> None:
    ids = env.add_tis("pid", "push", state=TaskState.RUNNING) + env.add_tis("context", state=TaskState.QUEUED)
    executor = LocalExecutor(env.sessions, SystemClock(), env.events)
    assert executor.adopt_orphans() == 3
    assert [env.ti(i).state for i in ids] == ["scheduled"] * 3


def test_stop_leaves_no_worker_and_no_zombie(env: Env) -> None:
    finished = Finished(env.events)
    executor = LocalExecutor(env.sessions, SystemClock(), env.events, workers=2, kill_grace=0.5)
    executor.start()
    [busy] = env.add_tis("nap")
    [quick] = env.add_tis("pid")
    executor.submit(busy)
    executor.submit(quick)
    finished.wait([quick])
    deadline = time.monotonic() + 10
    while env.ti(busy).state != "running" and time.monotonic() < deadline:
        time.sleep(0.01)
    pids = executor.worker_pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    executor.stop()
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    assert zombie_children() == []
    assert env.ti(busy).state == "running"  # interrupted: adopted by the next hub
    assert LocalExecutor(env.sessions, SystemClock(), env.events).adopt_orphans() == 1


@pytest.mark.parametrize(
    ("task_id", "state", "code"),
    [
        ("not_json", "failed", "output_not_json"),
        ("too_big", "failed", "output_too_large"),
        ("skip", "skipped", None),
        ("fail_hard", "failed", "failed_no_retry"),
        ("boom", "up_for_retry", "exception"),
        ("exits", "up_for_retry", "exception"),
    ],
)
def test_outcomes(env: Env, manual_clock: ManualClock, task_id: str, state: str, code: str | None) -> None:
    executor = LocalExecutor(env.sessions, manual_clock, env.events)
    [ti_id] = env.add_tis(task_id, max_tries=2)
    executor.run_inline(ti_id)
    ti = env.ti(ti_id)
    assert ti.state == state
    assert (ti.error or {}).get("code") == code
    assert ti.ended_at == utcnow(manual_clock)


def test_a_reschedule_gives_the_try_back(env: Env, manual_clock: ManualClock) -> None:
    executor = LocalExecutor(env.sessions, manual_clock, env.events)
    [ti_id] = env.add_tis("reschedule")
    executor.run_inline(ti_id)
    ti = env.ti(ti_id)
    with env.sessions() as session:
        run = session.get(DagRun, env.run_pk)
        assert run is not None
    # The try goes on at the next poke: the scheduler queues it again without counting a new one.
    assert ti.state == "up_for_reschedule" and ti.try_number == 1
    assert ti.next_try_at == run.logical_date + timedelta(minutes=5)


def test_callbacks_run_in_a_worker_with_the_context(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory()
    [worker_pid] = executor.worker_pids()
    [ti_id] = env.add_tis("boom")
    executor.submit(ti_id)
    finished.wait([ti_id])
    now = utcnow(SystemClock())
    with transaction(env.sessions) as session:
        session.add(CallbackRequest(kind="task_failure", dag_id="exec", run_pk=env.run_pk, ti_id=ti_id, task_id="boom", payload={"reason": "failed"}, created_at=now))
        session.add(CallbackRequest(kind="dag_success", dag_id="exec", run_pk=env.run_pk, payload={"reason": "success"}, created_at=now))
    env.events.emit(ev.CALLBACKS_REQUESTED)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with env.sessions() as session:
            if all(r.finished_at for r in session.scalars(select(CallbackRequest))):
                break
        time.sleep(0.05)
    with env.sessions() as session:
        requests = session.scalars(select(CallbackRequest).order_by(CallbackRequest.id)).all()
    assert [(r.attempts, r.error) for r in requests] == [(1, None), (1, None)]
    lines = sorted(env.marker.read_text().splitlines())
    assert lines == ["boom|ValueError: boom|failed|" + str(worker_pid), "dag|manual__1|success"]


def test_a_failing_callback_is_recorded_and_given_up_after_three_attempts(env: Env, manual_clock: ManualClock) -> None:
    executor = LocalExecutor(env.sessions, manual_clock, env.events)
    [ti_id] = env.add_tis("bad_cb")
    executor.run_inline(ti_id)
    with transaction(env.sessions) as session:
        session.add(CallbackRequest(kind="task_failure", dag_id="exec", run_pk=env.run_pk, ti_id=ti_id, task_id="bad_cb", payload={}, created_at=utcnow(manual_clock)))
    ran = [executor.run_callbacks_inline() for _ in range(5)]
    assert ran == [1, 1, 1, 0, 0]
    with env.sessions() as session:
        request = session.scalars(select(CallbackRequest)).one()
    assert request.attempts == 3 and request.finished_at is not None
    assert "RuntimeError: callback broke" in (request.error or "")


def test_a_new_try_starts_without_the_xcoms_of_the_last(env: Env, manual_clock: ManualClock) -> None:
    executor = LocalExecutor(env.sessions, manual_clock, env.events)
    [ti_id] = env.add_tis("push")
    with transaction(env.sessions) as session:
        session.add(XCom(run_pk=env.run_pk, task_id="push", map_index=-1, key="stale", value=1, created_at=utcnow(manual_clock)))
    executor.run_inline(ti_id)
    with env.sessions() as session:
        keys = sorted(session.scalars(select(XCom.key).where(XCom.task_id == "push")))
    assert keys == ["extra"]


def test_on_execute_and_on_skipped_callbacks_run_in_the_task_process(env: Env, manual_clock: ManualClock) -> None:
    executor = LocalExecutor(env.sessions, manual_clock, env.events)
    ids = env.add_tis("hooked", "hooked_skip")
    for ti_id in ids:
        executor.run_inline(ti_id)
    assert [env.ti(i).state for i in ids] == ["success", "skipped"]
    assert env.marker.read_text().splitlines() == ["execute|hooked", "execute|hooked_skip", "skipped|hooked_skip"]


HUB_SCRIPT = """
import os, signal, sys, time
from hub.db import make_engine, make_sessionmaker
from hub.events import EventBus
from hub.executor import LocalExecutor
from shared.clock import SystemClock

if __name__ == "__main__":
    executor = LocalExecutor(make_sessionmaker(make_engine(sys.argv[1])), SystemClock(), EventBus(), workers=2)
    executor.start()
    print(" ".join(map(str, executor.worker_pids())), flush=True)
    executor.submit(int(sys.argv[2]))  # a task that naps for 30 s: its worker is busy, not waiting on its pipe
    time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_die_with_a_killed_hub(env: Env, tmp_path: Path) -> None:
    """A hub killed with -9 leaves no worker running its tasks: the next
    hub adopts them, and a task must never run twice at once."""
    script = tmp_path / "hub_script.py"
    script.write_text(HUB_SCRIPT)
    url = env.sessions.kw["bind"].url.render_as_string(hide_password=False)
    [nap] = env.add_tis("nap")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), url, str(nap)], capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    # The workers hold the script's stdout: had the busy one lived on, the run
    # would have lasted the task's 30 s nap.
    assert time.monotonic() - started < 20
    assert env.ti(nap).state == "running"  # left for the next hub to adopt


def test_a_sensor_in_reschedule_mode_gives_its_worker_back(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory()
    [ti_id] = env.add_tis("waits")
    executor.submit(ti_id)
    finished.wait([ti_id])
    ti = env.ti(ti_id)
    assert ti.state == "up_for_reschedule", ti.error
    assert ti.try_number == 1 and ti.sensor_started_at is not None and ti.next_try_at is not None
    assert 59 <= (ti.next_try_at - ti.sensor_started_at).total_seconds() <= 70


def test_a_segfault_in_task_code_fails_the_task_not_the_hub(env: Env, executor_factory: Any) -> None:
    finished = Finished(env.events)
    executor = executor_factory(workers=1)
    [crash, after] = env.add_tis("segfault", "pid")
    executor.submit(crash)
    executor.submit(after)
    finished.wait([crash, after])
    ti = env.ti(crash)
    assert ti.state == "failed" and ti.error["code"] == "worker_died"
    assert f"signal {int(signal.SIGSEGV)}" in ti.error["message"]
    assert env.ti(after).state == "success"


def test_a_dag_file_that_imports_a_helper_of_its_folder_runs_in_the_worker(env: Env, executor_factory: Any) -> None:
    (env.folder / "_exec_helper.py").write_text("VALUE = 41\n")
    dag_file = env.folder / "exec.py"
    dag_file.write_text(
        "from _exec_helper import VALUE\n" + dag_file.read_text()
        + "\nwith dag:\n    PythonOperator(task_id='helped', python_callable=lambda: VALUE + 1)\n"
    )
    finished = Finished(env.events)
    [ti_id] = env.add_tis("helped")
    executor = executor_factory()
    executor.submit(ti_id)
    finished.wait([ti_id])
    ti = env.ti(ti_id)
    assert (ti.state, ti.output) == ("success", 42), ti.error
