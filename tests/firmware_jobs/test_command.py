"""``command.run``: allow-list, no shell, time limit, process-group kill, output caps."""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from firmware_jobs import command, registry
from firmware_jobs.base import JobAborted, JobError
from shared.errors import InvalidParams

if TYPE_CHECKING:  # the ctx fixture's type
    from tests.firmware_jobs.conftest import RecordingContext


def run(ctx: RecordingContext, allow: list[str], **params: Any) -> dict[str, Any]:
    ctx.settings = {**ctx.settings, "command_allowlist": allow}
    job = registry.get("command.run")
    return job.run(ctx, job.validate(params))


def refused(ctx: RecordingContext, allow: list[str], argv: list[str]) -> JobError:
    with pytest.raises(JobError) as info:
        run(ctx, allow, argv=argv)
    return info.value


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (in a container nobody
    may reap orphans, and a zombie is dead for our purpose)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_dead(pid: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_pids(ctx: RecordingContext, *names: str) -> list[int]:
    deadline = time.monotonic() + 5
    while not all((ctx.work_dir / n).exists() and (ctx.work_dir / n).read_text().strip() for n in names):
        assert time.monotonic() < deadline, f"program did not write {names}"
        time.sleep(0.02)
    return [int((ctx.work_dir / n).read_text()) for n in names]


@pytest.fixture(autouse=True)
def no_strays(ctx: RecordingContext) -> Iterator[None]:
    """Whatever a failing test left running is killed, so failures don't pile up sleepers."""
    yield
    for pid_file in ctx.work_dir.glob("*.pid"):
        text = pid_file.read_text().strip()
        if text.isdigit() and alive(int(text)):
            os.kill(int(text), signal.SIGKILL)


# --- allow-list ----------------------------------------------------------------


def test_allow_listed_bare_name_runs_in_the_work_dir(ctx: RecordingContext) -> None:
    result = run(ctx, ["pwd", "echo"], argv=["pwd"])
    assert result["stdout"] == f"{ctx.work_dir}\n"
    assert result["exit_code"] == 0 and result["truncated"] is False
    assert result["duration_seconds"] >= 0 and result["argv"] == ["pwd"]
    assert ctx.lines[0] == "$ pwd"


def test_allow_listed_absolute_path_runs(ctx: RecordingContext) -> None:
    echo = "/bin/echo" if os.path.exists("/bin/echo") else "/usr/bin/echo"
    assert run(ctx, [echo], argv=[echo, "hi"])["stdout"] == "hi\n"


def test_command_not_on_the_allow_list_is_refused_without_retry(ctx: RecordingContext) -> None:
    error = refused(ctx, ["echo"], ["rm", "-rf", "/"])
    assert error.code == "command_not_allowed" and error.retryable is False
    assert "'rm' is not on this agent's command allow-list" in str(error)


def test_empty_or_missing_allow_list_refuses_everything(ctx: RecordingContext) -> None:
    assert refused(ctx, [], ["echo"]).code == "command_not_allowed"
    ctx.settings = {"agent_version": "x"}
    job = registry.get("command.run")
    with pytest.raises(JobError, match="allow-list"):
        job.run(ctx, job.validate({"argv": ["echo"]}))


@pytest.mark.parametrize("trick", ["./echo", "bin/echo", "/tmp/evil/echo", "/bin/echo", "/usr/bin/echo", "echo ", "ECHO", "/usr/bin/../bin/echo"])
def test_path_tricks_do_not_match_a_bare_name(ctx: RecordingContext, trick: str) -> None:
    # A program called "echo" in the work dir would run if "./echo" matched "echo".
    fake = ctx.work_dir / "echo"
    fake.write_text("#!/bin/sh\ntouch pwned\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert refused(ctx, ["echo"], [trick]).code == "command_not_allowed"
    assert not (ctx.work_dir / "pwned").exists()


def test_absolute_entry_does_not_allow_the_bare_name(ctx: RecordingContext) -> None:
    assert refused(ctx, ["/bin/echo"], ["echo"]).code == "command_not_allowed"


def test_relative_allow_list_entries_never_run(ctx: RecordingContext) -> None:
    assert refused(ctx, ["bin/tool"], ["bin/tool"]).code == "command_not_allowed"


def test_bare_names_are_not_looked_up_in_relative_path_entries(ctx: RecordingContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rel = tmp_path / "rel"
    rel.mkdir()
    tool = rel / "only-here"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"rel{os.pathsep}.{os.pathsep}/usr/bin{os.pathsep}/bin")
    error = refused(ctx, ["only-here"], ["only-here"])
    assert error.code == "command_not_found" and error.retryable is False


def test_no_shell_interprets_the_arguments(ctx: RecordingContext) -> None:
    result = run(ctx, ["echo"], argv=["echo", "$HOME; touch pwned", "`id`"])
    assert result["stdout"] == "$HOME; touch pwned `id`\n"
    assert not (ctx.work_dir / "pwned").exists()


def test_agent_environment_is_not_passed_to_the_command(ctx: RecordingContext, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OUTPOST_AGENT_MQTT_PASSWORD", "hunter2")
    env = run(ctx, ["env"], argv=["env"])["stdout"]
    assert "hunter2" not in env
    assert f"HOME={ctx.work_dir}" in env.splitlines()


# --- failures --------------------------------------------------------------------


def test_non_zero_exit_fails_the_task_with_the_stderr_tail(ctx: RecordingContext) -> None:
    error = refused(ctx, ["sh"], ["sh", "-c", "echo partial; echo boom >&2; exit 3"])
    assert error.code == "command_failed" and error.retryable is True
    assert str(error) == "command 'sh' exited 3: boom"


def test_death_by_signal_is_reported_by_name(ctx: RecordingContext) -> None:
    assert "was killed by SIGKILL" in str(refused(ctx, ["sh"], ["sh", "-c", "kill -9 $$"]))


def test_allow_listed_but_missing_program(ctx: RecordingContext) -> None:
    error = refused(ctx, ["no-such-program-xyz"], ["no-such-program-xyz"])
    assert error.code == "command_not_found"


def test_parameters_are_validated() -> None:
    job = registry.get("command.run")
    with pytest.raises(InvalidParams, match="params.argv: \\[\\] is shorter than 1 items"):
        job.validate({"argv": []})
    with pytest.raises(InvalidParams, match="params.timeout: 3601 is above the maximum 3600"):
        job.validate({"argv": ["x"], "timeout": 3601})
    with pytest.raises(InvalidParams, match="params.argv: required field is missing"):
        job.validate({})
    assert job.validate({"argv": ["x"]}) == {"argv": ["x"], "timeout": 30, "max_output": 65536}


# --- time limit, abort, process group --------------------------------------------------


def test_timeout_kills_the_child_and_its_grandchild(ctx: RecordingContext) -> None:
    script = "echo $$ > child.pid; sleep 300 & echo $! > grandchild.pid; wait"
    started = time.monotonic()
    with pytest.raises(JobError) as info:
        run(ctx, ["sh"], argv=["sh", "-c", script], timeout=0.5)
    assert info.value.code == "command_timeout" and info.value.retryable is True
    assert "timed out after 0.5s" in str(info.value)
    assert time.monotonic() - started < 0.5 + command.GRACE + 1
    for pid in read_pids(ctx, "child.pid", "grandchild.pid"):
        assert wait_dead(pid), f"process {pid} survived the timeout"


def test_processes_ignoring_sigterm_are_killed_after_the_grace(ctx: RecordingContext) -> None:
    script = "trap '' TERM; echo $$ > child.pid; sleep 300 & echo $! > grandchild.pid; wait"
    started = time.monotonic()
    with pytest.raises(JobError, match="timed out"):
        run(ctx, ["sh"], argv=["sh", "-c", script], timeout=0.3)
    assert command.GRACE <= time.monotonic() - started < 0.3 + command.GRACE + 1.5
    for pid in read_pids(ctx, "child.pid", "grandchild.pid"):
        assert wait_dead(pid), f"process {pid} survived SIGKILL"


def test_background_leftovers_are_killed_when_the_command_exits(ctx: RecordingContext) -> None:
    started = time.monotonic()
    result = run(ctx, ["sh"], argv=["sh", "-c", "sleep 300 & echo $! > bg.pid; echo done"])
    assert result["stdout"] == "done\n"
    assert time.monotonic() - started < 2, "the job waited for a background process"
    [pid] = read_pids(ctx, "bg.pid")
    assert wait_dead(pid)


def test_abort_stops_the_command_promptly(ctx: RecordingContext) -> None:
    threading.Timer(0.3, ctx.abort.set).start()
    started = time.monotonic()
    with pytest.raises(JobAborted):
        run(ctx, ["sh"], argv=["sh", "-c", "echo $$ > child.pid; exec sleep 300"])
    assert time.monotonic() - started < 0.3 + command.GRACE
    [pid] = read_pids(ctx, "child.pid")
    assert wait_dead(pid)


# --- output caps ---------------------------------------------------------------------


def test_output_is_capped_per_stream_and_flagged(ctx: RecordingContext) -> None:
    code = "import sys; sys.stdout.write('a' * 200000); sys.stderr.write('err')"
    result = run(ctx, [sys.executable], argv=[sys.executable, "-c", code], max_output=1000)
    assert result["stdout"] == "a" * 1000 and result["stdout_bytes"] == 200000
    assert result["stderr"] == "err" and result["stderr_bytes"] == 3
    assert result["truncated"] is True


def test_large_output_does_not_block_the_command(ctx: RecordingContext) -> None:
    code = "import sys; sys.stdout.write('x' * 5_000_000); sys.stdout.flush()"
    result = run(ctx, [sys.executable], argv=[sys.executable, "-c", code], max_output=10, timeout=20)
    assert result["stdout_bytes"] == 5_000_000 and len(result["stdout"]) == 10


def test_output_split_inside_a_character_still_decodes(ctx: RecordingContext) -> None:
    code = "import sys; sys.stdout.write('é' * 10)"
    result = run(ctx, [sys.executable], argv=[sys.executable, "-c", code], max_output=5)
    assert result["stdout"].startswith("éé") and result["truncated"] is True
