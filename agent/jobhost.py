"""Runs one job in a child process that can be limited and killed.

The agent is threaded (MQTT, sync, runner), and ``fork()`` of a threaded
process copies locks held by other threads. So children come from a
multiprocessing *fork server*: a single-threaded process started once, with
the job modules already imported, that forks one child per job (a few
milliseconds; ``bench/agent_exec.py`` measures it).

The child, first thing, starts its own session (so it is the leader of a new
process group and session), points its stdout and stderr at a pipe the agent
reads into the try's log, sets its limits (``RLIMIT_CPU``, ``RLIMIT_DATA``, no
core files) and runs ``job.run`` with a :class:`ChildContext`. What the job
does with its context travels over a second pipe as small tuples
(``ctx.log`` lines go to the output pipe, in order with what the job prints):
``("progress", fraction, message)``, ``("event", name,
data)`` (answered by the agent only once the event is in the outbox, so
``emit_event`` stays durable), ``("sign", method, path)`` (answered with
the agent's signed-request headers: the child never holds the device key),
and finally the outcome.

Stopping is two-step: SIGTERM to the child, whose handler only sets the flag
``ctx.should_abort()`` reads; after the grace period, SIGKILL to the child's
process group and to every process still in its session (found in
``/proc``), so grandchildren (``command.run``'s program, a ``sleep`` a job
started) do not outlive it. The same sweep runs after every job, however it
ended.

How the child ended becomes an :class:`Outcome`: the job's return value or
error, ``cpu_limit`` (killed by ``SIGXCPU``), ``memory_limit`` (a
``MemoryError`` under ``RLIMIT_DATA``), ``killed`` (by the agent), or
``crashed`` with the exit code or signal.
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import resource
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from firmware_jobs.base import Job, JobAborted, JobError
from shared.clock import Clock, ManualClock, SystemClock
from shared.errors import OutpostError

log = logging.getLogger(__name__)

#: Modules the fork server imports once, so a child starts with them loaded.
#: ``__main__`` (a script run by path, such as the ``outpost-agent`` entry
#: point) is imported as ``__mp_main__`` like multiprocessing does in every
#: child anyway; once in the server it is not imported again per job.
PRELOAD = [
    "__main__", "agent.jobhost", "firmware_jobs.registry", "firmware_jobs.command", "firmware_jobs.diagnostics", "firmware_jobs.noop",
    "firmware_jobs.config_apply", "firmware_jobs.data_collect", "firmware_jobs.ota.job",
]
#: Exit status of a child that ran out of memory and could not even say so.
EXIT_MEMORY = 86
#: Exit status of a child that found the agent gone before it started.
EXIT_ORPHAN = 87
_PR_SET_PDEATHSIG = 1
_MIB = 1024 * 1024

_context: Any = None
_context_lock = threading.Lock()


def mp_context() -> Any:
    """The fork-server multiprocessing context (its server starts on first use)."""
    global _context
    with _context_lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
        return _context


def start_fork_server() -> None:
    """Start the fork server now instead of at the first job. The fleet
    simulator does, before its agents start: started later, by the first of
    a thousand jobs arriving together, the server's own start-up (a fresh
    interpreter importing the job modules) competes for the CPU with every
    thread of every agent in the process, and all jobs wait for it."""
    from multiprocessing import forkserver

    mp_context()
    forkserver.ensure_running()


class StartError(Exception):
    """The child process could not be started."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-job resource limits; 0 means none."""

    cpu_seconds: int = 0
    memory_mb: int = 0


@dataclass(frozen=True)
class Spec:
    """Everything the child needs; pickled to it (the job class by reference)."""

    assignment_id: str
    job_class: type[Job]
    params: dict[str, Any]
    work_dir: Path
    #: None: the system clock; else the agent's (test) clock's reading, which
    #: the child's clock keeps (a manual clock cannot cross a process boundary).
    clock_now: float | None
    settings: Mapping[str, Any]
    limits: Limits
    #: The agent's pid: a child that outlives it stops at once.
    agent_pid: int = 0


