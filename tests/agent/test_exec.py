"""Jobs in child processes: limits, kills, crashes, slots, logs and progress.

Real processes throughout: each job runs in a fork-server child, the test
job types below burn CPU, allocate, crash or start grandchildren, and the
tests look at ``/proc`` to prove nothing is left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import jobhost
from agent import runner as runner_module
from agent.joblogs import CHUNK_BYTES, split, truncation_line
from agent.queues import Inbox, Outbox
from agent.runner import Runner
from firmware_jobs.base import Job, JobAborted, JobContext
from firmware_jobs.command import RunCommand
from firmware_jobs.noop import Noop
from firmware_jobs.registry import Registry
from shared.envelope import Envelope, encode
from shared.hlc import HybridClock
from shared.messages import Ack, Assign, LogChunk, Progress, Result

from .conftest import RunnerParts, wait_until


def _pids_file(ctx: JobContext) -> Path:
    return Path(ctx.settings["state_dir"]) / f"pids-{ctx.assignment_id}.json"


class Spawner(Job):
    """Starts a ``sleep`` in its own group and one in a new process group
    (as command.run does), records their pids, then ignores its abort flag."""

    name = "test.spawner"
    version = "1"
    description = "leaves grandchildren behind"
    params_schema = {"type": "object", "properties": {"then": {"type": "string"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        same = subprocess.Popen(["sleep", "60"])
        own_group = subprocess.Popen(["sleep", "61"], process_group=0)
        (ctx.work_dir / "marker").write_text("x")
        _pids_file(ctx).write_text(json.dumps({"pids": [same.pid, own_group.pid], "work_dir": str(ctx.work_dir)}))
        if params.get("then") == "return":
            return "left them running"
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # deaf to the soft stop
        time.sleep(60)
        return "never"


class Burn(Job):
    name = "test.burn"
    version = "1"
    description = "burns CPU"

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        end = time.monotonic() + 30
        n = 0
        while time.monotonic() < end:
            n += 1
        return n


class Hog(Job):
    name = "test.hog"
    version = "1"
    description = "allocates memory"
    params_schema = {"type": "object", "properties": {"mb": {"type": "integer"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        block = bytearray(params["mb"] * 1024 * 1024)
        return len(block)


class Die(Job):
    name = "test.die"
    version = "1"
    description = "dies without a result"
    params_schema = {"type": "object", "properties": {"how": {"type": "string"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        how = params["how"]
        if how == "exit":
            os._exit(3)
        if how == "segfault":
            ctypes.string_at(0)
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return "alive"


class Chatty(Job):
    """Logs through ctx, prints to stdout and stderr, runs a program that
    prints, and reports progress many times a second."""

    name = "test.chatty"
    version = "1"
    description = "logs and reports progress"
    params_schema = {
        "type": "object",
        "properties": {"lines": {"type": "integer"}, "width": {"type": "integer"}, "steps": {"type": "integer"}},
        "additionalProperties": False,
    }

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        ctx.log("starting")
        print("to stdout", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        subprocess.run(["echo", "from a grandchild"], check=True)
        for i in range(params.get("lines", 0)):
            ctx.log(f"{i:06d} " + "x" * params.get("width", 40))
        steps = params.get("steps", 0)
        for i in range(1, steps + 1):
            ctx.progress(i / steps, f"step {i}")
            time.sleep(0.01)
        ctx.log("done")
        return "ok"


class Slow(Job):
    """Cooperative: stops when asked; holds a slot until its gate file exists."""

    name = "test.slow"
    version = "1"
    description = "waits for a gate file"
    params_schema = {"type": "object", "properties": {"gate": {"type": "string"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        gate = Path(ctx.settings["state_dir"]) / params["gate"]
        while not gate.exists():
            if ctx.should_abort():
                raise JobAborted()
            time.sleep(0.02)
        return params["gate"]


class Flood(Job):
    """Reports progress in a tight loop and never looks at its abort flag."""

    name = "test.flood"
    version = "1"
    description = "floods the control pipe"

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        while True:
            ctx.progress(0.5, "busy")


REGISTRY = Registry()
for _cls in (Noop, RunCommand, Spawner, Burn, Hog, Die, Chatty, Slow, Flood):
    REGISTRY.register(_cls)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:].split()[0] not in (b"Z", b"X")


class Parts(RunnerParts):
    result_timeout = 15.0

    def __init__(self, state_dir: Path, clock: Any) -> None:
        super().__init__(state_dir, clock, REGISTRY, command_allowlist=("sleep", "echo"))

    def put(self, aid: str, job_type: str, params: dict[str, Any] | None = None, **fields: Any) -> None:
        self.put_assign(Assign(aid, "dag", "run", "task", 1, job_type, params or {}, **fields))

    def pids(self, aid: str) -> dict[str, Any]:
        path = self.state_dir / f"pids-{aid}.json"
        wait_until(path.exists, 10, f"{aid} started its grandchildren")
        return json.loads(path.read_text())

    def log_chunks(self, aid: str) -> list[LogChunk]:
        return sorted(
            (LogChunk.from_dict(e.data["log"]) for e in self.outbox.items() if e.key.startswith(f"log/{aid}/")), key=lambda c: c.seq,
        )


@pytest.fixture
def parts(state_dir, manual_clock):
    p = Parts(state_dir, manual_clock)
    yield p
    p.close()


@pytest.fixture
def short_grace(monkeypatch):
    monkeypatch.setattr(runner_module, "ABORT_GRACE", 0.3)


# --- timeouts, cancellation, crashes ---------------------------------------------


def test_timeout_kills_the_job_and_everything_it_started(parts, short_grace):
    parts.runner()
    parts.put("a-1", "test.spawner", timeout=3)  # room for a slow start on a busy machine
    seen = parts.pids("a-1")
    assert all(alive(pid) for pid in seen["pids"])
    start = time.monotonic()
    result = parts.result("a-1")
    assert result.error.code == "timeout" and result.error.retryable is True  # type: ignore[union-attr]
    assert time.monotonic() - start < 8
    # Both grandchildren, the one in the job's group and the one in a group of its own.
    wait_until(lambda: not any(alive(pid) for pid in seen["pids"]), 5, "grandchildren gone")
    assert not Path(seen["work_dir"]).exists()  # removed although the job was killed


def test_a_job_flooding_its_context_still_times_out(parts, short_grace):
    parts.runner()
    parts.put("a-1", "test.flood", timeout=1)
    assert parts.result("a-1").error.code == "timeout"  # type: ignore[union-attr]
    reports = [e for e in parts.events if isinstance(e, Progress)]
    assert 1 <= len(reports) <= 4  # thousands sent, about one a second passed on


def test_grandchildren_a_finished_job_left_running_are_killed(parts):
    parts.runner()
    parts.put("a-1", "test.spawner", {"then": "return"})
    assert parts.result("a-1").output == "left them running"
    seen = parts.pids("a-1")
    wait_until(lambda: not any(alive(pid) for pid in seen["pids"]), 5, "grandchildren gone")


def test_cancel_reaches_a_running_child_soft_then_kill(parts, short_grace):
    runner = parts.runner()
    parts.put("soft", "test.slow", {"gate": "never"})
    parts.put("hard", "test.spawner")
    seen = parts.pids("hard")
    wait_until(lambda: runner.running() == ["hard", "soft"], 10, "both running")
    assert runner.cancel("soft", "operator") == "aborting"
    assert runner.cancel("hard", "operator") == "aborting"
    for aid in ("soft", "hard"):
        result = parts.result(aid)
        assert result.error.code == "cancelled" and result.error.retryable is False and "operator" in result.error.message  # type: ignore[union-attr]
    wait_until(lambda: not any(alive(pid) for pid in seen["pids"]), 5, "grandchildren gone")


@pytest.mark.parametrize(("how", "shown"), [("exit", "status 3"), ("segfault", "SIGSEGV"), ("kill", "SIGKILL")])
def test_a_crashing_child_fails_its_job_and_the_agent_goes_on(parts, how, shown):
    parts.runner()
    parts.put("a-1", "test.die", {"how": how})
    error = parts.result("a-1").error
    assert error.code == "job_crashed" and error.retryable is True and shown in error.message  # type: ignore[union-attr]
    parts.put("a-2", "noop", {"echo": 2})
    assert parts.result("a-2").output == {"echo": 2}


# --- limits ---------------------------------------------------------------------


def test_cpu_limit_stops_a_job_that_burns_cpu(parts):
    parts.runner(job_cpu_seconds=1)
    parts.put("a-1", "test.burn", timeout=20)
    start = time.monotonic()
    error = parts.result("a-1", timeout=20).error
    assert error.code == "cpu_limit" and "1 CPU seconds" in error.message  # type: ignore[union-attr]
    assert time.monotonic() - start < 10


def test_memory_limit_fails_a_job_that_allocates_too_much(parts):
    parts.runner(job_memory_mb=0, job_type_memory_mb={"test.hog": 200})
    parts.put("big", "test.hog", {"mb": 400})
    parts.put("small", "test.hog", {"mb": 20})
    error = parts.result("big").error
    assert error.code == "memory_limit" and "200 MiB" in error.message  # type: ignore[union-attr]
    assert parts.result("small").output == 20 * 1024 * 1024


def test_per_type_cpu_limit_replaces_the_default(parts):
    parts.runner(job_cpu_seconds=0, job_type_cpu_seconds={"test.burn": 1})
    parts.put("a-1", "test.burn", timeout=20)
    assert parts.result("a-1", timeout=20).error.code == "cpu_limit"  # type: ignore[union-attr]


# --- slots per job type ------------------------------------------------------------


def test_a_job_type_at_its_cap_waits_without_blocking_other_types(parts):
    runner = parts.runner(concurrency=3, job_type_concurrency={"test.slow": 1})
    parts.put("slow-1", "test.slow", {"gate": "g1"})
    wait_until(lambda: runner.running() == ["slow-1"], 10, "first slow job running")
    parts.put("slow-2", "test.slow", {"gate": "g2"})
    parts.put("quick", "noop", {"echo": 1})
    assert parts.result("quick").status == "success"  # not stuck behind slow-2
    time.sleep(0.3)
    assert runner.running() == ["slow-1"]  # slow-2 waits for its type's slot
    assert {c.assignment_id for c in runner.claims()} == {"slow-1", "slow-2"}
    (parts.state_dir / "g2").touch()
    (parts.state_dir / "g1").touch()
    assert parts.result("slow-1").status == "success"
    assert parts.result("slow-2").status == "success"


def test_claims_lists_running_ready_and_held(parts):
    runner = parts.runner(concurrency=2, job_type_concurrency={"test.slow": 1})
    parts.put("held", "noop", not_before=parts.clock.now() + 60)
    parts.put("run", "test.slow", {"gate": "g"})
    wait_until(lambda: runner.running() == ["run"], 10, "running")
    parts.put("ready", "test.slow", {"gate": "g"})  # waits for the type's slot
    wait_until(lambda: len(runner.claims()) == 3, 5, "three claims")
    assert sorted(c.assignment_id for c in runner.claims()) == ["held", "ready", "run"]
    (parts.state_dir / "g").touch()


# --- logs and progress ---------------------------------------------------------------


def test_everything_a_job_logs_is_shipped_before_its_result(parts):
    parts.runner()
    parts.put("a-1", "test.chatty", {"lines": 2})
    assert parts.result("a-1").status == "success"
    keys = [e.key for e in parts.outbox.items()]
    assert keys == ["log/a-1/0", "a-1"]  # the log first: the hub has it when the result lands
    (chunk,) = parts.log_chunks("a-1")
    assert chunk.final and chunk.seq == 0
    for text in ("starting\n", "to stdout\n", "to stderr\n", "from a grandchild\n", "000001 ", "done\n"):
        assert text in chunk.data
    assert not list((parts.state_dir / "logs").glob("*.log"))  # the outbox holds it now


def test_a_long_log_is_capped_and_chunked(parts):
    parts.runner(max_log_bytes=100_000)
    parts.put("a-1", "test.chatty", {"lines": 3000, "width": 60})  # ~200 KB logged
    parts.result("a-1")
    chunks = parts.log_chunks("a-1")
    assert [c.seq for c in chunks] == list(range(len(chunks))) and len(chunks) == 4
    assert [c.final for c in chunks] == [False, False, False, True]
    assert all(len(json.dumps(c.data).encode()) <= CHUNK_BYTES for c in chunks)
    text = "".join(c.data for c in chunks)
    assert text.endswith(truncation_line(100_000).decode()) and text.count("[outpost: log truncated") == 1
    assert len(text.encode()) == 100_000 + len(truncation_line(100_000))
    assert text.startswith("starting\n") and "done" not in text


def test_log_chunks_fit_a_small_envelope_limit(parts):
    parts.runner(max_message_bytes=2048)
    parts.put("a-1", "test.chatty", {"lines": 200})
    parts.result("a-1")
    chunks = parts.log_chunks("a-1")
    assert len(chunks) > 4 and "".join(c.data for c in chunks).count("\n") == 205
    stamp = parts.hlc.now()
    assert all(len(encode(Envelope(c, sender="dev-1", hlc=stamp), 2048)) <= 2048 for c in chunks)


def test_split_never_exceeds_the_budget_with_escapes_and_wide_characters():
    text = "\x00\x01é漢" * 5000 + "plain" * 1000
    pieces = split(text, 1000)
    assert "".join(pieces) == text
    assert all(len(json.dumps(p, ensure_ascii=False).encode()) <= 1000 for p in pieces)


def test_progress_is_rate_limited_and_the_last_report_is_sent(parts, monkeypatch):
    monkeypatch.setattr(runner_module, "PROGRESS_EVERY", 0.4)
    parts.runner()
    parts.put("a-1", "test.chatty", {"steps": 100})  # 100 reports in ~1 s
    parts.result("a-1")
    reports = [e for e in parts.events if isinstance(e, Progress)]
    assert 2 <= len(reports) <= 5
    assert reports[-1].fraction == 1.0 and reports[-1].message == "step 100" and reports[-1].assignment_id == "a-1"
    assert reports[0].at == parts.clock.now()


# --- through the daemon: acknowledgement of log chunks ------------------------------------


def test_log_chunks_are_sent_and_forgotten_only_when_the_hub_acks_them(make_agent, hub):
    agent = make_agent(registry=REGISTRY, max_log_bytes=100_000)
    hub.assign("a-1", "test.chatty", {"lines": 1000, "width": 60})
    chunks = hub.wait_for("log", "a-1", count=3)
    hub.wait_for("result", "a-1")
    ids = sorted({f"a-1/{c.seq}" for c in chunks})
    assert ids == ["a-1/0", "a-1/1", "a-1/2"]
    assert [c.final for c in sorted({c.seq: c for c in chunks}.values(), key=lambda c: c.seq)] == [False, False, True]
    time.sleep(1.2)
    assert len(hub.of("log", "a-1")) > 3  # not acked: sent again
    hub.publish(Ack(("a-1",), log_ids=tuple(ids)), topic="ack")
    wait_until(lambda: agent.outbox.depth() == 0, 10, "outbox drained by the ack")
    assert {e.key: e.status for e in agent.outbox.items()} == {"log/a-1/0": "done", "log/a-1/1": "done", "log/a-1/2": "done", "a-1": "done"}


# --- the fork server itself ---------------------------------------------------------------


def test_kill_session_finds_processes_outside_the_group(tmp_path):
    leader = subprocess.Popen(
        [sys.executable, "-c", "import subprocess,time; p=subprocess.Popen(['sleep','60'], process_group=0); print(p.pid, flush=True); time.sleep(60)"],
        start_new_session=True, stdout=subprocess.PIPE,
    )
    with leader.stdout:  # type: ignore[union-attr]
        grandchild = int(leader.stdout.readline())  # type: ignore[union-attr]
    assert jobhost.kill_session(leader.pid) >= 2
    leader.wait(5)
    wait_until(lambda: not alive(grandchild), 5, "grandchild gone")


AGENT_SCRIPT = """
import sys, time
from pathlib import Path
from tests.agent.test_exec import REGISTRY
from agent.queues import Inbox, Outbox
from agent.runner import Runner
from shared.clock import SystemClock
from shared.hlc import HybridClock
from shared.messages import Assign


