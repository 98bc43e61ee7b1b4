"""Scheduler benchmark: hub no-op tasks through the real scheduler and the
real executor (long-lived worker processes) on SQLite.

The hub's scheduling half is assembled in this process as ``hub.runtime``
does it (DAG files parsed in another process, ``Scheduler.run_forever`` in a
thread, ``LocalExecutor`` with its worker processes), without MQTT or HTTP,
which hub tasks do not use. Prints, for this machine:

* wide: 1 -> N -> 1 no-op hub tasks; chain: M no-op hub tasks in a row;
  wall time from trigger to run end, task instances per second;
* CPU seconds per 1,000 task instances of the hub process (scheduler,
  executor and every other thread of it; ``time.process_time``), of the
  scheduler thread and the executor thread alone, and of the worker
  processes (separate processes, from /proc);
* SQL statements and commits the scheduler thread issued per task instance;
* the same with 10,000 and 100,000 finished task instances already in the
  DB (earlier runs of the same DAGs, seeded with bulk inserts), to show how
  the cost grows with history;
* the load average before each measurement (the machine may be shared).

Usage: python bench/scheduler.py [--wide 1000] [--chain 200] [--history 10000,100000]
       [--workers 4] [--sqlite-synchronous FULL] [--max-active-tasks N]
Profile: .venv/bin/py-spy record -f raw --threads -o out.txt -- .venv/bin/python bench/scheduler.py ...
(without --subprocesses: stopping the DAG parse process makes it time out)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import event, func, insert, select  # noqa: E402

from hub import events as ev  # noqa: E402
from hub.dagprocessor import DagFileProcessor, SerializedDagBag, stop_parse_processes  # noqa: E402
from hub.db import make_engine, make_sessionmaker, transaction, upgrade  # noqa: E402
from hub.dispatcher import Dispatcher  # noqa: E402
from hub.events import EventBus  # noqa: E402
from hub.executor import LocalExecutor  # noqa: E402
from hub.models import Dag, DagRun, TaskInstance  # noqa: E402
from hub.scheduler import Scheduler, trigger_run  # noqa: E402
from shared.clock import SystemClock, utcnow  # noqa: E402
from shared.hlc import HybridClock  # noqa: E402
from shared.states import FINISHED, RunState, TaskState  # noqa: E402

WIDE = """
from hub.dag import DAG, PythonOperator

def noop():
    return None

with DAG("bench_wide"{options}) as dag:
    start = PythonOperator(task_id="start", python_callable=noop)
    end = PythonOperator(task_id="end", python_callable=noop)
    for i in range({n}):
        start >> PythonOperator(task_id=f"noop_{{i:05d}}", python_callable=noop) >> end
"""
CHAIN = """
from hub.dag import DAG, PythonOperator, chain

def noop():
    return None

with DAG("bench_chain"{options}) as dag:
    chain(*[PythonOperator(task_id=f"link_{{i:05d}}", python_callable=noop) for i in range({n})])
"""
ONE = """
from hub.dag import DAG, PythonOperator

def noop():
    return None

with DAG("bench_one") as dag:
    PythonOperator(task_id="one", python_callable=noop)
"""
CLK_TCK = os.sysconf("SC_CLK_TCK")


def thread_cpu(thread: threading.Thread | None) -> float:
    if thread is None or thread.ident is None or not thread.is_alive():
        return 0.0
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def process_cpu(pid: int) -> float:
    """utime + stime of a process (not its children), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Figures:
    label: str
    tis: int
    wall: float
    hub_cpu: float
    scheduler_cpu: float
    executor_cpu: float
    workers_cpu: float
    load: float
    #: SQL statements and commits by the scheduler thread.
    statements: int
    commits: int

    def line(self) -> str:
        per_k = 1000 / self.tis
        return (
            f"{self.label:<34} {self.wall:7.2f} s {self.tis / self.wall:7.0f} TI/s   CPU s per 1,000 TIs: hub process {self.hub_cpu * per_k:5.2f} "
            f"(scheduler thread {self.scheduler_cpu * per_k:5.2f}, executor thread {self.executor_cpu * per_k:5.2f}), "
            f"workers {self.workers_cpu * per_k:5.2f}; scheduler SQL per TI: {self.statements / self.tis:.1f} statements, "
            f"{self.commits / self.tis:.1f} commits   [load {self.load:.2f}]"
        )


