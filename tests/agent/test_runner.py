"""The runner: claimed assignments in, results in the outbox, no network.

Runs against real inbox/outbox files. Besides the built-in ``noop``, a test
registry holds job types that block on a gate, ignore their abort flag, crash
or are not rerunnable, so each runner rule can be shown to happen.

Jobs run in child processes, so a gate is a file (``open_gate`` creates it)
and what a job saw is written to a file (``seen``) rather than shared memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent import runner as runner_module
from agent.queues import event_key
from firmware_jobs.base import Job, JobAborted, JobContext, JobError
from firmware_jobs.noop import Noop
from firmware_jobs.registry import Registry
from shared.messages import Assign, Result, Started

from .conftest import RunnerParts, wait_until

GATE_DIR: list[Path] = []  # the current test's gate folder


def _gate(ctx: JobContext, name: str) -> Path:
    return Path(ctx.settings["state_dir"]) / "gates" / name


def _record(ctx: JobContext, data: dict[str, Any]) -> None:
    folder = Path(ctx.settings["state_dir"]) / "seen"
    folder.mkdir(exist_ok=True)
    (folder / f"{len(list(folder.iterdir()))}.json").write_text(json.dumps({"aid": ctx.assignment_id, **data}))


def open_gate(name: str) -> None:
    GATE_DIR[-1].mkdir(exist_ok=True)
    (GATE_DIR[-1] / name).touch()


def seen(state_dir: Path, aid: str) -> dict[str, Any]:
    for path in (state_dir / "seen").glob("*.json"):
        data = json.loads(path.read_text())
        if data["aid"] == aid:
            return data
    raise AssertionError(f"job {aid} recorded nothing")


class Block(Job):
    """Waits until its gate opens (or it is aborted); records what it saw."""

    name = "test.block"
    version = "1"
    description = "blocks on a gate"
    params_schema = {"type": "object", "properties": {"gate": {"type": "string"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        _record(ctx, {"work_dir": str(ctx.work_dir), "exists": ctx.work_dir.is_dir(), "settings": dict(ctx.settings)})
        gate = _gate(ctx, params["gate"])
        while not gate.exists():
            if ctx.should_abort():
                raise JobAborted()
            time.sleep(0.02)
        return {"gate": params["gate"]}


class Stubborn(Job):
    name = "test.stubborn"
    version = "1"
    description = "ignores its abort flag"

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        time.sleep(10)
        return "late"


class Crash(Job):
    name = "test.crash"
    version = "1"
    description = "raises"
    params_schema = {"type": "object", "properties": {"kind": {"type": "string"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        if params.get("kind") == "job_error":
            raise JobError("disk full", code="disk_full", retryable=False)
        raise RuntimeError("unexpected")


class Once(Job):
    name = "test.once"
    version = "1"
    description = "not safe to run twice"
    rerunnable = False

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        return "ran"


class Bulky(Job):
    name = "test.bulky"
    version = "1"
    description = "returns too much or a non-JSON value"
    params_schema = {"type": "object", "properties": {"size": {"type": "integer"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        return "x" * params["size"] if "size" in params else {"when": object()}


class Alarm(Job):
    """Reports a device condition, then fails: the event stands regardless."""

    name = "test.alarm"
    version = "1"
    description = "emits an agent event"
    params_schema = {"type": "object", "properties": {"name": {"type": "string"}}, "additionalProperties": False}

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        _record(ctx, {"event_id": ctx.emit_event(params["name"], {"level": 0.08})})
        raise JobError("battery too low to go on", code="battery_low", retryable=False)


REGISTRY = Registry()
for _cls in (Noop, Block, Stubborn, Crash, Once, Bulky, Alarm):
    REGISTRY.register(_cls)


@pytest.fixture(autouse=True)
def _gates(state_dir):
    GATE_DIR.append(state_dir / "gates")
    yield
    GATE_DIR.pop()


class Parts(RunnerParts):
    def __init__(self, state_dir: Path, clock: Any) -> None:
        super().__init__(state_dir, clock, REGISTRY)

    def put(self, aid: str, job_type: str = "noop", params: dict[str, Any] | None = None, **fields: Any) -> Assign:
        return self.put_assign(Assign(aid, "dag", "run", "task", 1, job_type, params if params is not None else {"echo": aid}, **fields))

    def started(self, aid: str) -> bool:
        return any(isinstance(e, Started) and e.assignment_id == aid for e in self.events)


@pytest.fixture
def parts(state_dir, manual_clock):
    p = Parts(state_dir, manual_clock)
    yield p
    p.close()


def test_assignment_runs_once_and_its_result_is_in_the_outbox(parts):
    parts.runner()
    parts.put("a-1", params={"echo": {"n": 1}})
    result = parts.result("a-1")
    assert result.status == "success" and result.output == {"echo": {"n": 1}}
    assert result.started_at == parts.clock.now() and result.finished_at == parts.clock.now()
    wait_until(lambda: parts.inbox.depth() == 0, what="inbox item done")
    assert parts.inbox.assignment("a-1")[1] == "done"  # type: ignore[index]
    assert parts.started("a-1") and parts.announced == ["a-1"]
    assert parts.outbox.get("a-1").data["hlc"].endswith("@dev-1")  # type: ignore[union-attr]


def test_unknown_job_type_becomes_a_failed_result_not_a_crash(parts):
    parts.runner()
    parts.put("a-1", job_type="firmware.teleport")
    result = parts.result("a-1")
    assert result.status == "failed" and result.error.code == "unknown_job_type" and result.error.retryable is False  # type: ignore[union-attr]
    assert "firmware.teleport" in result.error.message  # type: ignore[union-attr]
    assert not parts.started("a-1")


def test_invalid_params_become_a_failed_result(parts):
    parts.runner()
    parts.put("a-1", params={"sleep": "long"})
    result = parts.result("a-1")
    assert result.error.code == "invalid_params" and result.error.retryable is False  # type: ignore[union-attr]


def test_not_before_holds_an_assignment_without_blocking_other_work(parts):
    parts.runner(concurrency=1)
    now = parts.clock.now()
    parts.put("later", not_before=now + 60)
    parts.put("now")
    assert parts.result("now").status == "success"
    time.sleep(0.3)  # the claimer had its chances to start "later" (it was woken for "now")
    assert not parts.outbox.has("later") and not parts.started("later")
    assert parts.inbox.assignment("later")[1] == "claimed"  # type: ignore[index]  # held, so a crash releases it
    parts.clock.advance(61)
    assert parts.result("later").status == "success"


def test_held_assignment_whose_deadline_passes_fails_with_deadline_passed(parts):
    parts.runner()
    now = parts.clock.now()
    parts.put("a-1", not_before=now + 10, deadline=now + 20)
    time.sleep(0.2)
    parts.clock.advance(30)
    result = parts.result("a-1")
    assert result.error.code == "deadline_passed" and not parts.started("a-1")  # type: ignore[union-attr]


def test_cancel_of_a_held_assignment_finishes_it_as_cancelled(parts):
    runner = parts.runner()
    parts.put("a-1", not_before=parts.clock.now() + 60)
    wait_until(lambda: runner.held() == ["a-1"], what="assignment held")
    assert runner.cancel("a-1", "operator") == "cancelled"
    result = parts.result("a-1")
    assert result.error.code == "cancelled" and result.error.retryable is False and "operator" in result.error.message  # type: ignore[union-attr]
    assert parts.inbox.depth() == 0 and runner.held() == []
    parts.clock.advance(120)
    time.sleep(0.3)
    assert not parts.started("a-1")


def test_cancel_of_a_queued_assignment_means_it_never_runs(parts):
    runner = parts.runner(start=False)
    parts.put("a-1")
    assert runner.cancel("a-1") == "cancelled"
    runner.start()
    wait_until(lambda: parts.inbox.depth() == 0, what="cancelled item done")
    assert parts.result("a-1").error.code == "cancelled"  # type: ignore[union-attr]
    assert not parts.started("a-1")


def test_cancel_of_a_running_job_sets_its_abort_flag(parts):
    runner = parts.runner()
    parts.put("a-1", job_type="test.block", params={"gate": "g1"})
    wait_until(lambda: runner.running() == ["a-1"], what="job running")
    assert runner.cancel("a-1", "stop it") == "aborting"
    result = parts.result("a-1")
    assert result.status == "failed" and result.error.code == "cancelled"  # type: ignore[union-attr]
    assert result.started_at is not None


def test_cancel_of_a_finished_or_unknown_assignment_changes_nothing(parts):
    runner = parts.runner()
    parts.put("a-1")
    parts.result("a-1")
    wait_until(lambda: parts.inbox.depth() == 0)
    assert runner.cancel("a-1") == "finished"
    assert runner.cancel("nope") == "unknown"
    assert parts.result("a-1").status == "success"


def test_job_over_its_time_limit_fails_with_timeout(parts):
    parts.runner()
    parts.put("a-1", params={"sleep": 10}, timeout=0.2)
    start = time.monotonic()
    result = parts.result("a-1")
    assert result.error.code == "timeout" and time.monotonic() - start < 3  # type: ignore[union-attr]


def test_job_that_ignores_its_abort_flag_still_times_out(parts, monkeypatch):
    monkeypatch.setattr(runner_module, "ABORT_GRACE", 0.1)
    runner = parts.runner()
    parts.put("a-1", job_type="test.stubborn", params={}, timeout=0.2)
    assert parts.result("a-1").error.code == "timeout"  # type: ignore[union-attr]
    wait_until(lambda: runner.running() == [], what="worker free again")
    parts.put("a-2")
    assert parts.result("a-2").status == "success"


def test_assignment_whose_result_is_already_in_the_outbox_is_not_run_again(parts):
    body = parts.put("a-1")
    # As after a crash between the outbox commit and the inbox commit.
    parts.outbox.put_result(Result("a-1", body.try_number, "success", "from before"), parts.hlc.now())
    parts.runner()
    wait_until(lambda: parts.inbox.depth() == 0, what="inbox item done")
    assert not parts.started("a-1")
    assert parts.result("a-1").output == "from before"


def test_interrupted_job_that_is_not_rerunnable_is_reported_not_rerun(parts):
    (parts.state_dir / "work").mkdir()
    (parts.state_dir / "work" / "a-1.started").touch()  # left by a run that died
    (parts.state_dir / "work" / "a-2.started").touch()
    parts.put("a-1", job_type="test.once", params={})
    parts.put("a-2", params={"echo": "again"})  # noop is rerunnable
    parts.runner()
    once = parts.result("a-1")
    assert once.error.code == "interrupted" and once.error.retryable is True and not parts.started("a-1")  # type: ignore[union-attr]
    assert parts.result("a-2").output == {"echo": "again"}
    wait_until(lambda: not list((parts.state_dir / "work").glob("*.started")), what="markers removed")


def test_job_errors_keep_their_code_and_crashes_are_retryable(parts):
    parts.runner()
    parts.put("a-1", job_type="test.crash", params={"kind": "job_error"})
    parts.put("a-2", job_type="test.crash", params={})
    error = parts.result("a-1").error
    assert (error.code, error.message, error.retryable) == ("disk_full", "disk full", False)  # type: ignore[union-attr]
    crash = parts.result("a-2").error
    assert crash.code == "job_crashed" and crash.retryable is True and "RuntimeError" in crash.message  # type: ignore[union-attr]


def test_output_that_cannot_be_sent_becomes_a_failed_result(parts):
    parts.runner(max_message_bytes=4096)
    parts.put("big", job_type="test.bulky", params={"size": 10_000})
    parts.put("odd", job_type="test.bulky", params={})
    assert parts.result("big").error.code == "output_too_large"  # type: ignore[union-attr]
    assert parts.result("odd").error.code == "invalid_output"  # type: ignore[union-attr]


def test_each_job_gets_its_own_work_dir_which_is_removed_after(parts):
    parts.runner()
    open_gate("w")
    parts.put("a-1", job_type="test.block", params={"gate": "w"})
    parts.result("a-1")
    saw = seen(parts.state_dir, "a-1")
    assert saw["exists"] and Path(saw["work_dir"]) == parts.state_dir / "work" / "a-1"
    assert saw["settings"]["agent_version"] == "0.1.0" and saw["settings"]["command_allowlist"] == []
    wait_until(lambda: not Path(saw["work_dir"]).exists(), what="work dir removed")


def test_hostile_assignment_id_cannot_escape_the_work_folder(parts):
    parts.runner()
    open_gate("h")
    parts.put("../../etc/x", job_type="test.block", params={"gate": "h"})
    parts.result("../../etc/x")
    assert Path(seen(parts.state_dir, "../../etc/x")["work_dir"]).parent == parts.state_dir / "work"


def test_jobs_run_concurrently_up_to_the_limit(parts):
    runner = parts.runner(concurrency=2)
    for i in range(3):
        parts.put(f"a-{i}", job_type="test.block", params={"gate": f"g{i}"})
    wait_until(lambda: runner.running() == ["a-0", "a-1"], what="two jobs running")
    time.sleep(0.2)
    assert runner.running() == ["a-0", "a-1"]  # the third waits for a free worker
    open_gate("g0")
    wait_until(lambda: "a-2" in runner.running(), what="third job started")


def test_stop_interrupts_jobs_past_the_budget_without_recording_a_result(parts):
    runner = parts.runner()
    parts.put("a-1", job_type="test.block", params={"gate": "never"})
    wait_until(lambda: runner.running() == ["a-1"])
    assert runner.stop(0.2) is False
    assert not parts.outbox.has("a-1")
    # The claim is still held; the next start-up releases it and it runs again.
    assert parts.inbox.release_expired_claims(0) == 1
    open_gate("never")
    parts.runner()
    assert parts.result("a-1").output == {"gate": "never"}


def test_a_job_emits_agent_events_through_the_outbox_whatever_its_outcome(parts):
    parts.runner()
    parts.put("a-1", "test.alarm", {"name": "battery_low"})
    assert parts.result("a-1").error.code == "battery_low"
    event_id = seen(parts.state_dir, "a-1")["event_id"]
    entry = parts.outbox.get(event_key(event_id))
    assert entry is not None and entry.status == "ready"
    assert entry.data["event"] == {"event_id": event_id, "name": "battery_low", "payload": {"level": 0.08}, "occurred_at": parts.clock.now()}
    assert event_key(event_id) in parts.announced  # the sync loop was woken
    # Claimed from the outbox like a result, keyed by event id.
    claimed = [parts.outbox.claim(), parts.outbox.claim()]
    assert {type(c.result).__name__ for c in claimed} == {"AgentEvent", "Result"}
    assert {c.assignment_id for c in claimed} == {event_key(event_id), "a-1"}
    assert parts.outbox.ack([event_key(event_id)], parts.clock.now()) == 1


def test_a_bad_event_name_fails_the_job_that_emits_it_and_queues_nothing(parts):
    parts.runner()
    parts.put("a-1", "test.alarm", {"name": "battery low!"})
    result = parts.result("a-1")
    assert result.error.code == "job_crashed" and "event name 'battery low!' is invalid" in result.error.message
    # No event; the crash's traceback is in the try's log, queued before the result.
    assert [e.key for e in parts.outbox.items()] == ["log/a-1/0", "a-1"]
    assert "Traceback" in parts.outbox.get("log/a-1/0").data["log"]["data"]  # type: ignore[union-attr]


def test_the_claimer_sleeps_until_woken_instead_of_polling_the_inbox(parts):
    runner = parts.runner()
    time.sleep(0.3)  # past the start-up look
    parts.inbox.put(Assign("quiet", "dag", "run", "task", 1, "noop", {"echo": 1}))  # no wake()
    time.sleep(0.5)
    assert not parts.outbox.has("quiet") and parts.inbox.assignment("quiet")[1] == "ready"  # type: ignore[index]
    runner.wake()
    assert parts.result("quiet").status == "success"
