"""Runs claimed assignments and writes their results to the outbox.

One claimer thread takes assignments from the inbox while a worker is free;
``concurrency`` worker threads run them. An assignment whose ``not_before``
is still ahead is *held*: it stays claimed (a lock in the inbox) but takes no
worker, so other work goes on; it is released to a worker when due. A claim
held by a process that died returns to ready at the next start-up
(``Inbox.release_expired_claims(0)``), so a held assignment is never lost.

For each assignment, in order: a result already in the outbox means it
finished before (a crash came between outbox and inbox commits, or it was
cancelled while queued), so it is marked done without running. Then the
``deadline`` (passed: failed ``deadline_passed``), the registry lookup
(``unknown_job_type``), parameter validation (``invalid_params``), the
started marker (a job type that is not ``rerunnable`` and was interrupted
mid-run fails ``interrupted`` instead of running again), then the job itself
with a :class:`JobContext` and the assignment's ``timeout``. The result is
stamped with the HLC at the moment the job finished, written to the outbox,
and only then is the inbox item marked done.

Jobs run in a thread of this process for now. A thread cannot be killed: on
timeout the runner sets the abort flag (``ctx.should_abort()``), records a
failed ``timeout`` result, and leaves a job that ignores the flag running in
the background. A later issue moves jobs into a child process that can be
killed and limited (memory, CPU).

No network I/O happens here: events (``started``) leave through the
``on_event`` callback and new results are announced through ``on_result``.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from agent.context import JobContextImpl, Run, dir_name, failed, make_agent_event
from agent.queues import Claimed, Inbox, Outbox, QueueError, event_key
from firmware_jobs.base import Job, JobAborted, JobError
from shared.clock import Clock
from shared.envelope import Envelope, encode
from shared.errors import InvalidParams, OutpostError, PayloadTooLarge, UnknownJobType
from shared.files import atomic_write
from shared.hlc import HLC
from shared.messages import JobError as ErrorBody
from shared.messages import Assign, Message, Result, Started

log = logging.getLogger(__name__)

#: How often the claimer looks for due held work when nothing wakes it.
POLL = 0.1
#: How long a job gets to stop after its abort flag is set.
ABORT_GRACE = 2.0


class Registry(Protocol):
    def get(self, name: str) -> Job: ...


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
    ) -> None:
        self.inbox, self.outbox, self.registry, self.clock = inbox, outbox, registry, clock
        self._stamp = stamp
        self.work_root = work_root
        self.job_settings = dict(job_settings)
        self.concurrency = concurrency
        self.limit = max_message_bytes
        self._on_event, self._on_result, self._count = on_event, on_result, count
        self._cv = threading.Condition(threading.RLock())
        self._ready: collections.deque[Claimed] = collections.deque()
        self._held: list[tuple[float, int, Claimed]] = []
        self._seq = itertools.count()
        self._busy = 0
        self._running: dict[str, Run] = {}
        self._active: dict[str, Claimed] = {}  # the claims of _running
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self.work_root.mkdir(parents=True, exist_ok=True)
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
                for run in self._running.values():
                    run.abort("shutdown")
            for thread in self._threads:
                thread.join(ABORT_GRACE)
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
        """Every inbox claim this runner holds (running, ready to run, held
        for ``not_before``): the daemon renews their leases."""
        with self._cv:
            return [*self._active.values(), *self._ready, *(c for _, _, c in self._held)]

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
            run = self._running.get(assignment_id)
            if run is not None:
                run.abort("cancelled", detail)
                return "aborting"
            claimed = self._take_waiting(assignment_id)
            if claimed is not None:
                self._finish(claimed, failed(claimed.assign, "cancelled", detail, False, finished_at=self.clock.now()))
                return "cancelled"
            stored = self.inbox.assignment(assignment_id)
            if stored is None:
                return "unknown"
            assign, status = stored
            if status == "done" or self.outbox.has(assignment_id):
                return "finished"
            # Ready, or just claimed: the stored result stops it before it starts.
            self._record(failed(assign, "cancelled", detail, False, finished_at=self.clock.now()))
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
        return self.concurrency - self._busy - len(self._ready)

    def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(POLL)
            self._wake.clear()
            try:
                self._release_due()
                self._claim_more()
            except Exception:  # this thread must outlive any one bad item or error
                log.exception("claiming from the inbox failed; retrying")
                self._count("errors.claim")
                self._stopping.wait(1.0)

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
                while not self._ready and not self._stopping.is_set():
                    self._cv.wait(POLL)
                if self._stopping.is_set():
                    return
                claimed = self._ready.popleft()
                self._active[claimed.assignment_id] = claimed
                self._busy += 1
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
                    self._active.pop(claimed.assignment_id, None)
                self._wake.set()

    def _execute(self, claimed: Claimed) -> None:
        aid = claimed.assignment_id
        with self._cv:
            if self.outbox.has(aid):
                self.inbox.done(claimed)
                return
            run = self._running[aid] = Run(aid)
        try:
            result = self._attempt(claimed.assign, run)
            if result is not None and self._finish_durably(claimed, result):
                # Only now: a crash before the outbox commit must still find
                # the marker, or a job that is not safe to re-run runs twice.
                (self.work_root / f"{dir_name(aid)}.started").unlink(missing_ok=True)
        finally:
            with self._cv:
                del self._running[aid]

    def _finish_durably(self, claimed: Claimed, result: Result) -> bool:
        """Store the result, retrying while the queue fails (a full disk, a
        locked database): a computed result is never dropped. False only if
        the agent stops first; the claim then returns at the next start."""
        delay = 0.5
        while True:
            try:
                self._finish(claimed, result)
                return True
            except QueueError:
                log.exception("%s: storing the result failed; retrying in %.1fs", claimed.assignment_id, delay)
                self._count("errors.outbox_write")
                if self._stopping.wait(delay):
                    return False
                delay = min(delay * 2, 30.0)

    def _attempt(self, assign: Assign, run: Run) -> Result | None:
        """Run one assignment; its Result, or None when the agent is stopping."""
        if assign.deadline is not None and self.clock.now() > assign.deadline:
            return failed(assign, "deadline_passed", f"deadline {assign.deadline:.3f} passed before the job could start", False)
        try:
            job = self.registry.get(assign.job_type)
            params = job.validate(assign.params)
        except (UnknownJobType, InvalidParams) as exc:
            return failed(assign, exc.code, str(exc), False)
        name = dir_name(assign.assignment_id)
        # Only a job that is not safe to re-run needs to know it was cut off;
        # the marker costs two fsyncs, so re-runnable jobs go without.
        marker = self.work_root / f"{name}.started"
        if job.rerunnable:
            marker.unlink(missing_ok=True)  # one left by an older run means nothing here
        elif marker.exists():
            marker.unlink()
            return failed(assign, "interrupted", f"the agent stopped while this ran and {assign.job_type!r} is not safe to re-run", True)
        else:
            atomic_write(marker, b"")
        started_at = self.clock.now()
        self._on_event(Started(assign.assignment_id, started_at))
        return self._call(job, params, assign, run, self.work_root / name, started_at)

    def _call(self, job: Job, params: dict[str, Any], assign: Assign, run: Run, work_dir: Path, started_at: float) -> Result | None:
        ctx = JobContextImpl(run, work_dir, self.clock, self.job_settings, emit=self.emit_event)
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["output"] = job.run(ctx, params)
            except BaseException as exc:
                box["error"] = exc
            finally:
                if work_dir.exists():
                    shutil.rmtree(work_dir, ignore_errors=True)

        thread = threading.Thread(target=target, name=f"job-{assign.assignment_id}", daemon=True)
        thread.start()
        thread.join(assign.timeout)
        if thread.is_alive():
            run.abort("timeout")
            thread.join(ABORT_GRACE)
            if thread.is_alive():
                log.warning("%s ignores its abort flag; left running in the background", assign.assignment_id)
            return failed(assign, "timeout", f"the job exceeded its {assign.timeout}s time limit", True, started_at, self.clock.now())
        finished_at = self.clock.now()
        error = box.get("error")
        if error is None:
            return Result(assign.assignment_id, assign.try_number, "success", box.get("output"), None, started_at, finished_at)
        if run.reason == "shutdown" and isinstance(error, JobAborted):
            return None
        if run.reason == "cancelled" and isinstance(error, JobAborted):
            return failed(assign, "cancelled", run.detail, False, started_at, finished_at)
        if isinstance(error, JobError):
            return failed(assign, error.code, str(error), error.retryable, started_at, finished_at)
        log.error("%s: job %s crashed", assign.assignment_id, assign.job_type, exc_info=error)
        code = error.code if isinstance(error, OutpostError) else "job_crashed"
        return failed(assign, code, f"{type(error).__name__}: {error}", True, started_at, finished_at)

    # --- agent events ----------------------------------------------------------

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> str:
        """Store an agent event in the outbox (durably, before returning) for
        the sync loop to send like a result; returns its id."""
        event = make_agent_event(name, data, self.clock.now())
        stamp = self._stamp()
        encode(Envelope(event, sender=stamp.node, hlc=stamp), self.limit)  # PayloadTooLarge, not a stuck outbox item
        self.outbox.put_event(event, stamp)
        self._count("events.emitted")
        log.info("agent event %s queued (%s)", name, event.event_id)
        self._on_result(event_key(event.event_id))
        return event.event_id

    # --- results -------------------------------------------------------------

    def _finish(self, claimed: Claimed, result: Result) -> None:
        """Result to the outbox first, then the inbox item done."""
        self._record(result)
        if not self.inbox.done(claimed):
            log.warning("%s: inbox claim was stale when finishing", claimed.assignment_id)

    def _record(self, result: Result) -> None:
        stamp = self._stamp()
        result = self._fit(result, stamp)
        if self.outbox.put_result(result, stamp):
            self._count(f"results.{result.status}")
            log.info("%s finished: %s%s", result.assignment_id, result.status, f" ({result.error.code})" if result.error else "")
        self._on_result(result.assignment_id)

    def _fit(self, result: Result, stamp: HLC) -> Result:
        """The result as it will be sent, or a failed one if it cannot be."""
        try:
            encode(Envelope(result, sender=stamp.node, hlc=stamp), self.limit)
            return result
        except PayloadTooLarge as exc:
            error = ErrorBody("output_too_large", f"{exc}: return less, or store it and return a reference", False)
        except (TypeError, ValueError) as exc:
            error = ErrorBody("invalid_output", f"the job's output is not JSON: {exc}", False)
        return dataclasses.replace(result, status="failed", output=None, error=error)