@dataclass
class Outcome:
    """How a child ended. ``kind``: ``ok`` (``output``), ``invalid_output``,
    ``job_error`` (``code``, ``message``, ``retryable``, ``aborted``),
    ``exception`` (``code`` or None, ``message``), ``cpu_limit``,
    ``memory_limit``, ``killed`` (by the agent) or ``crashed``."""

    kind: str
    output: Any = None
    code: str | None = None
    message: str = ""
    retryable: bool = True
    aborted: bool = False
    exit_code: int | None = None


@dataclass
class Hooks:
    """What the parent does with the child's requests."""

    progress: Callable[[float, str], None] = lambda fraction, message: None
    event: Callable[[str, Mapping[str, Any] | None], str] = field(default=lambda name, data: "")
    #: (method, path) -> signed-request headers; raises when there is no device key.
    sign: Callable[[str, str], Mapping[str, str]] | None = None
    output: Callable[[bytes], None] = lambda data: None
    #: Called with nothing every loop turn; the parent flushes throttled progress here.
    tick: Callable[[], None] = lambda: None
    #: Called with the child's pid (its session id) once it started.
    started: Callable[[int], None] = lambda pid: None


# --- the parent side ---------------------------------------------------------


#: Jobs running at once in this process, over all its agents; None: no cap.
_slots: threading.BoundedSemaphore | None = None


def limit_jobs(count: int | None) -> None:
    """Cap the jobs running at once in this process, whatever agent runs
    them. An agent process needs none (its concurrency settings are the
    cap); the fleet simulator does: a running job holds about eight file
    descriptors and two threads, and a thousand agents starting a job at the
    same moment would run out of files. A job over the cap waits for a slot
    before its process starts. Set it before any job runs."""
    global _slots
    _slots = None if count is None else threading.BoundedSemaphore(count)


def run(spec: Spec, hooks: Hooks, *, timeout: float | None, abort: threading.Event, grace: float) -> tuple[Outcome, bool]:
    """Run ``spec`` in a child and wait for it. ``abort`` (set by the caller)
    or ``timeout`` stops it: SIGTERM, then after ``grace`` seconds SIGKILL of
    its whole session. Returns the outcome and whether the timeout fired."""
    slots, acquired = _slots, False
    # An abort while waiting for a slot goes ahead without one: the child
    # is stopped at once, and the caller gets the usual killed outcome.
    while slots is not None and not (acquired := slots.acquire(timeout=0.2)) and not abort.is_set():
        pass
    try:
        return _run(spec, hooks, timeout=timeout, abort=abort, grace=grace)
    finally:
        if acquired and slots is not None:
            slots.release()


