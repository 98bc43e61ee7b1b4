"""Hub-task benchmark: no-op hub tasks end to end through the scheduler and
the executor's long-lived worker processes (no broker, no agents).

Prints, for this machine:
* chain: N no-op hub tasks one after another: wall time from trigger to run
  end, per-link time, task instances per second;
* wide: one run of N independent no-op hub tasks: wall time, task instances
  per second;
* executor alone: N queued no-op hub tasks handed straight to the executor
  (no scheduler), to separate the executor's cost from the scheduler's;
* CPU seconds of the hub process (scheduler and executor threads) and of
  the worker processes, per 1,000 task instances.

The hub side is assembled as ``HubRuntime`` does (scheduler thread woken by
events, executor thread, ``--workers`` worker processes) on a SQLite file in
a temporary folder, with the hub's default durability (``--sync FULL``).

Usage: python bench/hub_tasks.py [--chain 200] [--wide 1000] [--direct 1000] [--workers 4] [--sync FULL]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub import events as ev  # noqa: E402
from hub.dagprocessor import SerializedDagBag  # noqa: E402
from hub.db import make_engine, make_sessionmaker, transaction, upgrade  # noqa: E402
from hub.dispatcher import Dispatcher  # noqa: E402
from hub.events import EventBus  # noqa: E402
from hub.executor import LocalExecutor  # noqa: E402
from hub.models import Dag, DagRun, DagVersion, TaskInstance  # noqa: E402
from hub.scheduler import Scheduler, trigger_run  # noqa: E402
from shared.clock import SystemClock, utcnow  # noqa: E402
from shared.hlc import HybridClock  # noqa: E402

CHAIN = """
from hub.dag import DAG, EmptyOperator, chain
with DAG("bench_chain", max_active_tasks={n}) as dag:
    chain(*[EmptyOperator(task_id=f"link_{{i}}") for i in range({n})])
"""
WIDE = """
from hub.dag import DAG, EmptyOperator
with DAG("bench_wide", max_active_tasks={n}) as dag:
    for i in range({n}):
        EmptyOperator(task_id=f"noop_{{i}}")
