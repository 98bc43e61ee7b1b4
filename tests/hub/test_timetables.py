"""Timetables: Airflow's data-interval semantics, as tables, including
daylight-saving changes (Europe/Amsterdam: 2026-03-29 02:00 CET jumps to
03:00 CEST; 2026-10-25 03:00 CEST falls back to 02:00 CET)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from hub.assets import AgentEvent, Asset, AssetAll, AssetAny, Dataset
from hub.db import transaction
from hub.errors import InvalidDag
from hub.models import Dag, DagRun
from hub.timetables import (
    AssetTimetable,
    CronTimetable,
    DataInterval,
    DeltaTimetable,
    NullTimetable,
    OnceTimetable,
    Timetable,
    dag_schedule_options,
    describe,
    from_dict,
    timetable_for,
)
from shared.clock import ManualClock, utcnow
from shared.states import RunState

AMS = ZoneInfo("Europe/Amsterdam")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def ams(*args: int) -> datetime:
    return datetime(*args, tzinfo=AMS)  # type: ignore[misc]


def catch_up(tt: Timetable, start: datetime | None, now: datetime, catchup: bool = True, end: datetime | None = None, last: DataInterval | None = None) -> list[tuple[datetime, datetime]]:
    """The intervals a scheduler creates by ``now``: every one whose
    run_after has passed, each computed from the previous one."""
    out: list[tuple[datetime, datetime]] = []
    while (info := tt.next_dagrun_info(last, now, catchup, start, end)) is not None and info.run_after <= now:
        assert info.run_after == info.data_interval.end and info.logical_date == info.data_interval.start
        out.append((info.data_interval.start, info.data_interval.end))
        last = info.data_interval
        assert len(out) < 1000
    return out


# --- cron: table of first runs -------------------------------------------------

FIRST_RUN = [
    # schedule, start_date, now, catchup, expected (start, end) or None
    ("@daily", utc(2026, 1, 1), utc(2026, 1, 1), True, (utc(2026, 1, 1), utc(2026, 1, 2))),
    ("@daily", utc(2026, 1, 1, 5), utc(2026, 1, 1), True, (utc(2026, 1, 2), utc(2026, 1, 3))),  # aligned to the next boundary
    ("@daily", utc(2025, 1, 1), utc(2026, 1, 10, 12), False, (utc(2026, 1, 9), utc(2026, 1, 10))),  # the latest complete interval
    ("@daily", utc(2025, 1, 1), utc(2026, 1, 10), False, (utc(2026, 1, 9), utc(2026, 1, 10))),  # on a boundary: the one ending now
    ("@daily", utc(2025, 1, 1), utc(2026, 1, 10), True, (utc(2025, 1, 1), utc(2025, 1, 2))),  # catchup starts at the start date
    ("@daily", utc(2027, 1, 1), utc(2026, 1, 10), False, (utc(2027, 1, 1), utc(2027, 1, 2))),  # a future start date wins
    ("@hourly", utc(2026, 1, 1), utc(2026, 1, 1, 3, 30), False, (utc(2026, 1, 1, 2), utc(2026, 1, 1, 3))),
    ("@weekly", utc(2026, 1, 1), utc(2026, 1, 1), True, (utc(2026, 1, 4), utc(2026, 1, 11))),  # Sundays
    ("@monthly", utc(2026, 1, 15), utc(2026, 1, 1), True, (utc(2026, 2, 1), utc(2026, 3, 1))),
    ("@quarterly", utc(2026, 2, 1), utc(2026, 1, 1), True, (utc(2026, 4, 1), utc(2026, 7, 1))),
    ("@yearly", utc(2026, 1, 1), utc(2026, 1, 1), True, (utc(2026, 1, 1), utc(2027, 1, 1))),
    ("*/10 * * * *", utc(2026, 1, 1, 0, 3), utc(2026, 1, 1), True, (utc(2026, 1, 1, 0, 10), utc(2026, 1, 1, 0, 20))),
    ("@daily", None, utc(2026, 1, 1), True, None),  # catchup with no start date: nothing to start from
    ("@daily", None, utc(2026, 1, 10, 12), False, (utc(2026, 1, 9), utc(2026, 1, 10))),
]


@pytest.mark.parametrize(("schedule", "start", "now", "catchup", "expected"), FIRST_RUN)
def test_first_cron_interval(schedule: str, start: datetime | None, now: datetime, catchup: bool, expected: tuple[datetime, datetime] | None) -> None:
    info = timetable_for(schedule).next_dagrun_info(None, now, catchup, start, None)
    if expected is None:
        assert info is None
    else:
        assert info is not None
        assert (info.data_interval.start, info.data_interval.end) == expected
        assert info.run_after == expected[1] and info.logical_date == expected[0]


NEXT_RUN = [
    # schedule, last interval, now, catchup, expected
    ("@daily", DataInterval(utc(2026, 1, 1), utc(2026, 1, 2)), utc(2026, 1, 2), True, (utc(2026, 1, 2), utc(2026, 1, 3))),
    ("@daily", DataInterval(utc(2026, 1, 1), utc(2026, 1, 2)), utc(2026, 1, 5, 1), True, (utc(2026, 1, 2), utc(2026, 1, 3))),  # catchup: the very next
    ("@daily", DataInterval(utc(2026, 1, 1), utc(2026, 1, 2)), utc(2026, 1, 5, 1), False, (utc(2026, 1, 4), utc(2026, 1, 5))),  # no catchup: the latest
    ("@hourly", DataInterval(utc(2026, 1, 1, 0, 30), utc(2026, 1, 1, 1, 30)), utc(2026, 1, 1, 1, 30), True, (utc(2026, 1, 1, 1), utc(2026, 1, 1, 2))),  # realigned after a schedule change
]


@pytest.mark.parametrize(("schedule", "last", "now", "catchup", "expected"), NEXT_RUN)
def test_next_cron_interval(schedule: str, last: DataInterval, now: datetime, catchup: bool, expected: tuple[datetime, datetime]) -> None:
    info = timetable_for(schedule).next_dagrun_info(last, now, catchup, utc(2025, 1, 1), None)
    assert info is not None and (info.data_interval.start, info.data_interval.end) == expected


def test_end_date_stops_the_schedule_after_the_interval_that_starts_on_it() -> None:
    runs = catch_up(timetable_for("@daily"), utc(2026, 1, 1), utc(2026, 2, 1), end=utc(2026, 1, 3))
    assert runs == [(utc(2026, 1, 1), utc(2026, 1, 2)), (utc(2026, 1, 2), utc(2026, 1, 3)), (utc(2026, 1, 3), utc(2026, 1, 4))]
    assert timetable_for("@daily").next_dagrun_info(DataInterval(utc(2026, 1, 3), utc(2026, 1, 4)), utc(2026, 2, 1), True, utc(2026, 1, 1), utc(2026, 1, 3)) is None


# --- daylight saving ------------------------------------------------------------


def test_daily_cron_keeps_local_time_across_spring_forward() -> None:
    """02:00 does not exist on 2026-03-29: that day's interval boundary is the
    first instant after the gap (03:00 CEST = 01:00 UTC). One interval per
    local day, none lost, none doubled."""
    tt = timetable_for("0 2 * * *", AMS)
    runs = catch_up(tt, ams(2026, 3, 27, 2), utc(2026, 4, 1, 0, 0))
    assert runs == [
        (utc(2026, 3, 27, 1), utc(2026, 3, 28, 1)),  # 02:00 CET -> 02:00 CET
        (utc(2026, 3, 28, 1), utc(2026, 3, 29, 1)),  # 02:00 CET -> 03:00 CEST (02:00 skipped)
        (utc(2026, 3, 29, 1), utc(2026, 3, 30, 0)),  # 03:00 CEST -> 02:00 CEST: 23 h
        (utc(2026, 3, 30, 0), utc(2026, 3, 31, 0)),
        (utc(2026, 3, 31, 0), utc(2026, 4, 1, 0)),
    ]
    assert [s.astimezone(AMS).hour for s, _ in runs] == [2, 2, 3, 2, 2]


def test_daily_cron_keeps_local_time_across_fall_back() -> None:
    """02:00 happens twice on 2026-10-25: the run is at the first one (CEST)."""
    tt = timetable_for("0 2 * * *", AMS)
    runs = catch_up(tt, ams(2026, 10, 23, 2), utc(2026, 10, 28, 1))
    assert runs == [
        (utc(2026, 10, 23, 0), utc(2026, 10, 24, 0)),
        (utc(2026, 10, 24, 0), utc(2026, 10, 25, 0)),  # ends at the first 02:00 (CEST)
        (utc(2026, 10, 25, 0), utc(2026, 10, 26, 1)),  # 25 h
        (utc(2026, 10, 26, 1), utc(2026, 10, 27, 1)),
        (utc(2026, 10, 27, 1), utc(2026, 10, 28, 1)),
    ]
    assert all(s.astimezone(AMS).hour == 2 for s, _ in runs)


def test_a_fixed_time_inside_the_repeated_hour_runs_once() -> None:
    tt = timetable_for("30 2 * * *", AMS)
    runs = catch_up(tt, ams(2026, 10, 24, 2, 30), utc(2026, 10, 26, 2))
    assert [e for _, e in runs] == [utc(2026, 10, 25, 0, 30), utc(2026, 10, 26, 1, 30)]


def test_hourly_cron_keeps_elapsed_spacing_across_both_changes() -> None:
    tt = timetable_for("@hourly", AMS)
    spring = catch_up(tt, ams(2026, 3, 29, 0), utc(2026, 3, 29, 3))
    assert [e for _, e in spring] == [utc(2026, 3, 29, h) for h in range(0, 4)]  # every 60 minutes
    assert [s.astimezone(AMS).hour for s, _ in spring] == [0, 1, 3, 4]  # 02:00 local never exists
    fall = catch_up(tt, ams(2026, 10, 25, 0), utc(2026, 10, 25, 3))
    assert [e for _, e in fall] == [utc(2026, 10, 24, 23)] + [utc(2026, 10, 25, h) for h in range(0, 4)]
    assert [s.astimezone(AMS).strftime("%H%z") for s, _ in fall] == ["00+0200", "01+0200", "02+0200", "02+0100", "03+0100"]


def test_catchup_false_across_the_change_creates_only_the_latest_interval() -> None:
    tt = timetable_for("0 2 * * *", AMS)
    runs = catch_up(tt, ams(2026, 1, 1, 2), utc(2026, 3, 29, 1, 30), catchup=False)
    assert runs == [(utc(2026, 3, 28, 1), utc(2026, 3, 29, 1))]
    # Two days later, still without catchup: only the newest one again.
    runs = catch_up(tt, ams(2026, 1, 1, 2), utc(2026, 3, 31, 0, 30), catchup=False, last=DataInterval(*runs[0]))
    assert runs == [(utc(2026, 3, 30, 0), utc(2026, 3, 31, 0))]


# --- timedelta, once, none, assets ---------------------------------------------


def test_timedelta_intervals_follow_the_start_date_in_elapsed_time() -> None:
    tt = timetable_for(timedelta(hours=6))
    start = ams(2026, 3, 28, 23)  # 22:00 UTC
    runs = catch_up(tt, start, utc(2026, 3, 29, 16))
    assert runs == [(utc(2026, 3, 28, 22), utc(2026, 3, 29, 4)), (utc(2026, 3, 29, 4), utc(2026, 3, 29, 10)), (utc(2026, 3, 29, 10), utc(2026, 3, 29, 16))]
    # Without catchup: the latest complete interval on the start date's grid.
    info = tt.next_dagrun_info(None, utc(2026, 3, 30, 1), False, start, None)
    assert info is not None and info.data_interval == DataInterval(utc(2026, 3, 29, 16), utc(2026, 3, 29, 22))


def test_once_runs_at_the_start_date_and_never_again() -> None:
    tt = timetable_for("@once")
    info = tt.next_dagrun_info(None, utc(2026, 1, 1), False, utc(2026, 2, 1), None)
    assert info is not None and info.run_after == utc(2026, 2, 1) and info.data_interval == DataInterval(utc(2026, 2, 1), utc(2026, 2, 1))
    assert tt.next_dagrun_info(info.data_interval, utc(2027, 1, 1), False, utc(2026, 2, 1), None) is None
    assert tt.next_dagrun_info(None, utc(2026, 1, 1), False, None, None) is None


def test_none_and_asset_schedules_never_run_by_the_clock() -> None:
    assert timetable_for(None).next_dagrun_info(None, utc(2026, 1, 1), True, utc(2020, 1, 1), None) is None
    tt = timetable_for([Asset("s3://b/x")])
    assert isinstance(tt, AssetTimetable) and tt.next_dagrun_info(None, utc(2026, 1, 1), True, utc(2020, 1, 1), None) is None


@pytest.mark.parametrize("schedule", ["@daily", "*/5 * * * *", "@once", timedelta(minutes=90), None, [Asset("s3://a"), Dataset("s3://b")], Asset("s3://a") | (Asset("s3://b") & AgentEvent("battery_low"))])
def test_timetables_survive_serialization(schedule: object) -> None:
    tt = timetable_for(schedule, AMS)
    again = from_dict(tt.serialize())
    assert type(again) is type(tt) and again.serialize() == tt.serialize()


def test_cron_serializes_with_its_time_zone() -> None:
    assert timetable_for("@daily", AMS).serialize() == {"kind": "cron", "expression": "0 0 * * *", "timezone": "Europe/Amsterdam"}
    assert isinstance(timetable_for(None), NullTimetable) and isinstance(timetable_for("@once"), OnceTimetable)
    assert isinstance(timetable_for(timedelta(days=1)), DeltaTimetable) and isinstance(timetable_for("0 3 * * 1-5"), CronTimetable)


def test_fixed_offset_and_utc_time_zones_round_trip() -> None:
    plus_one = timezone(timedelta(hours=1))
    tt = timetable_for("0 2 * * *", plus_one)
    assert tt.serialize()["timezone"] == "+01:00" and from_dict(tt.serialize()).serialize() == tt.serialize()
    info = tt.next_dagrun_info(None, utc(2026, 1, 1), True, datetime(2026, 1, 1, tzinfo=plus_one), None)
    assert info is not None and info.data_interval.start == utc(2026, 1, 1, 1)
    assert timetable_for("@daily", timezone.utc).serialize()["timezone"] == "UTC"
    assert describe([Asset("s3://" + "x" * 200)]) is not None and len(describe([Asset("s3://" + "x" * 200)]) or "") == 100


def test_backfill_intervals_are_those_whose_logical_date_is_in_the_range() -> None:
    tt = timetable_for("@daily")
    got = list(tt.iter_intervals(utc(2026, 1, 1, 12), utc(2026, 1, 4)))
    assert got == [DataInterval(utc(2026, 1, 2), utc(2026, 1, 3)), DataInterval(utc(2026, 1, 3), utc(2026, 1, 4)), DataInterval(utc(2026, 1, 4), utc(2026, 1, 5))]


# --- asset conditions -----------------------------------------------------------


def test_asset_conditions() -> None:
    a, b, c = Asset("s3://a"), Asset("s3://b"), Asset("s3://c")
    assert AssetAll(a, b).evaluate({"s3://a", "s3://b"}) and not AssetAll(a, b).evaluate({"s3://a"})
    assert AssetAny(a, b).evaluate({"s3://b"}) and not AssetAny(a, b).evaluate({"s3://c"})
    cond = a | (b & c)
    assert cond.evaluate({"s3://a"}) and cond.evaluate({"s3://b", "s3://c"}) and not cond.evaluate({"s3://b"})
    assert AgentEvent("battery_low") == Asset("agent-event://battery_low")
    assert Dataset is Asset


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "every day"}, "is not a cron expression"),
    ({"schedule": "@continuous"}, "not supported"),
    ({"schedule": 5}, "is not a cron string"),
    ({"schedule": timedelta(0)}, "shorter than"),
    ({"schedule": [Asset("s3://a"), "s3://b"]}, "is not a cron string"),
    ({"schedule": "@daily", "start_date": "2026-01-01"}, "start_date must be a datetime"),
    ({"schedule": "@daily", "start_date": utc(2026, 2, 1), "end_date": utc(2026, 1, 1)}, "is before start_date"),
    ({"schedule": "@daily", "max_active_runs": 0}, "max_active_runs must be a positive integer"),
    ({"schedule": "@daily", "catchup": "yes"}, "catchup must be True or False"),
])
def test_invalid_schedules_are_named(kwargs: dict[str, object], message: str) -> None:
    args = {"schedule": None, "start_date": None, "end_date": None, "catchup": False, "max_active_runs": None, **kwargs}
    with pytest.raises(InvalidDag, match=message) as err:
        dag_schedule_options("d", args["schedule"], args["start_date"], args["end_date"], args["catchup"], args["max_active_runs"], {})
    assert "'d'" in str(err.value)


@pytest.mark.parametrize("uri", ["", "has space", "airflow://x", "x" * 1001, "agent-event://bad name"])
def test_invalid_asset_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidDag):
        Asset(uri)


def test_naive_start_dates_are_utc_and_default_args_give_the_start_date() -> None:
    opts = dag_schedule_options("d", "@daily", datetime(2026, 1, 1), None, False, None, {})
    assert opts["start_date"] == utc(2026, 1, 1) and opts["max_active_runs"] == 16
    opts = dag_schedule_options("d", "@daily", None, None, True, 3, {"start_date": ams(2026, 1, 1)})
    assert opts["start_date"] == ams(2026, 1, 1) and opts["timetable"].serialize()["timezone"] == "Europe/Amsterdam"


# --- on the hub: the scheduler creates the runs -----------------------------------

SCHEDULED = """
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo
from hub.dag import DAG, AgentOperator