def _run(spec: Spec, hooks: Hooks, *, timeout: float | None, abort: threading.Event, grace: float) -> tuple[Outcome, bool]:
    ctx = mp_context()
    ctl, child_ctl = ctx.Pipe(duplex=True)
    out_r, out_w = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(spec, child_ctl, out_w), name=f"job-{spec.assignment_id}", daemon=False)
    try:
        process.start()
    except Exception as exc:  # a job class that cannot be pickled, no file descriptors left...
        ctl.close()
        out_r.close()
        raise StartError(f"the job's process could not be started: {type(exc).__name__}: {exc}") from exc
    finally:
        child_ctl.close()
        out_w.close()
    pid = process.pid
    assert pid is not None
    hooks.started(pid)
    pump_stop = threading.Event()
    pump = threading.Thread(target=_pump, args=(out_r, hooks.output, pump_stop), name=f"job-output-{pid}", daemon=True)
    pump.start()
    end = None if timeout is None else time.monotonic() + timeout
    timed_out = False
    term_at: float | None = None
    killed = False
    final: tuple[Any, ...] | None = None
    ctl_open = True
    ready_seen = False  # SIGTERM before the child's handler is set would kill it outright
    term_sent = False
    try:
        while True:
            waitables: list[Any] = [process.sentinel] + ([ctl] if ctl_open else [])
            ready = multiprocessing.connection.wait(waitables, timeout=0.05)
            if ctl_open and ctl in ready:
                try:
                    message = ctl.recv()
                except (EOFError, OSError):
                    ctl_open = False
                else:
                    if message[0] == "done":
                        final = message[1:]
                    elif message[0] == "ready":
                        ready_seen = True
                    else:
                        _serve(ctl, message, hooks)
            # Every message is read before the exit counts; the time limit is
            # checked on every turn, so a child that floods the pipe still stops.
            if process.sentinel in ready and not (ctl_open and ctl.poll()):
                break
            hooks.tick()
            now = time.monotonic()
            if term_at is None and (abort.is_set() or (end is not None and now >= end)):
                timed_out = not abort.is_set()
                term_at = now
            if term_at is not None and ready_seen and not term_sent:
                term_sent = True
                _signal(pid, signal.SIGTERM)
            if term_at is not None and not killed and now - term_at >= grace:
                log.warning("%s did not stop within %.1fs; killing its processes", spec.assignment_id, grace)
                killed = True
                kill_session(pid)
        process.join()
    finally:
        if process.exitcode is None:  # the agent itself is failing: leave nothing behind
            kill_session(pid)
            process.join(5)
        # Whatever the job started and left running dies with it.
        kill_session(pid, leader=False)
        ctl.close()
        pump.join(2.0)
        pump_stop.set()
        pump.join(1.0)
    # A job that put back the default SIGTERM action dies of the soft stop.
    killed = killed or (term_sent and final is None and process.exitcode == -signal.SIGTERM)
    return _outcome(final, process.exitcode, killed), timed_out


def _serve(ctl: Connection, message: tuple[Any, ...], hooks: Hooks) -> None:
    kind = message[0]
    try:
        if kind == "progress":
            hooks.progress(message[1], message[2])
        elif kind == "event":
            try:
                ctl.send(("ok", hooks.event(message[1], message[2])))
            except ValueError as exc:
                ctl.send(("ValueError", str(exc)))
            except Exception as exc:
                log.exception("agent event from a job could not be stored")
                ctl.send(("RuntimeError", f"the agent could not store the event: {exc}"))
        elif kind == "sign":
            try:
                if hooks.sign is None:
                    raise RuntimeError("this agent signs no HTTP requests for jobs (no device key)")
                if not (isinstance(message[1], str) and isinstance(message[2], str) and message[2].startswith("/")):
                    raise ValueError("signed_headers needs a method and an absolute path")
                ctl.send(("ok", dict(hooks.sign(message[1], message[2]))))
            except Exception as exc:
                ctl.send(("ValueError" if isinstance(exc, ValueError) else "RuntimeError", str(exc)))
    except (BrokenPipeError, OSError):
        pass  # the child died meanwhile; its exit tells the rest


def _outcome(final: tuple[Any, ...] | None, exit_code: int | None, killed: bool) -> Outcome:
    if final is not None:
        kind, *rest = final
        if kind == "ok":
            return Outcome("ok", output=json.loads(rest[0]), exit_code=exit_code)
        if kind == "job_error":
            code, message, retryable, aborted = rest
            return Outcome("job_error", code=code, message=message, retryable=retryable, aborted=aborted, exit_code=exit_code)
        if kind == "exception":
            return Outcome("exception", code=rest[0], message=rest[1], exit_code=exit_code)
        return Outcome(kind, message=rest[0] if rest else "", exit_code=exit_code)
    if killed:
        return Outcome("killed", exit_code=exit_code)
    if exit_code == -signal.SIGXCPU:
        return Outcome("cpu_limit", message="the job used up its CPU time", exit_code=exit_code)
    if exit_code == EXIT_MEMORY:
        return Outcome("memory_limit", message="the job ran out of memory", exit_code=exit_code)
    if exit_code is not None and exit_code < 0:
        name = signal.Signals(-exit_code).name if -exit_code in signal.valid_signals() else str(-exit_code)
        return Outcome("crashed", message=f"the job's process was killed by signal {name}", exit_code=exit_code)
    return Outcome("crashed", message=f"the job's process exited with status {exit_code} without a result", exit_code=exit_code)