"""


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_one(folder: Path, dag_id: str, tasks: int, workers: int, sync: str) -> dict[str, float]:
    db = folder / f"{dag_id}.db"
    url = f"sqlite:///{db}"
    upgrade(url)
    engine = make_engine(url, sqlite_synchronous=sync)
    sessions = make_sessionmaker(engine)
    events = EventBus()
    clock = SystemClock()
    executor = LocalExecutor(sessions, clock, events, workers=workers, sqlite_synchronous=sync)
    dags = folder / dag_id
    dags.mkdir()
    (dags / f"{dag_id}.py").write_text((CHAIN if "chain" in dag_id else WIDE).format(n=tasks))
    hlc = HybridClock("hub", lambda: int(clock.now() * 1000))
    scheduler = Scheduler(sessions, SerializedDagBag(dags), Dispatcher(hlc, 256 * 1024), clock, events, executor.submit, interval=0.5)
    executor.mini_scheduler = scheduler  # as HubRuntime wires them
    done = threading.Event()
    events.subscribe(ev.RUN_FINISHED, lambda _n, data: done.set())
    executor.start()
    stop = threading.Event()
    try:
        scheduler.parse_dags(utcnow(clock), force=True)
        # Let the workers start (and import the DAG file once) before timing.
        time.sleep(1.0)
        worker_cpu0 = {pid: cpu_of(pid) for pid in executor.worker_pids()}
        cpu0 = time.process_time()
        thread = threading.Thread(target=scheduler.run_forever, args=(stop,), daemon=True)
        thread.start()
        started = time.perf_counter()
        with transaction(sessions) as session:
            trigger_run(session, dag_id, {}, utcnow(clock))
        events.emit(ev.RUN_TRIGGERED)
        if not done.wait(300):
            raise RuntimeError(f"{dag_id}: the run did not finish within 300 s")
        wall = time.perf_counter() - started
        hub_cpu = time.process_time() - cpu0
        worker_cpu = sum(cpu_of(pid) - worker_cpu0.get(pid, 0.0) for pid in executor.worker_pids())
    finally:
        stop.set()
        scheduler.wake()
        executor.stop()
        engine.dispose()
    return {"wall": wall, "hub_cpu": hub_cpu, "worker_cpu": worker_cpu}


def run_direct(folder: Path, tasks: int, workers: int, sync: str) -> dict[str, float]:
    """The executor alone: ``tasks`` queued no-op hub task instances handed
    straight to it (no scheduler), timed until the last is recorded."""
    url = f"sqlite:///{folder / 'direct.db'}"
    upgrade(url)
    engine = make_engine(url, sqlite_synchronous=sync)
    sessions = make_sessionmaker(engine)
    events = EventBus()
    clock = SystemClock()
    dags = folder / "direct"
    dags.mkdir()
    (dags / "bench_direct.py").write_text(WIDE.replace("bench_wide", "bench_direct").format(n=tasks))
    now = utcnow(clock)
    with transaction(sessions) as session:
        session.add(Dag(dag_id="bench_direct", fileloc=str(dags / "bench_direct.py"), structure={}, is_active=True, is_paused=False))
        session.flush()
        # As the scheduler makes them: a run follows a DAG version.
        structure = {"dag_id": "bench_direct", "tasks": [{"task_id": f"noop_{i}", "kind": "hub", "upstream": []} for i in range(tasks)]}
        version = DagVersion(dag_id="bench_direct", version_number=1, structure=structure, structure_hash="bench", fileloc=str(dags / "bench_direct.py"), created_at=now)
        session.add(version)
        session.flush()
        run = DagRun(dag_id="bench_direct", run_id="r", run_type="manual", state="running", logical_date=now, conf={}, created_at=now, started_at=now, dag_version_id=version.id)
        session.add(run)
        session.flush()
        tis = [TaskInstance(run_pk=run.id, dag_id="bench_direct", run_id="r", task_id=f"noop_{i}", kind="hub", state="queued", try_number=1, max_tries=1) for i in range(tasks)]
        session.add_all(tis)
        session.flush()
        ids = [ti.id for ti in tis]
    left = set(ids)
    lock = threading.Lock()
    done = threading.Event()

    def finished(_name: str, data: dict[str, object]) -> None:
        with lock:
            left.discard(int(data["ti_id"]))  # type: ignore[call-overload]
            if not left:
                done.set()

    events.subscribe(ev.HUB_TASK_FINISHED, finished)
    executor = LocalExecutor(sessions, clock, events, workers=workers, sqlite_synchronous=sync)
    executor.start()
    try:
        time.sleep(1.0)
        worker_cpu0 = {pid: cpu_of(pid) for pid in executor.worker_pids()}
        cpu0 = time.process_time()
        started = time.perf_counter()
        for ti_id in ids:
            executor.submit(ti_id)
        if not done.wait(300):
            raise RuntimeError("direct: not finished within 300 s")
        wall = time.perf_counter() - started
        hub_cpu = time.process_time() - cpu0
        worker_cpu = sum(cpu_of(pid) - worker_cpu0.get(pid, 0.0) for pid in executor.worker_pids())
    finally:
        executor.stop()
        engine.dispose()
    return {"wall": wall, "hub_cpu": hub_cpu, "worker_cpu": worker_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=int, default=200)
    parser.add_argument("--wide", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--direct", type=int, default=1000, help="task instances handed straight to the executor (no scheduler)")
    parser.add_argument("--sync", choices=["FULL", "NORMAL"], default="FULL")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-bench-") as tmp:
        folder = Path(tmp)
        if args.direct > 0:
            r = run_direct(folder, args.direct, args.workers, args.sync)
            print(
                f"executor alone: {args.direct} queued no-op hub tasks, {args.workers} workers, sqlite {args.sync}: {r['wall']:.2f} s, "
                f"{args.direct / r['wall']:.0f} TI/s; CPU per 1,000 TIs: hub {r['hub_cpu'] / args.direct * 1000:.2f} s, workers {r['worker_cpu'] / args.direct * 1000:.2f} s"
            )
        for dag_id, n in (("bench_chain", args.chain), ("bench_wide", args.wide)):
            if n <= 0:
                continue
            r = run_one(folder, dag_id, n, args.workers, args.sync)
            per_link = f", {r['wall'] / n * 1000:.1f} ms per link" if dag_id == "bench_chain" else ""
            print(
                f"{dag_id}: {n} hub no-op tasks, {args.workers} workers, sqlite {args.sync}: {r['wall']:.2f} s{per_link}, "
                f"{n / r['wall']:.0f} TI/s; CPU per 1,000 TIs: hub {r['hub_cpu'] / n * 1000:.2f} s, workers {r['worker_cpu'] / n * 1000:.2f} s"
            )


if __name__ == "__main__":
    main()
