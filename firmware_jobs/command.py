"""``command.run``: run one allow-listed program, never through a shell.

The allow-list is ``ctx.settings["command_allowlist"]``, set by the device's
owner in the agent configuration. The rule is an exact string match of
``argv[0]`` against an entry, with no normalisation:

* an entry that is an absolute path (``/usr/bin/systemctl``) allows exactly
  that ``argv[0]``;
* an entry that is a bare name (``uptime``) allows exactly ``argv[0] ==
  "uptime"``, and the program is looked up only in the *absolute* directories
  of the agent's ``PATH`` (never the work directory, never ``.``);
* nothing else matches: ``./uptime``, ``bin/uptime``, ``/tmp/x/uptime`` or
  ``/usr/bin/../bin/uptime`` are refused even when ``uptime`` or
  ``/usr/bin/uptime`` is listed. Basename matching is deliberately not done:
  it would let ``/tmp/evil/uptime`` pass for ``uptime``.

The program runs in ``ctx.work_dir`` in its own process group (inside the
job's session, so the agent can still find and kill it if this job's process
is killed before it could clean up) with
stdin closed and a minimal environment (``PATH``, ``HOME``, ``LANG``): the
agent's own environment may hold broker credentials and is not passed on.
When the time limit passes or the job is aborted, the whole group gets
SIGTERM, then SIGKILL after a short grace; when the program exits, anything it
left running in its group is killed too, so no orphans outlive the job.
Stdout and stderr are captured up to ``max_output`` bytes each (the rest is
read and counted, then dropped) so the result fits in one envelope.

A non-zero exit fails the task (Airflow BashOperator semantics) with a
retryable ``command_failed`` error. Idempotency is the command's: the agent
cannot know whether an arbitrary program is safe to run twice, so this job is
not ``rerunnable`` (an interrupted run is reported failed, not silently
re-run); DAG retries re-run it deliberately.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from firmware_jobs.base import Job, JobAborted, JobContext, JobError
from firmware_jobs.registry import register

#: Seconds between SIGTERM and SIGKILL of a program being stopped.
GRACE = 2.0
_POLL = 0.05
_CHUNK = 65536
_TAIL = 500


@register
class RunCommand(Job):
    """Run ``argv`` (allow-listed) and return exit code, output and duration."""

    name = "command.run"
    version = "1.0"
    description = "Run one allow-listed program without a shell, with a time limit and output caps."
    rerunnable = False
    params_schema = {
        "type": "object",
        "properties": {
            "argv": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "description": "Program and arguments; argv[0] must be on the agent's command allow-list.",
            },
            "timeout": {"type": "number", "minimum": 0.1, "maximum": 3600, "default": 30, "description": "Seconds before the program is killed."},
            "max_output": {
                "type": "integer",
                "minimum": 0,
                "maximum": 100_000,
                "default": 65536,
                "description": "Bytes of stdout and of stderr kept; both at the maximum still fit one 256 KiB envelope.",
            },
        },
        "required": ["argv"],
        "additionalProperties": False,
    }

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        argv: list[str] = params["argv"]
        program = resolve_program(argv[0], ctx.settings.get("command_allowlist") or ())
        ctx.log(f"$ {shlex.join(argv)}")
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                executable=program,
                cwd=ctx.work_dir,
                env=_child_env(ctx.work_dir),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                process_group=0,
            )
        except (OSError, ValueError) as exc:
            raise JobError(f"cannot start {argv[0]!r}: {exc}", code="command_start_failed", retryable=False) from exc
        assert proc.stdout is not None and proc.stderr is not None
        stdout = _Capture(proc.stdout, params["max_output"])
        stderr = _Capture(proc.stderr, params["max_output"])
        ending = "exited"
        try:
            ending = _wait(proc, ctx, started + params["timeout"])
        finally:
            _end_group(proc, leader_exited=ending == "exited")
            stdout.join()
            stderr.join()
        duration = time.monotonic() - started
        tail = _tail(stderr.text() or stdout.text())
        ctx.log(f"{argv[0]} ended ({ending}, exit {proc.returncode}) after {duration:.3f}s")
        if ending == "aborted":
            raise JobAborted(f"command {argv[0]!r} was stopped on request after {duration:.1f}s")
        if ending == "timeout":
            raise JobError(f"command {argv[0]!r} timed out after {params['timeout']}s and was killed{tail}", code="command_timeout")
        if proc.returncode != 0:
            how = f"exited {proc.returncode}" if proc.returncode > 0 else f"was killed by {signal.Signals(-proc.returncode).name}"
            raise JobError(f"command {argv[0]!r} {how}{tail}", code="command_failed", retryable=True)
        return {
            "argv": argv,
            "exit_code": proc.returncode,
            "stdout": stdout.text(),
            "stderr": stderr.text(),
            "stdout_bytes": stdout.total,
            "stderr_bytes": stderr.total,
            "truncated": stdout.truncated or stderr.truncated,
            "duration_seconds": round(duration, 6),
        }


def resolve_program(argv0: str, allowlist: Iterable[str]) -> str:
    """The executable to run for ``argv0``, under the rule in the module
    docstring. Raises ``JobError`` (not retryable) when it is not allowed or
    not found."""
    if argv0 not in set(allowlist):
        raise JobError(f"command {argv0!r} is not on this agent's command allow-list", code="command_not_allowed", retryable=False)
    if os.path.isabs(argv0):
        return argv0
    if "/" in argv0:
        raise JobError(f"allow-list entry {argv0!r} is neither a bare name nor an absolute path", code="command_not_allowed", retryable=False)
    for directory in _safe_path():
        candidate = os.path.join(directory, argv0)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise JobError(f"command {argv0!r} is allowed but not found in {os.pathsep.join(_safe_path())}", code="command_not_found", retryable=False)


def _safe_path() -> list[str]:
    return [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if os.path.isabs(d)]


def _child_env(work_dir: Path) -> dict[str, str]:
    return {"PATH": os.pathsep.join(_safe_path()), "HOME": str(work_dir), "LANG": "C.UTF-8"}


def _wait(proc: subprocess.Popen[bytes], ctx: JobContext, deadline: float) -> str:
    """Wait for the program: ``"exited"``, ``"aborted"`` or ``"timeout"``.
    The leader is never reaped here (``WNOWAIT``), so its pid, which is the
    group id, cannot be reused before ``_end_group`` signals the group."""
    while True:
        if _exited(proc):
            return "exited"
        if ctx.should_abort():
            return "aborted"
        if time.monotonic() >= deadline:
            return "timeout"
        time.sleep(_POLL)


def _exited(proc: subprocess.Popen[bytes]) -> bool:
    return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _end_group(proc: subprocess.Popen[bytes], leader_exited: bool) -> None:
    if not leader_exited:
        _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(_POLL)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _tail(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    return ": " + (text if len(text) <= _TAIL else "..." + text[-_TAIL:])


class _Capture:
    """Drain a pipe on a thread, keeping the first ``limit`` bytes."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.data = bytearray()
        self.total = 0
        self._limit = limit
        self._thread = threading.Thread(target=self._drain, args=(stream,), daemon=True)
        self._thread.start()

    def _drain(self, stream: IO[bytes]) -> None:
        with stream:
            while chunk := os.read(stream.fileno(), _CHUNK):
                self.total += len(chunk)
                room = self._limit - len(self.data)
                if room > 0:
                    self.data += chunk[:room]

    def join(self) -> None:
        # The group is dead by now, so the pipe closes at once unless the
        # program handed it to a process that escaped the group (setsid).
        self._thread.join(GRACE)

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")
