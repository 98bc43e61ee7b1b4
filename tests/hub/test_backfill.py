"""Backfills on a hub driven by a manual clock: which intervals get runs,
how many run at once, reprocessing, run_backwards, pause and cancel."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import delete, select

from hub import backfill as backfills
from hub.ctl import main
from hub.ctl.errors import ExitCode
from hub.db import transaction
from hub.errors import DagNotFound, InvalidRequest
from hub.models import Backfill, DagRun, TaskInstance
from shared.clock import utcnow
from shared.states import RunState
from tests.hub.api_harness import Hub, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)

DAILY = """
from datetime import datetime, timezone
from hub.dag import DAG, PythonOperator

def work(data_interval_start=None):
    return 1

with DAG("daily", schedule="@daily", start_date=datetime(2026, 6, 1, tzinfo=timezone.utc), max_active_runs=2) as dag:
    PythonOperator(task_id="work", python_callable=work)

with DAG("manual_only", schedule=None) as manual:
    PythonOperator(task_id="work", python_callable=work)
"""


def d(day: int, month: int = 12, year: int = 2025) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def create(hub: Any, **kwargs: Any) -> tuple[int, list[backfills.Skipped]]:
    args = {"dag_id": "daily", "from_date": d(1), "to_date": d(5), **kwargs}
    with transaction(hub.sessions) as session:
        backfill, skipped = backfills.create_backfill(session, args.pop("dag_id"), args.pop("from_date"), args.pop("to_date"), utcnow(hub.clock), **args)
        return backfill.id, skipped


def runs(hub: Any) -> list[DagRun]:
    with hub.sessions() as session:
        return list(session.scalars(select(DagRun).where(DagRun.run_type == "backfill").order_by(DagRun.logical_date, DagRun.id)))


def states(hub: Any) -> list[tuple[int, str]]:
    return [(r.logical_date.day, r.state) for r in runs(hub)]


def test_a_backfill_creates_one_queued_run_per_interval_and_runs_at_most_its_limit(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    backfill_id, skipped = create(hub, max_active_runs=2, dag_run_conf={"reason": "gap"})
    assert skipped == []
    created = runs(hub)
    assert [(r.logical_date, r.data_interval_start, r.data_interval_end) for r in created] == [(d(n), d(n), d(n + 1)) for n in range(1, 6)]
    assert {(r.run_type, r.backfill_id, r.run_id.startswith("backfill__")) for r in created} == {("backfill", backfill_id, True)}
    assert all(r.conf == {"reason": "gap"} for r in created)
    assert [s for _, s in states(hub)] == ["running", "running", "queued", "queued", "queued"]
    # Each tick finishes the running ones and starts the next, never more than two at once.
    seen_running = []
    for _ in range(10):
        hub.tick(rounds=1)
        seen_running.append(sum(1 for _, s in states(hub) if s == "running"))
    assert max(seen_running) <= 2
    assert [s for _, s in states(hub)] == ["success"] * 5
    with hub.sessions() as session:
        assert session.get(Backfill, backfill_id).completed_at is not None


def test_backfill_limit_is_independent_of_the_dags_max_active_runs(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})  # the DAG allows 2
    create(hub, max_active_runs=4)
    assert [s for _, s in states(hub)] == ["running"] * 4 + ["queued"]


def test_run_backwards_starts_the_newest_interval_first(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    create(hub, max_active_runs=2, run_backwards=True)
    assert states(hub) == [(1, "queued"), (2, "queued"), (3, "queued"), (4, "running"), (5, "running")]


def test_reprocess_behavior_decides_which_existing_intervals_run_again(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    with transaction(hub.sessions) as session:
        for day, state in ((1, RunState.SUCCESS), (2, RunState.FAILED)):
            session.add(DagRun(dag_id="daily", run_id=f"scheduled__{day}", run_type="scheduled", state=state, logical_date=d(day), conf={}, created_at=utcnow(hub.clock)))
    cases = [
        ("none", [3], {1: "already_exists", 2: "already_exists"}),
        ("failed", [2, 3], {1: "already_succeeded"}),
        ("completed", [1, 2, 3], {}),
    ]
    for reprocess, expected_new, reasons in cases:
        backfill_id, skipped = create(hub, to_date=d(3), reprocess_behavior=reprocess)
        assert sorted(r.logical_date.day for r in runs(hub) if r.backfill_id == backfill_id) == expected_new, reprocess
        assert {s.logical_date.day: s.reason for s in skipped} == reasons, reprocess
        # Forget this backfill's runs so the next case sees the same history.
        with transaction(hub.sessions) as session:
            backfills.cancel(session, backfill_id, utcnow(hub.clock))
            pks = select(DagRun.id).where(DagRun.backfill_id == backfill_id)
            session.execute(delete(TaskInstance).where(TaskInstance.run_pk.in_(pks)))
            session.execute(delete(DagRun).where(DagRun.backfill_id == backfill_id))


def test_an_interval_whose_run_is_still_running_is_never_run_twice(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    with transaction(hub.sessions) as session:
        session.add(DagRun(dag_id="daily", run_id="manual__x", run_type="manual", state=RunState.RUNNING, logical_date=d(2), conf={}, created_at=utcnow(hub.clock)))
    _, skipped = create(hub, to_date=d(3), reprocess_behavior="completed")
    assert [(s.logical_date.day, s.reason) for s in skipped] == [(2, "already_running")]


def test_pause_holds_queued_runs_and_cancel_fails_them(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    backfill_id, _ = create(hub, max_active_runs=1)
    with transaction(hub.sessions) as session:
        backfills.set_paused(session, backfill_id, True)
    hub.tick(rounds=3)
    assert [s for _, s in states(hub)] == ["success", "queued", "queued", "queued", "queued"]
    with transaction(hub.sessions) as session:
        backfills.set_paused(session, backfill_id, False)
    hub.tick(rounds=1)
    assert [s for _, s in states(hub)] == ["success", "running", "queued", "queued", "queued"]
    with transaction(hub.sessions) as session:
        backfills.cancel(session, backfill_id, utcnow(hub.clock))
    hub.tick(rounds=3)
    # The run going when it was cancelled finished; those not started failed.
    assert [s for _, s in states(hub)] == ["success", "success", "failed", "failed", "failed"]
    with hub.sessions() as session:
        backfill = session.get(Backfill, backfill_id)
        assert backfill.completed_at is not None and backfill.is_paused
    with transaction(hub.sessions) as session, pytest.raises(backfills.Conflict, match="already complete"):
        backfills.cancel(session, backfill_id, utcnow(hub.clock))


BAD = [
    ({"dag_id": "nope"}, DagNotFound, "does not exist"),
    ({"dag_id": "manual_only"}, InvalidRequest, "no time-based schedule"),
    ({"from_date": d(5), "to_date": d(1)}, InvalidRequest, "is after to_date"),
    ({"to_date": d(1, 2, 2026)}, InvalidRequest, "in the future"),
    ({"reprocess_behavior": "all"}, InvalidRequest, "reprocess_behavior 'all'"),
    ({"max_active_runs": 0}, InvalidRequest, "max_active_runs must be a positive integer"),
    ({"dag_run_conf": ["x"]}, InvalidRequest, "dag_run_conf must be a JSON object"),
    ({"from_date": d(1, 1, 1990), "to_date": d(1)}, InvalidRequest, "more than 10000 intervals"),
]


def test_bad_backfills_are_refused_with_the_reason(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    for kwargs, error, message in BAD:
        with pytest.raises(error, match=message):
            create(hub, **kwargs)
    assert runs(hub) == []
    with hub.sessions() as session:
        assert session.scalars(select(Backfill)).all() == []


def test_a_second_backfill_of_a_dag_waits_for_the_first(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    first, _ = create(hub)
    with pytest.raises(backfills.AlreadyRunningBackfill, match=f"backfill {first} of 'daily' is still running"):
        create(hub, from_date=d(10), to_date=d(12))


def test_nothing_to_backfill_is_an_error_naming_why(make_hub: Any) -> None:
    hub = make_hub({"daily.py": DAILY})
    create(hub)
    hub.tick(rounds=6)
    with pytest.raises(InvalidRequest, match="all 5 intervals already have runs"):
        create(hub)


# --- through the CLI and the REST API -----------------------------------------------


def test_backfills_through_the_cli(live_hub: tuple[Hub, str], capsys: pytest.CaptureFixture[str]) -> None:
    url = live_hub[1]

    def outpost(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--hub", url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    # fleet_health is hourly and already has a run at 22:00 (seeded).
    code, out, err = outpost("backfills", "create", "fleet_health", "--from", "2025-12-31T20:00", "--to", "2025-12-31T23:00", "--dry-run")
    assert code == 0, err
    assert out.splitlines() == [
        "LOGICAL_DATE          INTERVAL_END          ACTION",
        "2025-12-31 20:00:00Z  2025-12-31 21:00:00Z  run",
        "2025-12-31 21:00:00Z  2025-12-31 22:00:00Z  run",
        "2025-12-31 23:00:00Z  2026-01-01 00:00:00Z  run",
        "2025-12-31 22:00:00Z  -                     skip (already_exists)",
    ]
    assert outpost("backfills", "list", "-o", "json")[1].count('"id"') == 0  # a dry run creates nothing
    code, out, err = outpost("backfills", "create", "fleet_health", "--from", "2025-12-31T20:00", "--to", "2025-12-31T23:00", "--max-active-runs", "1")
    assert code == 0, err
    assert "status:          running\n" in out and "runs:            2 queued, 1 running\n" in out
    assert err == "1 interval(s) skipped: 2025-12-31 22:00:00Z (already_exists)\n"
    code, out, _ = outpost("backfills", "list", "--active")
    assert code == 0 and out.splitlines()[1].split()[:2] == ["1", "fleet_health"]
    code, out, _ = outpost("backfills", "pause", "1", "-o", "json")
    assert code == 0 and json.loads(out)["is_paused"] is True
    code, out, _ = outpost("backfills", "cancel", "1", "-o", "json")
    cancelled = json.loads(out)
    assert code == 0 and cancelled["run_counts"] == {"failed": 2, "running": 1} and cancelled["completed_at"] is not None
    code, _, err = outpost("backfills", "cancel", "1")
    assert code == ExitCode.API_ERROR and "backfill 1 is already complete" in err
    shown = json.loads(outpost("backfills", "show", "1", "-o", "json")[1])
    assert (shown["from_date"], shown["to_date"], shown["max_active_runs"]) == ("2025-12-31T20:00:00Z", "2025-12-31T23:00:00Z", 1)
    code, _, err = outpost("backfills", "create", "reboot_one", "--from", "2025-12-30", "--to", "2025-12-31")
    assert code == ExitCode.API_ERROR and "no time-based schedule" in err
    code, _, err = outpost("backfills", "create", "nope", "--from", "2025-12-30", "--to", "2025-12-31")
    assert code == ExitCode.NOT_FOUND and "dag_not_found" in err
    code, _, err = outpost("backfills", "create", "fleet_health", "--from", "2025-12-30", "--to", "2025-12-31", "--conf", "[1]")
    assert code == ExitCode.USAGE and "--conf must be a JSON object" in err
    code, _, err = outpost("backfills", "show", "99")
    assert code == ExitCode.NOT_FOUND and "backfill_not_found" in err
