"""Schedules claimed assignments onto worker threads.

One claimer thread takes assignments from the inbox while a worker is free;
``concurrency`` worker threads run them. An assignment whose ``not_before``
is still ahead is *held*: it stays claimed (a lock in the inbox) but takes no
worker, so other work goes on; it is released to a worker when due. A claim
held by a process that died returns to ready at the next start-up
(``Inbox.release_expired_claims(0)``), so a held assignment is never lost.

Before a worker starts an assignment, a result already in the outbox means
it finished before (a crash came between outbox and inbox commits, or it was
cancelled while queued), so it is marked done without running. Everything
from there on (deadline, registry, parameters, the started marker, the job's
child process, logs, progress, storing the result) is :mod:`agent.attempt`.

Besides ``concurrency`` workers overall, ``job_type_concurrency`` caps the
jobs of one type running at once: an assignment whose type has no free slot
waits in the ready list while the workers take other types.

A cancelled assignment that is running has its abort flag set; one that has
not started gets a failed ``cancelled`` result at once. On shutdown, jobs
still running after the stop timeout are aborted: each gets
:data:`ABORT_GRACE` seconds before it is killed, and no result is recorded
for it (its claim returns to ready at the next start).

An idle runner does not poll: the claimer and idle workers sleep until woken
(:meth:`Runner.wake` on new work or a released claim, a finished job) or
until the next held assignment is due, with a long backstop timeout
(:data:`IDLE_WAIT`), so an idle agent costs a device almost no CPU.

No network I/O happens here: events leave through the ``on_event`` callback
and new results are announced through ``on_result``.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.attempt import Attempts, Registry
from agent.context import Run, failed
from agent.queues import Claimed, Inbox, Outbox
from shared.clock import Clock
from shared.hlc import HLC
from shared.messages import Message

log = logging.getLogger(__name__)

#: Longest the claimer and an idle worker sleep when nothing wakes them: a
#: backstop only. New work, a finished job, a released claim or a reload wake
#: them at once, and a held assignment's ``not_before`` sets the next wake-up;
#: polling instead cost an idle device a SQLite claim ten times a second.
IDLE_WAIT = 30.0
#: Delay of the first look at the inbox after start (see _claim_loop).
START_DELAY = 0.1
#: Longest wait while assignments are held: their ``not_before`` is on the
#: device's wall clock, which may jump (NTP, no RTC), so a sleep computed from
#: it is rechecked at least this often.
HELD_RECHECK = 1.0
#: How long a job gets to stop after its abort flag is set. Set here, not
#: in agent.attempt, because stop() waits for it too; Attempts is given it.
ABORT_GRACE = 2.0
#: Least time between two progress reports of one assignment, in seconds;
#: given to Attempts, so the agent's timing settings are all in one place.
PROGRESS_EVERY = 1.0
#: Most assignments waiting in the ready list for a slot of their job type.
MAX_WAITING_FOR_TYPE = 256


class Runner:
    """Claims assignments from ``inbox`` and runs them; see the module docstring."""

    def __init__(
        self,
        inbox: Inbox,
        outbox: Outbox,
        registry: Registry,
        clock: Clock,
        stamp: Callable[[], HLC],
        work_root: Path,
        job_settings: Mapping[str, Any],
        *,
        concurrency: int = 2,
        max_message_bytes: int = 262144,
        on_event: Callable[[Message], object] = lambda message: None,
        on_result: Callable[[str], None] = lambda assignment_id: None,
        count: Callable[[str], None] = lambda name: None,
        job_type_concurrency: Mapping[str, int] | None = None,
        job_cpu_seconds: int = 0,
        job_memory_mb: int = 0,
        job_type_cpu_seconds: Mapping[str, int] | None = None,
        job_type_memory_mb: Mapping[str, int] | None = None,
        max_log_bytes: int = 1024 * 1024,
        log_root: Path | None = None,
        sign_request: Callable[[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        self.inbox, self.outbox, self.registry, self.clock = inbox, outbox, registry, clock
        self.work_root = work_root
        self.concurrency = concurrency
        self._count = count
        self._attempts = Attempts(
            inbox, outbox, registry, clock, stamp, work_root, job_settings,
            abort_grace=ABORT_GRACE, progress_every=PROGRESS_EVERY, max_message_bytes=max_message_bytes,
            on_event=on_event, on_result=on_result, count=count,
            job_cpu_seconds=job_cpu_seconds, job_memory_mb=job_memory_mb,
            job_type_cpu_seconds=job_type_cpu_seconds, job_type_memory_mb=job_type_memory_mb,
            max_log_bytes=max_log_bytes, log_root=log_root if log_root is not None else work_root.parent / "logs",
            sign_request=sign_request,
        )
        self._cv = threading.Condition(threading.RLock())
        self._ready: collections.deque[Claimed] = collections.deque()
        self._held: list[tuple[float, int, Claimed]] = []
        self._seq = itertools.count()
        self._busy = 0
        self._running: dict[str, tuple[Run, Claimed]] = {}
        self._type_slots = dict(job_type_concurrency or {})
        self._type_busy: collections.Counter[str] = collections.Counter()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- settings the daemon changes live (they belong to the attempts) -----

    @property
    def job_settings(self) -> dict[str, Any]:
        return self._attempts.job_settings

    @property
    def limit(self) -> int:
        """``max_message_bytes``: results, log chunks and events must fit it."""
        return self._attempts.limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._attempts.limit = value

    @property
    def max_log_bytes(self) -> int:
        return self._attempts.max_log_bytes

    @property
    def log_root(self) -> Path:
        return self._attempts.log_root

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> str:
        """Store an agent event in the outbox; see :meth:`Attempts.emit_event`."""
        return self._attempts.emit_event(name, data)

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._attempts.sweep_stale_sessions()
        self._threads = [threading.Thread(target=self._claim_loop, name="runner-claimer", daemon=True)]
        self._threads += [threading.Thread(target=self._work_loop, name=f"runner-{i}", daemon=True) for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float) -> bool:
        """Stop claiming; wait up to ``timeout`` seconds for running jobs, then
        abort the rest (no result is recorded for them: their claims return to
        ready at the next start). True when every job finished in time."""
        self._stopping.set()
        self._wake.set()
        with self._cv:
            self._cv.notify_all()
        end = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            with self._cv:
                for run, _ in self._running.values():
                    run.abort("shutdown")
            for thread in self._threads:
                thread.join(ABORT_GRACE + 3.0)  # the grace, then the kill and its clean-up
            return False
        return True

    def wake(self) -> None:
        """Look at the inbox now (new work arrived)."""
        self._wake.set()

    def running(self) -> list[str]:
        with self._cv:
            return sorted(self._running)

    def held(self) -> list[str]:
        with self._cv:
            return sorted(c.assignment_id for _, _, c in self._held)

    def claims(self) -> list[Claimed]:
        """Every inbox claim this runner holds: running, ready (waiting for a
        worker or a slot of its job type) and held (``not_before``)."""
        with self._cv:
            return [c for _, c in self._running.values()] + list(self._ready) + [c for _, _, c in self._held]

    def alive(self) -> bool:
        """True while the claimer and every worker thread run (the watchdog's check)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def set_concurrency(self, concurrency: int) -> None:
        """Change how many jobs run at once, live (config reload). Workers
        beyond the new number stay idle; missing ones are started."""
        with self._cv:
            self.concurrency = concurrency
            missing = concurrency - (len(self._threads) - 1) if self._threads and not self._stopping.is_set() else 0
            extra = [threading.Thread(target=self._work_loop, name=f"runner-{len(self._threads) - 1 + i}", daemon=True) for i in range(missing)]
            self._threads += extra
        for thread in extra:
            thread.start()
        self._wake.set()

    # --- cancellation --------------------------------------------------------

    def cancel(self, assignment_id: str, reason: str = "") -> str:
        """Cancel an assignment. Returns what happened: ``aborting`` (running:
        its abort flag is set and its result will say ``cancelled``),
        ``cancelled`` (not started: a failed ``cancelled`` result is recorded
        now), ``finished`` (too late) or ``unknown``."""
        detail = f"cancelled by the hub{': ' + reason if reason else ''}"
        # Under the lock so no worker starts this assignment in between: a
        # worker checks the outbox under the same lock before starting.
        with self._cv:
            running = self._running.get(assignment_id)
            if running is not None:
                running[0].abort("cancelled", detail)
                return "aborting"
            claimed = self._take_waiting(assignment_id)
            if claimed is not None:
                self._attempts.finish(claimed, failed(claimed.assign, "cancelled", detail, False, finished_at=self.clock.now()))
                return "cancelled"
            stored = self.inbox.assignment(assignment_id)
            if stored is None:
                return "unknown"
            assign, status = stored
            if status == "done" or self.outbox.has(assignment_id):
                return "finished"
            # Ready, or just claimed: the stored result stops it before it starts.
            self._attempts.record(failed(assign, "cancelled", detail, False, finished_at=self.clock.now()))
            return "cancelled"

    def _take_waiting(self, assignment_id: str) -> Claimed | None:
        for i, (_, _, claimed) in enumerate(self._held):
            if claimed.assignment_id == assignment_id:
                self._held.pop(i)
                heapq.heapify(self._held)
                return claimed
        for claimed in self._ready:
            if claimed.assignment_id == assignment_id:
                self._ready.remove(claimed)
                return claimed
        return None

    # --- claiming ------------------------------------------------------------

    def _free_slots(self) -> int:
        # Ready work blocked by its job type's cap takes no worker: it must
        # not stop the claiming of other types (up to a bound on the waiting).
        waiting = sum(1 for c in self._ready if not self._type_free(c.assign.job_type))
        if waiting >= MAX_WAITING_FOR_TYPE:
            return 0
        return self.concurrency - self._busy - (len(self._ready) - waiting)

    def _type_free(self, job_type: str) -> bool:
        cap = self._type_slots.get(job_type)
        return cap is None or self._type_busy[job_type] < cap

    def _next_ready(self) -> Claimed | None:
        """The oldest ready assignment whose job type has a free slot."""
        for claimed in self._ready:
            if self._type_free(claimed.assign.job_type):
                self._ready.remove(claimed)
                return claimed
        return None

    def _claim_loop(self) -> None:
        # The first look a moment after start, as when this loop polled: the
        # link, started just after, usually connects within it, so a job
        # re-run after a restart gets its (best effort) ``started`` out.
        timeout = START_DELAY
        while not self._stopping.is_set():
            self._wake.wait(timeout)
            # Cleared before looking, so a wake() during the look is not lost.
            self._wake.clear()
            timeout = IDLE_WAIT
            try:
                self._release_due()
                self._claim_more()
                timeout = self._next_due()
            except Exception:  # this thread must outlive any one bad item or error
                log.exception("claiming from the inbox failed; retrying")
                self._count("errors.claim")
                self._stopping.wait(1.0)

    def _next_due(self) -> float:
        """Seconds until the earliest held assignment is due (capped: see
        :data:`HELD_RECHECK`), or :data:`IDLE_WAIT` when none is held. A due
        one waiting for a worker is woken by the worker that frees up."""
        with self._cv:
            if not self._held:
                return IDLE_WAIT
            ahead = self._held[0][0] - self.clock.now()
            if ahead > 0:
                return min(HELD_RECHECK, ahead)
            # Due already: look again now if a worker is free (it became due
            # during this look), else the worker that frees up wakes us.
            return 0.0 if self._free_slots() > 0 else IDLE_WAIT

    def _release_due(self) -> None:
        now = self.clock.now()
        with self._cv:
            while self._held and self._held[0][0] <= now and self._free_slots() > 0:
                self._ready.append(heapq.heappop(self._held)[2])
                self._cv.notify()

    def _claim_more(self) -> None:
        while not self._stopping.is_set():
            with self._cv:
                if self._free_slots() <= 0:
                    return
            claimed = self.inbox.claim()
            if claimed is None:
                return
            if self.outbox.has(claimed.assignment_id):
                log.info("%s already has a result; marked done without running", claimed.assignment_id)
                self.inbox.done(claimed)
                continue
            not_before = claimed.assign.not_before
            with self._cv:
                if not_before is not None and not_before > self.clock.now():
                    log.info("%s held until not_before %.3f", claimed.assignment_id, not_before)
                    heapq.heappush(self._held, (not_before, next(self._seq), claimed))
                else:
                    self._ready.append(claimed)
                    self._cv.notify()

    # --- running -------------------------------------------------------------

    def _work_loop(self) -> None:
        while True:
            with self._cv:
                claimed = None
                while not self._stopping.is_set():
                    claimed = self._next_ready()
                    if claimed is not None:
                        break
                    # Every change that can give this worker something to
                    # run notifies the condition; the timeout is a backstop.
                    self._cv.wait(IDLE_WAIT)
                if claimed is None:
                    return
                self._busy += 1
                job_type = claimed.assign.job_type
                self._type_busy[job_type] += 1
            try:
                self._execute(claimed)
            except Exception:
                # The claim stays until its lease runs out (nothing renews it
                # now), then it is ready again; at the latest at the next start.
                log.exception("running %s failed inside the agent", claimed.assignment_id)
                self._count("errors.runner")
            finally:
                with self._cv:
                    self._busy -= 1
                    self._type_busy[job_type] -= 1
                    self._cv.notify_all()  # a slot of this type may be what another worker waits for
                self._wake.set()

    def _execute(self, claimed: Claimed) -> None:
        aid = claimed.assignment_id
        with self._cv:
            if self.outbox.has(aid):
                self.inbox.done(claimed)
                return
            run = Run(aid)
            self._running[aid] = (run, claimed)
        try:
            self._attempts.execute(claimed, run, self._stopping)
        finally:
            with self._cv:
                del self._running[aid]
