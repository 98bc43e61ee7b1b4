"""Logs and progress of device tasks at the hub: log chunks stored once and
acknowledged each time, read back through the REST API, the CLI and the
dashboard; progress applied to the running try only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from hub import tasklogs
from hub.db import transaction
from hub.models import RejectedMessage, TaskInstance, TaskLogChunk
from shared.envelope import Envelope
from shared.messages import LogChunk, Progress, Result, Started
from shared.mqtt import Inbound
from shared.topics import events_topic
from tests.hub.api_harness import Hub, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_ctl import Cli

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("a1"), retries=1)
"""


def setup(make_hub: Any) -> tuple[Any, int, Any]:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("d")
    hub.tick()
    return hub, run_pk, hub.assignments_sent()[0].body


def chunks(hub: Any) -> list[tuple[str, int, str, bool]]:
    with hub.sessions() as session:
        return [(c.assignment_id, c.seq, c.data, c.final) for c in session.scalars(select(TaskLogChunk).order_by(TaskLogChunk.seq))]


def log_acks(hub: Any) -> list[tuple[str, ...]]:
    return [a.body.log_ids for a in hub.acks() if a.body.log_ids]


def api_log(hub: Any, run_pk: int, ti_id: int, try_number: int = 1) -> Any:
    engine = hub.sessions.kw["bind"]
    api = Hub(str(engine.url), engine, hub.sessions, hub.clock)
    return api.client().get(f"/api/v1/runs/{run_pk}/tasks/{ti_id}/tries/{try_number}/log")


