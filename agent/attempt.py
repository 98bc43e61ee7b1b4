"""Runs one claimed assignment and turns its outcome into a stored Result.

The scheduling of assignments (claiming, held ``not_before`` items, worker
threads, slots, cancellation) is :mod:`agent.runner`'s; this module is what a
worker does with the one assignment it was given.

For each assignment, in order: the ``deadline`` (passed: failed
``deadline_passed``), the registry lookup (``unknown_job_type``), parameter
validation (``invalid_params``), the started marker (a job type that is not
``rerunnable`` and was interrupted mid-run fails ``interrupted`` instead of
running again), then the job itself with a :class:`JobContext` and the
assignment's ``timeout``. The result is stamped with the HLC at the moment
the job finished, written to the outbox, and only then is the inbox item
marked done; while the queue fails (a full disk, a locked database) that
write is retried, so a computed result is never dropped.

Each job runs in a child process of its own (:mod:`agent.jobhost`), in its
own session, with CPU and memory limits (``job_cpu_seconds``,
``job_memory_mb``, per job type overrides): a worker thread only waits for it
and serves its context. On timeout, cancellation or shutdown the child's
abort flag is set (SIGTERM); after the abort grace the child and everything
it started are killed. Exceeding a limit fails the result (``cpu_limit``,
``memory_limit``); a child that dies without a result fails it
``job_crashed`` (retryable), and the agent goes on. Each job has a work
folder, removed afterwards however the job ended.

What a job logs (``ctx.log``, stdout, stderr) is kept in a per-try file of at
most ``max_log_bytes`` (:mod:`agent.joblogs`) and stored in the outbox as
``LogChunk`` items (key ``log/<assignment id>/<seq>``) *before* the result,
so the hub has the log when the result lands. Progress reports leave through
``on_event`` as ``Progress`` messages, at most one a second per assignment
(``progress_every``), the last one always. A result that does not fit
``max_message_bytes`` (or is not JSON) is stored as failed instead of
sticking in the outbox. Both intervals (``abort_grace``, ``progress_every``)
are given by the runner, which keeps the agent's timing settings.

No network I/O happens here: events (``started``, progress) leave through the
``on_event`` callback and new results are announced through ``on_result``.
"""

from __future__ import annotations

import dataclasses
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


class Registry(Protocol):
    def get(self, name: str) -> Job: ...


class Attempts:
    """Runs single assignments and records their results; see the module
    docstring. Thread-safe: every worker thread of the runner shares one."""

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
        abort_grace: float,
        progress_every: float,
        max_message_bytes: int,
        on_event: Callable[[Message], object],
        on_result: Callable[[str], None],
        count: Callable[[str], None],
        job_cpu_seconds: int,
        job_memory_mb: int,
        job_type_cpu_seconds: Mapping[str, int] | None,
        job_type_memory_mb: Mapping[str, int] | None,
        max_log_bytes: int,
        log_root: Path,
        sign_request: Callable[[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        self.inbox, self.outbox, self.registry, self.clock = inbox, outbox, registry, clock
        self._stamp = stamp
        self.work_root = work_root
        self.job_settings = dict(job_settings)
        self.abort_grace, self.progress_every = abort_grace, progress_every
        self.limit = max_message_bytes
        self._on_event, self._on_result, self._count = on_event, on_result, count
        self._cpu = (job_cpu_seconds, dict(job_type_cpu_seconds or {}))
        self._memory = (job_memory_mb, dict(job_type_memory_mb or {}))
        self.max_log_bytes = max_log_bytes
        self.log_root = log_root
        self.sign_request = sign_request

    def execute(self, claimed: Claimed, run: Run, stopping: threading.Event) -> None:
        """Run the assignment and store its result durably (nothing is stored
        when the agent stops first: the claim returns at the next start)."""
        result = self._attempt(claimed.assign, run)
        if result is not None and self._finish_durably(claimed, result, stopping):
            # Only now: a crash before the outbox commit must still find
            # the marker, or a job that is not safe to re-run runs twice.
            (self.work_root / f"{dir_name(claimed.assignment_id)}.started").unlink(missing_ok=True)

    def _finish_durably(self, claimed: Claimed, result: Result, stopping: threading.Event) -> bool:
        """Store the try's log chunks and then the result, retrying while the
        queue fails (a full disk, a locked database): a computed result is
        never dropped. False only if the agent stops first; the claim then
        returns at the next start."""
        delay = 0.5
        while True:
            try:
                self._ship_log(claimed.assignment_id)
                self.finish(claimed, result)
                return True
            except QueueError:
                log.exception("%s: storing the result failed; retrying in %.1fs", claimed.assignment_id, delay)
                self._count("errors.outbox_write")
                if stopping.wait(delay):
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
        progress = _ProgressThrottle(aid, self.clock, self._on_event, self.progress_every)
        hooks = jobhost.Hooks(
            progress=progress.report, event=self.emit_event, output=capture.write, tick=progress.flush_due,
            started=lambda pid: _write_session(session_file, pid), sign=self.sign_request,
        )
        try:
            outcome, timed_out = jobhost.run(spec, hooks, timeout=assign.timeout, abort=run.abort_flag, grace=self.abort_grace)
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

    def sweep_stale_sessions(self) -> None:
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

    def finish(self, claimed: Claimed, result: Result) -> None:
        """Result to the outbox first, then the inbox item done."""
        self.record(result)
        if not self.inbox.done(claimed):
            log.warning("%s: inbox claim was stale when finishing", claimed.assignment_id)

    def record(self, result: Result) -> None:
        """Store ``result`` in the outbox (fitted to the envelope limit)."""
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
    ``every`` seconds, the latest report always in the end."""

    def __init__(self, assignment_id: str, clock: Clock, send: Callable[[Message], object], every: float) -> None:
        self.assignment_id, self.clock, self._send, self.every = assignment_id, clock, send, every
        self._last_sent = -every
        self._pending: Progress | None = None
        self._lock = threading.Lock()

    def report(self, fraction: float, message: str) -> None:
        with self._lock:
            self._pending = Progress(self.assignment_id, float(fraction), str(message), self.clock.now())
        self.flush_due()

    def flush_due(self) -> None:
        with self._lock:
            if self._pending is None or time.monotonic() - self._last_sent < self.every:
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
