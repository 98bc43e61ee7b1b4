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

Each job runs in a child process of its own (:mod:`agent.jobhost`), in its
own session, with CPU and memory limits (``job_cpu_seconds``,
``job_memory_mb``, per job type overrides): a worker thread here only waits
for it and serves its context. On timeout, cancellation or shutdown the
child's abort flag is set (SIGTERM); after ``ABORT_GRACE`` seconds the child
and everything it started are killed. Exceeding a limit fails the result
(``cpu_limit``, ``memory_limit``); a child that dies without a result fails
it ``job_crashed`` (retryable), and the agent goes on. Each job has a work
folder, removed afterwards however the job ended.

Besides ``concurrency`` workers overall, ``job_type_concurrency`` caps the
jobs of one type running at once: an assignment whose type has no free slot
waits in the ready list while the workers take other types.

What a job logs (``ctx.log``, stdout, stderr) is kept in a per-try file of at
most ``max_log_bytes`` (:mod:`agent.joblogs`) and stored in the outbox as
``LogChunk`` items (key ``log/<assignment id>/<seq>``) *before* the result,
so the hub has the log when the result lands. Progress reports leave through
``on_event`` as ``Progress`` messages, at most one a second per assignment,
the last one always.

An idle runner does not poll: the claimer and idle workers sleep until woken
(:meth:`Runner.wake` on new work or a released claim, a finished job) or
until the next held assignment is due, with a long backstop timeout
(:data:`IDLE_WAIT`), so an idle agent costs a device almost no CPU.

No network I/O happens here: events (``started``) leave through the
``on_event`` callback and new results are announced through ``on_result``.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from agent import jobhost
from agent.context import Run, dir_name, failed, make_agent_event
from agent.joblogs import CHUNK_BYTES, LogCapture, split
from agent.queues import Claimed, Inbox, Outbox, QueueError, event_key
from firmware_jobs.base import Job
from shared.clock import Clock, SystemClock
from shared.envelope import Envelope, encode
from shared.errors import InvalidParams, PayloadTooLarge, UnknownJobType
from shared.files import atomic_write
from shared.hlc import HLC
from shared.messages import JobError as ErrorBody
from shared.messages import Assign, LogChunk, Message, Progress, Result, Started

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
#: How long a job gets to stop after its abort flag is set.
ABORT_GRACE = 2.0
#: Least time between two progress reports of one assignment, in seconds.
PROGRESS_EVERY = 1.0
#: Most assignments waiting in the ready list for a slot of their job type.
MAX_WAITING_FOR_TYPE = 256


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
        job_type_concurrency: Mapping[str, int] | None = None,
        job_cpu_seconds: int = 0,
        job_memory_mb: int = 0,
        job_type_cpu_seconds: Mapping[str, int] | None = None,
        job_type_memory_mb: Mapping[str, int] | None = None,
        max_log_bytes: int = 1024 * 1024,
        log_root: Path | None = None,
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
        self._running: dict[str, tuple[Run, Claimed]] = {}
        self._type_slots = dict(job_type_concurrency or {})
        self._type_busy: collections.Counter[str] = collections.Counter()
        self._cpu = (job_cpu_seconds, dict(job_type_cpu_seconds or {}))
        self._memory = (job_memory_mb, dict(job_type_memory_mb or {}))
        self.max_log_bytes = max_log_bytes
        self.log_root = log_root if log_root is not None else work_root.parent / "logs"
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self.work_root.mkdir(parents=True, exist_ok=True)
        self._sweep_stale_sessions()
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
            result = self._attempt(claimed.assign, run)
            if result is not None and self._finish_durably(claimed, result):
                # Only now: a crash before the outbox commit must still find
                # the marker, or a job that is not safe to re-run runs twice.
                (self.work_root / f"{dir_name(aid)}.started").unlink(missing_ok=True)
        finally:
            with self._cv:
                del self._running[aid]

    def _finish_durably(self, claimed: Claimed, result: Result) -> bool:
        """Store the try's log chunks and then the result, retrying while the
        queue fails (a full disk, a locked database): a computed result is
        never dropped. False only if the agent stops first; the claim then
        returns at the next start."""
        delay = 0.5
        while True:
            try:
                self._ship_log(claimed.assignment_id)
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

    def _limits(self, job_type: str) -> jobhost.Limits:
        return jobhost.Limits(self._cpu[1].get(job_type, self._cpu[0]), self._memory[1].get(job_type, self._memory[0]))

    def _call(self, job: Job, params: dict[str, Any], assign: Assign, run: Run, work_dir: Path, started_at: float) -> Result | None:
        aid = assign.assignment_id
        limits = self._limits(assign.job_type)
        spec = jobhost.Spec(
            aid, type(job), params, work_dir, None if isinstance(self.clock, SystemClock) else self.clock.now(), self.job_settings, limits, os.getpid(),
        )
        session_file = self.work_root / f"{dir_name(aid)}.session"
        capture = LogCapture(self._log_path(aid), self.max_log_bytes)
        progress = _ProgressThrottle(aid, self.clock, self._on_event)
        hooks = jobhost.Hooks(
            progress=progress.report, event=self.emit_event, output=capture.write, tick=progress.flush_due,
            started=lambda pid: _write_session(session_file, pid),
        )
        try:
            outcome, timed_out = jobhost.run(spec, hooks, timeout=assign.timeout, abort=run.abort_flag, grace=ABORT_GRACE)
        except jobhost.StartError as exc:
            log.error("%s: %s", aid, exc)
            return failed(assign, "job_crashed", str(exc), True, started_at, self.clock.now())
        finally:
            session_file.unlink(missing_ok=True)
            capture.close()
            progress.flush()
            # Also after a kill: the job could not clean up after itself.
            if work_dir.exists():
                shutil.rmtree(work_dir, ignore_errors=True)
        finished_at = self.clock.now()
        if timed_out:
            return failed(assign, "timeout", f"the job exceeded its {assign.timeout}s time limit", True, started_at, finished_at)
        stopped = outcome.kind == "killed" or (outcome.kind == "job_error" and outcome.aborted)
        if run.reason == "shutdown" and stopped:
            return None
        if run.reason == "cancelled" and stopped:
            return failed(assign, "cancelled", run.detail, False, started_at, finished_at)
        kind = outcome.kind
        if kind == "ok":
            return Result(aid, assign.try_number, "success", outcome.output, None, started_at, finished_at)
        if kind == "job_error":
            return failed(assign, outcome.code or "job_error", outcome.message, outcome.retryable, started_at, finished_at)
        if kind == "invalid_output":
            return failed(assign, "invalid_output", outcome.message, False, started_at, finished_at)
        if kind == "cpu_limit":
            return failed(assign, "cpu_limit", f"the job used more than its {limits.cpu_seconds} CPU seconds and was stopped", False, started_at, finished_at)
        if kind == "memory_limit":
            return failed(assign, "memory_limit", f"the job needed more than its {limits.memory_mb} MiB of memory: {outcome.message}", False, started_at, finished_at)
        if kind == "exception":
            log.error("%s: job %s crashed: %s", aid, assign.job_type, outcome.message)
            return failed(assign, outcome.code or "job_crashed", outcome.message, True, started_at, finished_at)
        # A child that died without a word (os._exit, a signal, a segfault),
        # or one killed on a cancel that arrived after it finished its work.
        log.error("%s: job %s: %s", aid, assign.job_type, outcome.message or "killed")
        return failed(assign, "job_crashed", f"{outcome.message or 'the job was killed'} (exit code {outcome.exit_code})", True, started_at, finished_at)

    def _sweep_stale_sessions(self) -> None:
        """Kill what jobs of an agent process that died left running (its
        children die with it; what they started may not)."""
        for path in self.work_root.glob("*.session"):
            try:
                pid_text, _, started = path.read_text().partition(" ")
                killed = jobhost.sweep_stale(int(pid_text), int(started) if started.strip() else None)
            except (OSError, ValueError):
                log.warning("unreadable job session file %s; removed", path)
                killed = 0
            if killed:
                log.warning("killed %d process(es) left by a job of the previous agent run (%s)", killed, path.stem)
            path.unlink(missing_ok=True)

    # --- logs ----------------------------------------------------------------

    def _log_path(self, assignment_id: str) -> Path:
        return self.log_root / f"{dir_name(assignment_id)}.log"

    def _ship_log(self, assignment_id: str) -> None:
        """Store the try's log (if it logged anything) in the outbox as
        chunks, then forget the file. Idempotent: chunks are keyed by seq."""
        path = self._log_path(assignment_id)
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("%s: the job log cannot be read (%s); it is not sent", assignment_id, exc)
            return
        if text:
            stamp = self._stamp()
            empty = LogChunk(assignment_id, 0, "", final=True)
            overhead = len(encode(Envelope(empty, sender=stamp.node, hlc=stamp), self.limit)) + 16
            budget = min(CHUNK_BYTES, self.limit - overhead)
            pieces = split(text, budget) if budget >= 256 else []
            if not pieces:
                log.warning("%s: the log cannot be sent: max_message_bytes %d leaves no room for it", assignment_id, self.limit)
            for seq, piece in enumerate(pieces):
                chunk = LogChunk(assignment_id, seq, piece, final=seq == len(pieces) - 1)
                if self.outbox.put_log(chunk, self._stamp()):
                    self._count("logs.chunks")
        path.unlink(missing_ok=True)

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