AMS = ZoneInfo("Europe/Amsterdam")

with DAG("nightly", schedule="0 2 * * *", start_date=datetime(2026, 3, 27, 2, tzinfo=AMS), catchup=True) as nightly:
    AgentOperator(task_id="work", job_type="noop")

with DAG("limited", schedule="@daily", start_date=datetime(2026, 3, 20, tzinfo=AMS), catchup=True, max_active_runs=2) as limited:
    AgentOperator(task_id="work", job_type="noop")

with DAG("latest_only", schedule="@hourly", start_date=datetime(2026, 3, 1, tzinfo=AMS), catchup=False) as latest_only:
    AgentOperator(task_id="work", job_type="noop")
"""


def scheduled_runs(hub: Any, dag_id: str) -> list[tuple[datetime, datetime, datetime]]:
    with hub.sessions() as session:
        rows = session.scalars(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_type == "scheduled").order_by(DagRun.logical_date)).all()
        return [(r.logical_date, r.data_interval_start, r.data_interval_end) for r in rows]


def test_the_hub_catches_up_exactly_the_expected_intervals_across_a_dst_change(make_hub: Any, manual_clock: ManualClock) -> None:
    manual_clock.set(utc(2026, 3, 28, 12).timestamp())
    hub = make_hub({"scheduled.py": SCHEDULED})
    hub.tick(rounds=1)
    assert scheduled_runs(hub, "nightly") == [(utc(2026, 3, 27, 1), utc(2026, 3, 27, 1), utc(2026, 3, 28, 1))]
    # The hub is down over the change and comes back on 2026-04-01 at 01:00 UTC.
    manual_clock.set(utc(2026, 4, 1, 1).timestamp())
    hub.tick(rounds=1)
    ends = [e for _, _, e in scheduled_runs(hub, "nightly")]
    assert ends == [utc(2026, 3, 28, 1), utc(2026, 3, 29, 1), utc(2026, 3, 30, 0), utc(2026, 3, 31, 0), utc(2026, 4, 1, 0)]
    assert all(start.astimezone(AMS).hour in (2, 3) for start, _, _ in scheduled_runs(hub, "nightly"))
    with hub.sessions() as session:
        dag = session.get(Dag, "nightly")
        assert (dag.next_data_interval_start, dag.next_data_interval_end, dag.next_run_at) == (utc(2026, 4, 1, 0), utc(2026, 4, 2, 0), utc(2026, 4, 2, 0))


def test_catching_up_stops_at_max_active_runs_and_goes_on_as_runs_finish(make_hub: Any, manual_clock: ManualClock) -> None:
    manual_clock.set(utc(2026, 3, 26, 12).timestamp())  # six intervals are due for "limited"
    hub = make_hub({"scheduled.py": SCHEDULED})
    hub.tick(rounds=2)
    first = scheduled_runs(hub, "limited")
    assert [s.astimezone(AMS).day for s, _, _ in first] == [20, 21]  # no agent runs the work: both stay active
    with transaction(hub.sessions) as session:
        for run in session.scalars(select(DagRun).where(DagRun.dag_id == "limited")):
            run.state = RunState.SUCCESS
    hub.tick(rounds=2)
    assert [s.astimezone(AMS).day for s, _, _ in scheduled_runs(hub, "limited")] == [20, 21, 22, 23]
    with hub.sessions() as session:
        active = session.scalars(select(DagRun).where(DagRun.dag_id == "limited", DagRun.state.in_(["queued", "running"]))).all()
        assert len(active) == 2 and session.get(Dag, "limited").max_active_runs == 2


def test_without_catchup_a_long_downtime_creates_only_the_latest_interval(make_hub: Any, manual_clock: ManualClock) -> None:
    manual_clock.set(utc(2026, 3, 29, 0, 30).timestamp())  # 01:30 CET
    hub = make_hub({"scheduled.py": SCHEDULED})
    hub.tick(rounds=1)
    assert scheduled_runs(hub, "latest_only") == [(utc(2026, 3, 28, 23), utc(2026, 3, 28, 23), utc(2026, 3, 29, 0))]
    manual_clock.set(utc(2026, 3, 29, 5, 10).timestamp())  # across the spring-forward gap
    hub.tick(rounds=1)
    assert [e for _, _, e in scheduled_runs(hub, "latest_only")] == [utc(2026, 3, 29, 0), utc(2026, 3, 29, 5)]


def test_a_manual_run_covers_the_last_complete_interval(make_hub: Any) -> None:
    assert timetable_for("@daily", AMS).infer_manual_data_interval(utc(2026, 3, 29, 1)) == DataInterval(utc(2026, 3, 27, 23), utc(2026, 3, 28, 23))
    assert timetable_for(timedelta(hours=6)).infer_manual_data_interval(utc(2026, 1, 1, 5)) == DataInterval(utc(2025, 12, 31, 23), utc(2026, 1, 1, 5))
    assert timetable_for(None).infer_manual_data_interval(utc(2026, 1, 1)) == DataInterval(utc(2026, 1, 1), utc(2026, 1, 1))
    hub = make_hub({"scheduled.py": SCHEDULED})  # clock at 2026-01-01T00:00Z = 01:00 in Amsterdam
    with hub.sessions() as session:
        run = session.get(DagRun, hub.trigger("nightly"))
        assert run.logical_date == utc(2026, 1, 1)  # the trigger time, as in Airflow
        assert (run.data_interval_start, run.data_interval_end) == (utc(2025, 12, 30, 1), utc(2025, 12, 31, 1))


def test_a_changed_start_date_or_time_zone_recomputes_the_next_run(make_hub: Any, tmp_path: Any) -> None:
    text = """