def main():
    state = Path(sys.argv[1])
    inbox, outbox = Inbox(state / "inbox.sqlite3"), Outbox(state / "outbox.sqlite3")
    clock = SystemClock()
    hlc = HybridClock("dev-1", lambda: int(clock.now() * 1000))
    runner = Runner(inbox, outbox, REGISTRY, clock, hlc.now, state / "work", {"state_dir": str(state)})
    inbox.put(Assign("a-1", "d", "r", "t", 1, "test.spawner", {}))
    runner.start()
    runner.wake()
    time.sleep(60)


if __name__ == "__main__":
    main()
"""


def test_a_killed_agent_leaves_no_job_behind(parts, tmp_path):
    """kill -9 of the agent: its job's process dies with it (the restarted
    agent must not find the job still running beside its second run), and
    what the job started is swept when the agent starts again."""
    script = tmp_path / "fake_agent.py"
    script.write_text(AGENT_SCRIPT)
    repo = Path(__file__).resolve().parents[2]
    agent = subprocess.Popen([sys.executable, str(script), str(parts.state_dir)], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        seen = parts.pids("a-1")
        session = parts.state_dir / "work" / "a-1.session"
        wait_until(session.exists, 5, "session file written")
        child = int(session.read_text().split()[0])
        assert alive(child) and all(alive(pid) for pid in seen["pids"])
    finally:
        agent.kill()
        agent.wait(5)
    wait_until(lambda: not alive(child), 5, "the job's process gone with the agent")
    assert any(alive(pid) for pid in seen["pids"])  # orphans, until the next start
    parts.runner()
    wait_until(lambda: not any(alive(pid) for pid in seen["pids"]), 5, "grandchildren swept at start-up")
    assert not session.exists()


def test_a_job_whose_process_cannot_start_fails_retryably(state_dir, manual_clock):
    class Local(Job):  # defined in a function: it cannot be sent to a child process
        name = "test.local"
        version = "1"
        description = "not importable"

        def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
            return "never"

    registry = Registry()
    registry.register(Local)
    registry.register(Noop)
    p = Parts(state_dir, manual_clock)
    try:
        runner = Runner(p.inbox, p.outbox, registry, p.clock, p.hlc.now, state_dir / "work", {"state_dir": str(state_dir)})
        runner.start()
        p.runners.append(runner)
        p.put("a-1", "test.local")
        error = p.result("a-1").error
        assert error.code == "job_crashed" and error.retryable and "could not be started" in error.message  # type: ignore[union-attr]
        p.put("a-2", "noop", {"echo": 1})
        assert p.result("a-2").status == "success"
    finally:
        p.close()


def test_a_job_runs_even_when_its_log_cannot_be_written(parts):
    (parts.state_dir / "logs").write_text("a file where the log folder should be")
    parts.runner()
    parts.put("a-1", "test.chatty", {"lines": 50})
    assert parts.result("a-1").output == "ok"  # its output was drained, not left to block it
    assert parts.log_chunks("a-1") == []