def _write_session(path: Path, pid: int) -> None:
    # Not atomic and not fsynced: it only matters after a crash of the agent
    # alone, when the file system is intact; losing it costs one sweep. A full
    # disk must not stop the job: without the file only that sweep is lost.
    try:
        path.write_text(f"{pid} {jobhost.start_time(pid) or ''}")
    except OSError as exc:
        log.warning("cannot record the job session in %s (%s); a crash of the agent now would leave its processes to the next sweep", path, exc)


class _ProgressThrottle:
    """Sends a job's progress as ``Progress`` messages: at most one per
    :data:`PROGRESS_EVERY` seconds, the latest report always in the end."""

    def __init__(self, assignment_id: str, clock: Clock, send: Callable[[Message], object]) -> None:
        self.assignment_id, self.clock, self._send = assignment_id, clock, send
        self._last_sent = -PROGRESS_EVERY
        self._pending: Progress | None = None
        self._lock = threading.Lock()

    def report(self, fraction: float, message: str) -> None:
        with self._lock:
            self._pending = Progress(self.assignment_id, float(fraction), str(message), self.clock.now())
        self.flush_due()

    def flush_due(self) -> None:
        with self._lock:
            if self._pending is None or time.monotonic() - self._last_sent < PROGRESS_EVERY:
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
            if pending is None:
                return
            self._last_sent = time.monotonic()
        try:
            self._send(pending)  # best effort: a lost report is replaced by the next
        except Exception:
            log.debug("%s: progress report not sent", self.assignment_id, exc_info=True)