class Bench:
    def __init__(self, root: Path, workers: int, synchronous: str) -> None:
        self.url = f"sqlite:///{root / 'hub.db'}"
        upgrade(self.url)
        self.engine = make_engine(self.url, sqlite_synchronous=synchronous)
        self.sessions = make_sessionmaker(self.engine)
        self.events = EventBus()
        self.clock = SystemClock()
        hlc = HybridClock("hub", lambda: int(self.clock.now() * 1000))
        self.dagbag = SerializedDagBag(root / "dags", DagFileProcessor())
        self.executor = LocalExecutor(self.sessions, self.clock, self.events, workers=workers, sqlite_synchronous=synchronous)
        self.scheduler = Scheduler(
            self.sessions, self.dagbag, Dispatcher(hlc, 256 * 1024), self.clock, self.events, self.executor.submit, parse_in_tick=False,
        )
        # As hub.runtime wires it: the executor decides a finished task's downstream itself.
        self.executor.mini_scheduler = self.scheduler
        self._finished: dict[int, threading.Event] = {}
        self.events.subscribe(ev.RUN_FINISHED, self._on_run_finished)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self._history_runs = 0
        # What the scheduler thread asks of the DB, counted per statement.
        self.sql = {"statements": 0, "commits": 0}

        def count(key: str) -> Any:
            def listener(*_args: Any, **_kw: Any) -> None:
                if threading.current_thread() is self.thread:
                    self.sql[key] += 1
            return listener

        event.listen(self.engine, "before_cursor_execute", count("statements"))
        event.listen(self.engine, "commit", count("commits"))

    def _on_run_finished(self, _name: str, data: dict[str, Any]) -> None:
        # Also for a run not waited for yet: it may end before run() looks.
        self._finished.setdefault(int(data["run_pk"]), threading.Event()).set()

    def start(self) -> None:
        self.executor.start()
        assert self.scheduler.parse_dags(utcnow(self.clock), force=True)
        if self.dagbag.errors:
            raise SystemExit(f"DAG files failed: {self.dagbag.errors}")
        self.thread = threading.Thread(target=self.scheduler.run_forever, args=(self.stop,), name="hub-scheduler", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.scheduler.wake()
        if self.thread is not None:
            self.thread.join(30)
        self.executor.stop()
        stop_parse_processes()
        self.engine.dispose()

    def run(self, dag_id: str, label: str, timeout: float = 600.0) -> Figures:
        load = os.getloadavg()[0]
        workers = self.executor.worker_pids()
        sql_before = dict(self.sql)
        before = (time.process_time(), thread_cpu(self.thread), thread_cpu(self.executor._thread), sum(process_cpu(p) for p in workers))
        started = time.perf_counter()
        with transaction(self.sessions) as session:
            run = trigger_run(session, dag_id, {}, utcnow(self.clock))
            run_pk = run.id
        done = self._finished.setdefault(run_pk, threading.Event())
        self.events.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
        if not done.wait(timeout):
            raise SystemExit(f"{label}: run {run_pk} did not finish within {timeout:g} s")
        wall = time.perf_counter() - started
        workers_after = self.executor.worker_pids()
        after = (time.process_time(), thread_cpu(self.thread), thread_cpu(self.executor._thread), sum(process_cpu(p) for p in workers_after))
        if set(workers_after) != set(workers):
            print(f"  note: worker processes changed during {label} (a worker died?)", file=sys.stderr)
        with self.sessions() as session:
            state = session.get(DagRun, run_pk).state
            tis = session.scalar(select(func.count()).select_from(TaskInstance).where(TaskInstance.run_pk == run_pk)) or 0
            good = session.scalar(select(func.count()).select_from(TaskInstance).where(TaskInstance.run_pk == run_pk, TaskInstance.state == TaskState.SUCCESS))
        if state != RunState.SUCCESS or good != tis:
            raise SystemExit(f"{label}: run ended {state} with {good}/{tis} task instances successful")
        return Figures(
            label, tis, wall, after[0] - before[0], after[1] - before[1], after[2] - before[2], after[3] - before[3], load,
            self.sql["statements"] - sql_before["statements"], self.sql["commits"] - sql_before["commits"],
        )

    def finished_tis(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count()).select_from(TaskInstance).where(TaskInstance.state.in_([s.value for s in FINISHED]))) or 0

    def seed_history(self, target: int) -> tuple[int, float]:
        """Add finished runs of bench_wide and bench_chain (copies of their
        task lists, alternately) until ``target`` finished task instances
        are in the DB. Bulk inserts; returns (rows added, seconds)."""
        started = time.perf_counter()
        added = 0
        with self.sessions() as session:
            dags = {d.dag_id: d for d in session.scalars(select(Dag).where(Dag.dag_id.in_(["bench_wide", "bench_chain"])))}
        tasks = {dag_id: [t["task_id"] for t in dag.structure["tasks"]] for dag_id, dag in dags.items()}
        now = utcnow(self.clock)
        n = self._history_runs
        while (have := self.finished_tis()) < target:
            with transaction(self.sessions) as session:
                batch_runs = []
                # About 20,000 task instances per transaction.
                while sum(len(tasks[d]) for d, _ in batch_runs) < min(20_000, target - have):
                    dag_id = ("bench_wide", "bench_chain")[n % 2]
                    when = now - timedelta(days=365) + timedelta(minutes=n)
                    run_id = f"history__{n:07d}"
                    n += 1
                    batch_runs.append((dag_id, {
                        "dag_id": dag_id, "run_id": run_id, "run_type": "manual", "state": RunState.SUCCESS, "logical_date": when, "conf": {},
                        "created_at": when, "started_at": when, "ended_at": when + timedelta(seconds=5),
                        "dag_version_id": dags[dag_id].latest_version_id, "clear_number": 0,
                    }))
                run_pks = session.execute(insert(DagRun).returning(DagRun.id, sort_by_parameter_order=True), [row for _d, row in batch_runs]).scalars().all()
                rows = []
                for run_pk, (dag_id, run_row) in zip(run_pks, batch_runs):
                    for task_id in tasks[dag_id]:
                        rows.append({
                            "run_pk": run_pk, "dag_id": dag_id, "run_id": run_row["run_id"], "task_id": task_id, "map_index": -1, "kind": "hub",
                            "state": TaskState.SUCCESS, "try_number": 1, "max_tries": 1, "retry_delay": 0.0, "params": {}, "operator": "PythonOperator",
                            "queued_at": run_row["started_at"], "started_at": run_row["started_at"], "ended_at": run_row["ended_at"],
                        })
                session.execute(insert(TaskInstance), rows)
                added += len(rows)
        self._history_runs = n
        return added, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wide", type=int, default=1000, help="tasks between the first and the last of the wide DAG")
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--history", default="10000,100000", help="finished task instances to have in the DB, comma-separated")
    parser.add_argument("--workers", type=int, default=4, help="executor worker processes (the hub's default is 4)")
    parser.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default="FULL")
    parser.add_argument("--max-active-tasks", type=int, default=None, help="DAG max_active_tasks (default: the hub's, 16 like Airflow)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="outpost-bench-sched-"))
    dags = root / "dags"
    dags.mkdir()
    options = "" if args.max_active_tasks is None else f", max_active_tasks={args.max_active_tasks}"
    (dags / "wide.py").write_text(WIDE.format(n=args.wide, options=options))
    (dags / "chain.py").write_text(CHAIN.format(n=args.chain, options=options))
    (dags / "one.py").write_text(ONE)
    history = [int(h) for h in args.history.split(",") if h.strip()]

    print(f"machine: {os.cpu_count()} CPUs; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; Python {sys.version.split()[0]}")
    print(f"setup: SQLite ({args.sqlite_synchronous} sync) in {root}; {args.workers} worker processes; "
          f"max_active_tasks {args.max_active_tasks or 'default'}; DAGs: 1 -> {args.wide} -> 1 and a chain of {args.chain}")
    bench = Bench(root, args.workers, args.sqlite_synchronous)
    bench.start()
    try:
        bench.run("bench_one", "warm-up")  # workers import the modules, first connections
        results = []
        for stage in [0, *history]:
            if stage:
                added, seconds = bench.seed_history(stage)
                print(f"-- history: {bench.finished_tis():,} finished task instances in the DB (seeded {added:,} in {seconds:.1f} s)")
            else:
                print(f"-- history: {bench.finished_tis():,} finished task instances in the DB")
            for dag_id, label in (("bench_wide", f"wide 1 -> {args.wide} -> 1"), ("bench_chain", f"chain of {args.chain}")):
                figures = bench.run(dag_id, label)
                results.append((stage, figures))
                print(figures.line(), flush=True)
        print("aims: wide 1,000 under 2 s, chain of 200 under 2 s (Airflow 3.3.2: about 1 s per chain link on this machine)")
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
