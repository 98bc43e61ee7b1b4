"""What the device-side jobs share: the device root from the agent's
settings, paths confined to a folder of it, and running a hook or an
allow-listed checker with a time limit.

Confinement is checked on the *resolved* path (symlinks followed), against
the resolved folder, so a link inside ``config/`` pointing at ``/etc`` is
refused just like ``../../etc``; the folder itself may be a link (a real
device may point ``config/`` at ``/etc/myapp``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from firmware_jobs.base import JobAborted, JobContext, JobError
from firmware_jobs.devroot import DeviceRoot

_POLL = 0.02
#: Characters of a program's output kept for error messages and logs.
_TAIL = 2000


def device_root(ctx: JobContext) -> DeviceRoot:
    """The device root the agent was configured with (``device_root`` setting)."""
    value = ctx.settings.get("device_root")
    if not value:
        raise JobError("this agent has no device root configured (setting device_root)", code="no_device_root", retryable=False)
    root = DeviceRoot(value)
    if not root.path.is_dir():
        raise JobError(f"the device root {str(root.path)!r} does not exist", code="no_device_root", retryable=False)
    return root


def confined(base: Path, relative: str, what: str) -> Path:
    """``base / relative`` after refusing absolute paths, ``..``, empty or
    odd components, and anything whose resolved form leaves ``base``.
    The result is not resolved in its last component, so the caller can
    still see whether it is a symlink. Raises ``JobError`` ``invalid_path``."""
    pure = PurePosixPath(relative)
    parts = relative.split("/")
    if pure.is_absolute() or not relative or any(p in ("", ".", "..") for p in parts) or "\x00" in relative:
        raise JobError(f"{what} {relative!r} must be a plain relative path inside {base.name}/ (no '..', no leading '/')", code="invalid_path", retryable=False)
    real_base = base.resolve()
    candidate = real_base.joinpath(*parts)
    resolved = candidate.resolve()
    if resolved != real_base and real_base not in resolved.parents:
        raise JobError(f"{what} {relative!r} leads outside {base.name}/ (through a symlink)", code="invalid_path", retryable=False)
    return candidate


@dataclass(frozen=True)
class Outcome:
    returncode: int | None  # None: killed at the time limit
    output: str  # the tail of stdout and stderr together

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        how = "timed out" if self.returncode is None else f"exited {self.returncode}"
        return how + (f": {self.output}" if self.output else "")


def run_program(ctx: JobContext, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                abortable: bool = True) -> Outcome:
    """Run ``argv`` (no shell) in its own process group with stdin closed and
    a minimal environment plus ``env``; kill the group at ``timeout`` seconds
    or when the job must abort (then ``JobAborted``). Output goes to a file
    in the work dir, so a chatty program cannot grow the job's memory."""
    paths = [d for d in os.environ.get("PATH", os.defpath).split(os.pathsep) if os.path.isabs(d)]
    full_env = {"PATH": os.pathsep.join(paths), "HOME": str(ctx.work_dir), "LANG": "C.UTF-8", **(env or {})}
    out_path = ctx.work_dir / f".out-{os.getpid()}-{time.monotonic_ns()}"
    with open(out_path, "w+b") as out:
        try:
            proc = subprocess.Popen(list(argv), cwd=cwd or ctx.work_dir, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, process_group=0)
        except OSError as exc:
            out_path.unlink(missing_ok=True)
            return Outcome(127, f"cannot start {argv[0]!r}: {exc.strerror or exc}")
        deadline = time.monotonic() + timeout
        aborted = timed_out = False
        # Not reaped until the group is killed (WNOWAIT), so the group id
        # cannot be reused by an unrelated process before killpg.
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if abortable and ctx.should_abort():
                aborted = True
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(_POLL)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # helpers the program left running die with it
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        size = out.seek(0, os.SEEK_END)
        out.seek(max(0, size - _TAIL))
        tail = out.read().decode("utf-8", errors="replace").strip()
    out_path.unlink(missing_ok=True)
    if aborted:
        raise JobAborted(f"{argv[0]!r} was stopped on request")
    return Outcome(None if timed_out else proc.returncode, tail)