def _pump(conn: Connection, sink: Callable[[bytes], None], stop: threading.Event) -> None:
    """Copy the child's stdout/stderr into ``sink`` until every writer is
    gone, or ``stop`` is set and nothing came for a moment (a process that
    escaped the session may hold the pipe open). Closes ``conn``."""
    fd = conn.fileno()
    # poll, not select: select() cannot watch a descriptor above 1024, which
    # a process of many agents (the fleet simulator) hands out.
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        while True:
            readable = poller.poll(200)
            if not readable:
                if stop.is_set():
                    return
                continue
            data = os.read(fd, 65536)
            if not data:
                return
            sink(data)
    except OSError:
        return
    finally:
        conn.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def kill_session(sid: int, leader: bool = True) -> int:
    """SIGKILL process ``sid`` (unless ``leader`` is false: it exited and its
    pid may be reused), its process group and every process in session
    ``sid`` (what a job started, even in a process group of its own);
    returns how many processes were signalled."""
    killed = 0
    # The leader itself first, by pid: it may not have made its session yet.
    for kill in (os.kill, os.killpg) if leader else (os.killpg,):
        try:
            kill(sid, signal.SIGKILL)
            killed += 1
        except (ProcessLookupError, PermissionError):
            pass
    # A few rounds: a process may fork between the scan and its kill.
    for _ in range(5):
        members = _session_members(sid)
        if not members:
            break
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)
    return killed


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``; empty without /proc."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        try:
            # os.open/os.read: a buffered open() per process made this scan
            # several times slower, and it runs after every job.
            fd = os.open(f"/proc/{name}/stat", os.O_RDONLY)
            try:
                stat = os.read(fd, 1024)
            finally:
                os.close(fd)
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2:].split(None, 4)
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            found.append(int(name))
    return found


# --- the child side ----------------------------------------------------------


class ChildContext:
    """The ``firmware_jobs.base.JobContext`` a job gets in its process."""

    def __init__(self, spec: Spec, ctl: Connection) -> None:
        self.assignment_id = spec.assignment_id
        self._work_dir = spec.work_dir
        self.clock: Clock = SystemClock() if spec.clock_now is None else ManualClock(spec.clock_now)
        self.settings = spec.settings
        self._ctl = ctl
        self._lock = threading.Lock()  # a job's own threads may log too
        self._log_fd = os.dup(1)
        self.abort_requested = False

    @property
    def work_dir(self) -> Path:
        """This assignment's own folder, made on first use."""
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    def progress(self, fraction: float, message: str = "") -> None:
        self._send(("progress", min(1.0, max(0.0, float(fraction))), str(message)[:500]))

    def log(self, line: str) -> None:
        # Through the same pipe as stdout and stderr (a copy of it), not the
        # control pipe, so the log keeps the order in which things happened.
        data = (str(line).rstrip("\n") + "\n").encode("utf-8", "replace")
        with self._lock:
            _flush()
            view = memoryview(data)
            while view:
                view = view[os.write(self._log_fd, view):]

    def should_abort(self) -> bool:
        return self.abort_requested

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> str:
        with self._lock:
            self._ctl.send(("event", name, None if data is None else dict(data)))
            kind, value = self._ctl.recv()
        if kind == "ok":
            return str(value)
        raise (ValueError if kind == "ValueError" else RuntimeError)(value)

    def signed_headers(self, method: str, path: str) -> dict[str, str]:
        with self._lock:
            self._ctl.send(("sign", str(method).upper(), str(path)))
            kind, value = self._ctl.recv()
        if kind == "ok":
            return dict(value)
        raise (ValueError if kind == "ValueError" else RuntimeError)(value)

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._ctl.send(message)


