"""What running a job in its own process costs the agent.

Prints, for no-op jobs:

* ``jobhost.run`` alone: one fork-server child per job (fork, set limits,
  run, report, sweep of the session), sequentially, ms per job;
* the same through the whole runner (inbox claim, child, outbox write with
  ``PRAGMA synchronous`` NORMAL, inbox done), with 1 and 2 workers, ms per job
  and jobs per second;
* the first job's extra cost: starting the fork server (one-off per agent).

Usage: ``.venv/bin/python bench/agent_exec.py [--jobs 200]``. Figures depend
on the machine; run it when nothing else is busy.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path


def bench_host(jobs: int) -> list[float]:
    from agent import jobhost
    from firmware_jobs.noop import Noop

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(jobs):
            spec = jobhost.Spec(f"b-{i}", Noop, {"echo": i, "sleep": 0}, Path(tmp) / f"w-{i}", None, {}, jobhost.Limits(3600, 1024))
            start = time.perf_counter()
            outcome, _ = jobhost.run(spec, jobhost.Hooks(), timeout=30, abort=threading.Event(), grace=2.0)
            times.append(time.perf_counter() - start)
            assert outcome.kind == "ok", outcome
    return times


def bench_runner(jobs: int, concurrency: int) -> float:
    from agent.queues import Inbox, Outbox
    from agent.runner import Runner
    from firmware_jobs import registry
    from shared.clock import SystemClock
    from shared.hlc import HybridClock
    from shared.messages import Assign

    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        inbox, outbox = Inbox(state / "in.sqlite3", "NORMAL"), Outbox(state / "out.sqlite3", "NORMAL")
        clock = SystemClock()
        hlc = HybridClock("bench", lambda: int(clock.now() * 1000))
        for i in range(jobs):
            inbox.put(Assign(f"a-{i}", "d", "r", "t", 1, "noop", {"echo": i}))
        done = threading.Event()
        finished = [0]

        def on_result(aid: str) -> None:
            finished[0] += 1
            if finished[0] == jobs:
                done.set()

        runner = Runner(inbox, outbox, registry, clock, hlc.now, state / "work", {"state_dir": tmp}, concurrency=concurrency, on_result=on_result,
                        job_cpu_seconds=3600, job_memory_mb=1024)
        start = time.perf_counter()
        runner.start()
        runner.wake()
        assert done.wait(600), f"only {finished[0]} of {jobs} finished"
        elapsed = time.perf_counter() - start
        runner.stop(5)
        inbox.close()
        outbox.close()
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()

    first = time.perf_counter()
    bench_host(1)
    print(f"first job (starts the fork server): {(time.perf_counter() - first) * 1000:.1f} ms")
    times = bench_host(args.jobs)
    ms = sorted(t * 1000 for t in times)
    print(f"jobhost.run, no-op job, sequential, {args.jobs} jobs: median {statistics.median(ms):.2f} ms, "
          f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms, max {ms[-1]:.2f} ms")
    for concurrency in (1, 2):
        elapsed = bench_runner(args.jobs, concurrency)
        print(f"runner end to end, concurrency {concurrency}, {args.jobs} no-op jobs: {elapsed * 1000 / args.jobs:.2f} ms per job, "
              f"{args.jobs / elapsed:.0f} jobs/s")


if __name__ == "__main__":
    main()