def test_redelivered_chunks_are_stored_once_and_acknowledged_each_time(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    aid = assign.assignment_id
    first, last = LogChunk(aid, 0, "line 1\n"), LogChunk(aid, 1, "line 2\n", final=True)
    hub.send("a1", first)
    hub.send("a1", first)  # redelivered on its own
    # ...and twice within one batch, with the last chunk.
    topic = events_topic("a1")
    payloads = [hub.sign(Envelope(body, "a1", hub.agent_clocks["a1"].now())) for body in (last, last, first)]
    hub.ingester.process([Inbound(topic, p, 1, False, i) for i, p in enumerate(payloads)])
    assert chunks(hub) == [(aid, 0, "line 1\n", False), (aid, 1, "line 2\n", True)]
    assert log_acks(hub) == [(f"{aid}/0",), (f"{aid}/0",), (f"{aid}/1", f"{aid}/1", f"{aid}/0")]
    assert hub.ingester.counters["log.stored"] == 2 and hub.ingester.counters["log.duplicate"] == 3
    ti = hub.tis(run_pk)[0]
    doc = api_log(hub, run_pk, ti.id).json()
    assert doc["try_number"] == 1 and doc["task_id"] == "t"
    assert doc["logs"] == [{"assignment_id": aid, "agent_id": "a1", "complete": True, "chunks": 2, "text": "line 1\nline 2\n"}]


def test_the_log_arrives_before_the_result_and_a_gap_is_shown(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    aid = assign.assignment_id
    hub.send("a1", LogChunk(aid, 0, "a\n"))
    hub.send("a1", LogChunk(aid, 2, "c\n", final=True))  # chunk 1 still on its way
    ti = hub.tis(run_pk)[0]
    (entry,) = api_log(hub, run_pk, ti.id).json()["logs"]
    assert entry["complete"] is False and entry["chunks"] == 2
    assert entry["text"] == "a\n\n[outpost: 1 log chunk(s) not received yet]\nc\n"
    hub.send("a1", LogChunk(aid, 1, "b\n"))
    hub.send("a1", Result(aid, 1, "success", "ok"))
    (entry,) = api_log(hub, run_pk, ti.id).json()["logs"]
    assert entry["complete"] is True and entry["text"] == "a\nb\nc\n"


def test_chunks_for_unknown_assignments_are_refused_but_acknowledged(make_hub: Any) -> None:
    hub, _run_pk, assign = setup(make_hub)
    hub.send("a1", LogChunk("f" * 32, 0, "x", final=True))
    hub.agent_online("a2")
    hub.send("a2", LogChunk(assign.assignment_id, 0, "not yours", final=True))
    with hub.sessions() as session:
        assert [r.code for r in session.scalars(select(RejectedMessage).order_by(RejectedMessage.id))] == ["unknown_assignment", "foreign_assignment"]
        assert session.scalar(select(func.count()).select_from(TaskLogChunk)) == 0
    # Acknowledged all the same: a chunk the hub will never take must not block the device's outbox.
    assert log_acks(hub) == [("f" * 32 + "/0",), (f"{assign.assignment_id}/0",)]


def test_nul_bytes_in_a_log_are_kept_visible(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    hub.send("a1", LogChunk(assign.assignment_id, 0, "a\x00b\n", final=True))
    assert chunks(hub)[0][2] == "a\\x00b\n"


def test_the_log_api_answers_404_for_an_unknown_run_task_or_try(make_hub: Any) -> None:
    hub, run_pk, _assign = setup(make_hub)
    ti = hub.tis(run_pk)[0]
    assert api_log(hub, run_pk, ti.id).json()["logs"] == []  # no log yet: empty, not an error
    assert api_log(hub, run_pk + 1, ti.id).status_code == 404
    assert api_log(hub, run_pk, ti.id + 100).status_code == 404
    response = api_log(hub, run_pk, ti.id, try_number=5)
    assert response.status_code == 404 and "no try 5" in response.text


def test_progress_updates_the_running_try_only(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    aid = assign.assignment_id
    hub.send("a1", Progress(aid, 0.3, "before it started"))
    assert hub.tis(run_pk)[0].progress is None  # queued, not running: dropped
    hub.send("a1", Started(aid, hub.clock.now()))
    hub.send("a1", Progress(aid, 0.5, "flashing"))
    hub.send("a1", Progress(aid, 7.0, "x" * 900))  # clamped and cut to the column
    ti = hub.tis(run_pk)[0]
    assert ti.progress == 1.0 and ti.progress_message == "x" * 500
    hub.send("a1", Progress(aid, 0.6, "flashing"))
    ti = hub.tis(run_pk)[0]
    assert (ti.progress, ti.progress_message) == (0.6, "flashing")
    engine = hub.sessions.kw["bind"]
    run = Hub(str(engine.url), engine, hub.sessions, hub.clock).client().get(f"/api/v1/runs/{run_pk}").json()
    assert run["task_instances"][0]["progress"] == 0.6 and run["task_instances"][0]["progress_message"] == "flashing"
    # The try fails and is retried: the new try starts without the old progress.
    hub.send("a1", Result(aid, 1, "failed", None, None))
    hub.send("a1", Progress(aid, 0.9, "late"))  # after the result: not applied
    assert hub.tis(run_pk)[0].progress == 0.6
    hub.clock.advance(600)
    hub.tick()
    retry = [a.body for a in hub.assignments_sent() if a.body.try_number == 2]
    assert retry, "the retry was not dispatched"
    hub.send("a1", Started(retry[0].assignment_id, hub.clock.now()))
    ti = hub.tis(run_pk)[0]
    assert ti.try_number == 2 and ti.state == "running" and ti.progress is None and ti.progress_message is None


def api_logs(hub: Any, run_pk: int, ti_id: int) -> Any:
    engine = hub.sessions.kw["bind"]
    return Hub(str(engine.url), engine, hub.sessions, hub.clock).client().get(f"/api/v1/runs/{run_pk}/tasks/{ti_id}/logs")


def stored_seqs(hub: Any) -> list[tuple[int, int]]:
    with hub.sessions() as session:
        return [(c.try_number, c.seq) for c in session.scalars(select(TaskLogChunk).order_by(TaskLogChunk.try_number, TaskLogChunk.seq))]


def fail_first_try_with_a_log(hub: Any, run_pk: int, assign: Any) -> str:
    """Try 1 logs two chunks and fails; try 2 starts and logs one chunk. The
    assignment id of try 2."""
    aid = assign.assignment_id
    hub.send("a1", Started(aid, hub.clock.now()))
    hub.send("a1", LogChunk(aid, 0, "try 1\n"))
    hub.send("a1", LogChunk(aid, 1, "boom\n", final=True))
    hub.send("a1", Result(aid, 1, "failed", None, None))
    hub.clock.advance(600)
    hub.tick()
    (retry,) = [a.body for a in hub.assignments_sent() if a.body.try_number == 2]
    hub.send("a1", Started(retry.assignment_id, hub.clock.now()))
    hub.send("a1", LogChunk(retry.assignment_id, 0, "try 2: h\u00e9llo\n"))
    return retry.assignment_id


def test_the_logs_api_lists_the_tries_that_have_a_log(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    ti = hub.tis(run_pk)[0]
    assert api_logs(hub, run_pk, ti.id).json() == {"ti_id": ti.id, "task_id": "t", "map_index": -1, "try_number": 1, "logs": []}
    started = hub.clock.now()
    retry_aid = fail_first_try_with_a_log(hub, run_pk, assign)
    doc = api_logs(hub, run_pk, ti.id).json()
    assert doc["try_number"] == 2
    first, second = doc["logs"]
    assert {k: first[k] for k in ("try_number", "assignment_id", "agent_id", "chunks", "bytes", "complete")} == {
        "try_number": 1, "assignment_id": assign.assignment_id, "agent_id": "a1", "chunks": 2, "bytes": len(b"try 1\nboom\n"), "complete": True,
    }
    assert datetime.fromisoformat(first["first_received_at"]).timestamp() == started
    assert datetime.fromisoformat(first["last_received_at"]).timestamp() == started
    # Bytes, not characters; running and not complete yet.
    assert (second["try_number"], second["assignment_id"], second["chunks"], second["complete"]) == (2, retry_aid, 1, False)
    assert second["bytes"] == len("try 2: h\u00e9llo\n".encode()) == len("try 2: h\u00e9llo\n") + 1
    assert datetime.fromisoformat(second["last_received_at"]).timestamp() == started + 600
    assert api_logs(hub, run_pk + 1, ti.id).status_code == 404
    assert api_logs(hub, run_pk, ti.id + 100).status_code == 404


def test_old_logs_of_finished_tries_are_pruned_and_recent_or_running_ones_kept(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)  # task_log_retention_days: 30 by default
    retry_aid = fail_first_try_with_a_log(hub, run_pk, assign)
    hub.clock.advance(timedelta(days=31).total_seconds())
    hub.agent_online("a1")
    hub.tick()
    # Try 1 is over and its chunks are 31 days old: gone. Try 2 is running: its old chunk stays.
    assert stored_seqs(hub) == [(2, 0)]
    ti = hub.tis(run_pk)[0]
    assert [e["try_number"] for e in api_logs(hub, run_pk, ti.id).json()["logs"]] == [2]
    assert api_log(hub, run_pk, ti.id, 1).json()["logs"] == []
    hub.send("a1", LogChunk(retry_aid, 1, "done\n", final=True))
    hub.send("a1", Result(retry_aid, 2, "success", None, None))
    assert hub.tis(run_pk)[0].state == "success"
    hub.clock.advance(61)
    hub.tick()
    # Try 2 is finished now: its old chunk goes, the one that arrived a minute ago stays.
    assert stored_seqs(hub) == [(2, 1)]
    hub.clock.advance(timedelta(days=30).total_seconds())
    hub.tick()
    assert stored_seqs(hub) == []


def test_pruning_deletes_in_bounded_batches(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    fail_first_try_with_a_log(hub, run_pk, assign)
    now = datetime.fromtimestamp(hub.clock.now(), UTC) + timedelta(days=31)
    with transaction(hub.sessions) as session:
        assert tasklogs.prune_chunks(session, now, 30, batch=1) == 1
    assert stored_seqs(hub) == [(1, 1), (2, 0)]
    with transaction(hub.sessions) as session:
        assert tasklogs.prune_chunks(session, now, 30, batch=5) == 1  # try 2 is still running
        assert tasklogs.prune_chunks(session, now, 30) == 0
    assert stored_seqs(hub) == [(2, 0)]


def test_retention_of_zero_days_keeps_logs_forever(make_hub: Any) -> None:
    hub = make_hub({"d.py": DAG}, task_log_retention_days=0)
    hub.agent_online("a1")
    run_pk = hub.trigger("d")
    hub.tick()
    assign = hub.assignments_sent()[0].body
    fail_first_try_with_a_log(hub, run_pk, assign)
    hub.clock.advance(timedelta(days=3650).total_seconds())
    hub.agent_online("a1")
    hub.tick()
    assert stored_seqs(hub) == [(1, 0), (1, 1), (2, 0)]


# --- the CLI and the dashboard, over the seeded hub ---------------------------------------


def _add_log(hub: Hub, text: str, final: bool = True) -> tuple[int, int]:
    with transaction(hub.sessions) as session:
        ti = session.scalar(select(TaskInstance).where(TaskInstance.task_id == "reboot"))
        assert ti is not None
        session.add(TaskLogChunk(ti_id=ti.id, try_number=1, agent_id="edge-1", assignment_id="as-reboot", seq=0, data=text, final=final,
                                 received_at=datetime(2026, 1, 1, tzinfo=UTC)))
        return ti.run_pk, ti.id


@pytest.mark.timeout(60)
def test_outpost_runs_log_prints_the_log_of_a_try(live_hub: tuple[Hub, str], capsys: pytest.CaptureFixture[str]) -> None:
    hub_, url = live_hub
    run_pk, ti_id = _add_log(hub_, "rebooting\n<b>done</b>\n")
    cli = Cli(url, capsys)
    code, out, err = cli("runs", "log", str(run_pk), "reboot")
    assert code == 0, err
    assert out == "--- edge-1 (assignment as-reboot) ---\nrebooting\n<b>done</b>\n"
    assert cli.json("runs", "log", str(run_pk), "reboot", "--try", "1")["logs"][0]["text"] == "rebooting\n<b>done</b>\n"
    code, _out, err = cli("runs", "log", str(run_pk), "nope")
    assert code == 3 and "no task 'nope'" in err
    page = hub_.client().get(f"/runs/{run_pk}")
    assert f'href="/runs/{run_pk}/tasks/{ti_id}/tries/1/log"' in page.text
    log_page = hub_.client().get(f"/runs/{run_pk}/tasks/{ti_id}/tries/1/log")
    assert log_page.status_code == 200 and "rebooting\n&lt;b&gt;done&lt;/b&gt;" in log_page.text


@pytest.mark.timeout(60)
def test_outpost_runs_log_shows_the_latest_try_that_has_a_log(live_hub: tuple[Hub, str], capsys: pytest.CaptureFixture[str]) -> None:
    hub_, url = live_hub
    run_pk, ti_id = _add_log(hub_, "try 1 failed\n")
    with transaction(hub_.sessions) as session:
        ti = session.get(TaskInstance, ti_id)
        assert ti is not None
        ti.try_number, ti.state = 2, "running"  # the retry has logged nothing yet
    cli = Cli(url, capsys)
    code, out, err = cli("runs", "log", str(run_pk), "reboot")
    assert code == 0, err
    assert out == "--- edge-1 (assignment as-reboot) ---\ntry 1 failed\n"
    assert "try 2 has no log yet; showing try 1" in err
    code, out, err = cli("runs", "log", str(run_pk), "reboot", "--try", "2")
    assert code == 0 and out == "(try 2 of reboot has no log yet)\n"


def test_the_run_page_shows_progress_of_running_device_tasks(hub: Hub) -> None:  # noqa: F811
    with transaction(hub.sessions) as session:
        ti = session.scalar(select(TaskInstance).where(TaskInstance.task_id == "collect", TaskInstance.state == "running"))
        assert ti is not None
        ti.progress, ti.progress_message = 0.42, "<i>uploading</i>"
        run_pk = ti.run_pk
    page = hub.client().get(f"/runs/{run_pk}").text
    assert '<progress max="1" value="0.42"' in page and "42%</progress>" in page
    assert "&lt;i&gt;uploading&lt;/i&gt;" in page and "<i>uploading" not in page