def _child_main(spec: Spec, ctl: Connection, out: Connection) -> None:
    os.setsid()
    _die_with_parent(spec.agent_pid)
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
    _set_limits(spec.limits)
    ctx = ChildContext(spec, ctl)

    def on_term(signum: int, frame: Any) -> None:
        ctx.abort_requested = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctl.send(("ready",))
        final = _run_job(spec, ctx)
        _flush()
        ctl.send(("done", *final))
    except MemoryError:
        os._exit(EXIT_MEMORY)
    except BaseException:
        # The outcome could not be sent (the agent went away): the exit status says enough.
        os._exit(70)
    finally:
        _flush()
    os._exit(0)  # no atexit, no finalizers of the job's objects


def _run_job(spec: Spec, ctx: ChildContext) -> tuple[Any, ...]:
    try:
        output = spec.job_class().run(ctx, spec.params)
    except MemoryError:
        return ("memory_limit", "the job ran out of memory (MemoryError under its memory limit)")
    except JobError as exc:
        return ("job_error", exc.code, str(exc), exc.retryable, isinstance(exc, JobAborted))
    except BaseException as exc:
        import traceback

        traceback.print_exc()  # into the try's log
        code = exc.code if isinstance(exc, OutpostError) else None
        return ("exception", code, f"{type(exc).__name__}: {exc}")
    try:
        return ("ok", json.dumps(output, allow_nan=False))
    except (TypeError, ValueError) as exc:
        return ("invalid_output", f"the job's output is not JSON: {exc}")
    except MemoryError:
        return ("memory_limit", "the job ran out of memory encoding its output")


def _die_with_parent(agent_pid: int) -> None:
    """If the agent is killed, its fork server exits, and then this child
    must not run on (the restarted agent would run the job a second time)."""
    # multiprocessing hands every child the agent's end of the pipe whose EOF
    # tells the fork server the agent is gone; a child keeping it open would
    # keep the server, and so itself, alive after the agent died.
    from multiprocessing import forkserver

    alive_fd = getattr(forkserver._forkserver, "_forkserver_alive_fd", None)
    if alive_fd is not None:
        try:
            os.close(alive_fd)
        except OSError:
            pass
        forkserver._forkserver._forkserver_alive_fd = None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the start-up sweep (sweep_stale) is all there is
    # The fork server (or the agent) may have died before prctl took effect.
    if os.getppid() == 1 or (agent_pid and not _exists(agent_pid)):
        os._exit(EXIT_ORPHAN)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), to tell it from a
    later process that got the same pid; None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def sweep_stale(sid: int, started: int | None) -> int:
    """After the agent died: kill what is left of the session of a job child
    that had pid ``sid`` and start time ``started``. Nothing is touched if
    the pid now belongs to another process (its start time differs).
    Returns how many processes were signalled."""
    now = start_time(sid)
    if now is not None and now != started:
        return 0  # the pid was reused: that session is someone else's
    return kill_session(sid, leader=now is not None)


def _set_limits(limits: Limits) -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.cpu_seconds > 0:
        # SIGXCPU at the soft limit ends the process; SIGKILL a second later
        # if something ignores it.
        _limit(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)
    if limits.memory_mb > 0:
        # RLIMIT_DATA, not RLIMIT_AS: it counts memory a process can write
        # (heap, anonymous mappings, stacks), not address space reserved but
        # never used (malloc arenas, runtimes that reserve gigabytes up front).
        _limit(resource.RLIMIT_DATA, limits.memory_mb * _MIB, limits.memory_mb * _MIB)


def _limit(kind: int, soft: int, hard: int) -> None:
    # The agent may itself run under a lower hard limit, which a child cannot raise.
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