from datetime import datetime
from zoneinfo import ZoneInfo
from hub.dag import DAG, AgentOperator
with DAG("moving", schedule="@daily", start_date=datetime(2026, 6, 1, tzinfo=ZoneInfo("{tz}")), catchup=True) as dag:
    AgentOperator(task_id="work", job_type="noop")
"""
    hub = make_hub({"moving.py": text.replace("{tz}", "UTC")})
    hub.tick(rounds=1)

    def next_interval() -> tuple[datetime | None, datetime | None]:
        with hub.sessions() as session:
            dag = session.get(Dag, "moving")
            return dag.next_data_interval_start, dag.next_data_interval_end

    assert next_interval() == (utc(2026, 6, 1), utc(2026, 6, 2))
    (tmp_path / "dags" / "moving.py").write_text(text.replace("{tz}", "Asia/Tokyo"))
    hub.scheduler.parse_dags(utcnow(hub.clock), force=True)
    hub.tick(rounds=1)
    assert next_interval() == (utc(2026, 5, 31, 15), utc(2026, 6, 1, 15))  # midnight in Tokyo


# --- properties ----------------------------------------------------------------------

ZONES = ["Europe/Amsterdam", "America/New_York", "Australia/Sydney", "Asia/Kolkata", "America/Santiago", "UTC"]
CRONS = ["0 2 * * *", "30 1 * * *", "0 3 * * 0", "@hourly", "*/20 * * * *", "0 */6 * * *", "0 0 1 * *"]


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    cron=st.sampled_from(CRONS),
    start=st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2026, 12, 31)),
)
def test_catchup_intervals_are_contiguous_increasing_and_on_the_schedule(zone: str, cron: str, start: datetime) -> None:
    """Whatever the zone and its DST rules: each interval starts where the
    last ended, time only moves forward, and a fixed-time daily schedule
    fires once per local day, at its time (or just after a skipped hour)."""
    tz = ZoneInfo(zone)
    tt = timetable_for(cron, tz)
    start_date = start.replace(tzinfo=tz)
    last: DataInterval | None = None
    starts: list[datetime] = []
    for _ in range(40):
        info = tt.next_dagrun_info(last, utc(2030, 1, 1), True, start_date, None)
        assert info is not None
        interval = info.data_interval
        assert interval.start < interval.end and info.run_after == interval.end
        assert interval.start >= start_date
        if last is not None:
            assert interval.start == last.end
        starts.append(interval.start)
        last = interval
    if cron in ("0 2 * * *", "30 1 * * *"):
        days = [s.astimezone(tz).date() for s in starts]
        assert all((b - a).days == 1 for a, b in zip(days, days[1:])), days
        wanted = (2, 0) if cron == "0 2 * * *" else (1, 30)
        for s in starts:
            local = s.astimezone(tz)
            # At the wall time, or moved forward by a skipped hour (never back, never more than the gap).
            assert (local.hour, local.minute) == wanted or (local.replace(tzinfo=None) - local.replace(hour=wanted[0], minute=wanted[1], tzinfo=None)) <= timedelta(hours=1)


def test_a_next_run_stored_without_its_interval_is_recomputed(make_hub: Any, manual_clock: ManualClock) -> None:
    """A DAG row from a hub before data intervals has next_run_at alone."""
    manual_clock.set(utc(2026, 3, 28, 12).timestamp())
    hub = make_hub({"scheduled.py": SCHEDULED})
    with transaction(hub.sessions) as session:
        dag = session.get(Dag, "nightly")
        dag.next_run_at, dag.next_data_interval_start, dag.next_data_interval_end = utc(2026, 3, 28, 1), None, None
    hub.tick(rounds=1)
    assert scheduled_runs(hub, "nightly") == [(utc(2026, 3, 27, 1), utc(2026, 3, 27, 1), utc(2026, 3, 28, 1))]


def test_once_and_end_date_on_the_hub(make_hub: Any, manual_clock: ManualClock) -> None:
    text = """
from datetime import datetime, timezone
from hub.dag import DAG, AgentOperator
with DAG("once", schedule="@once", start_date=datetime(2025, 12, 31, 12, tzinfo=timezone.utc)) as once:
    AgentOperator(task_id="work", job_type="noop")
with DAG("ending", schedule="@daily", start_date=datetime(2025, 12, 29, tzinfo=timezone.utc),
         end_date=datetime(2025, 12, 30, tzinfo=timezone.utc), catchup=True) as ending:
    AgentOperator(task_id="work", job_type="noop")
"""
    hub = make_hub({"dags.py": text})
    for _ in range(3):
        hub.tick(rounds=1)
        manual_clock.advance(86400)
    assert scheduled_runs(hub, "once") == [(utc(2025, 12, 31, 12), utc(2025, 12, 31, 12), utc(2025, 12, 31, 12))]
    assert [s for s, _, _ in scheduled_runs(hub, "ending")] == [utc(2025, 12, 29), utc(2025, 12, 30)]
    with hub.sessions() as session:
        assert [(d.next_run_at, d.next_data_interval_start) for d in session.scalars(select(Dag).order_by(Dag.dag_id))] == [(None, None), (None, None)]
