"""Schedules and their data intervals, with Airflow's semantics.

A DAG's ``schedule`` is a cron string or preset (``@hourly``, ``@daily``,
``@weekly``, ``@monthly``, ``@quarterly``, ``@yearly``), ``@once``, a
``timedelta``, ``None`` (manual only) or assets (event-driven, see
``hub.assets``). Each becomes a timetable.

A time-based run covers a *data interval* ``[start, end)`` and is created
once the interval is over, at ``end`` (``run_after``); its logical date is
the interval's start. That is Airflow's ``CronDataIntervalTimetable`` and
``DeltaDataIntervalTimetable`` (Airflow 3 keeps them; its default for cron
strings became the trigger timetable, selected back with
``[scheduler] create_cron_data_intervals = True``).

Time zones. A cron expression is evaluated in the DAG's time zone (its
``start_date``'s, UTC otherwise), so ``"0 2 * * *"`` stays at 02:00 local
time across daylight-saving changes. On the day the clocks skip the hour
(02:00 does not exist), that day's run happens at the first instant after
the gap (03:00 local, the same instant 02:00 would have been in winter
time); on the day the clocks repeat the hour, it runs once, at the first
02:00. Each local day thus gets exactly one interval: none lost, none
doubled. This is what Airflow does (pendulum's default rules for skipped and
ambiguous local times, which are also ``zoneinfo``'s ``fold=0``). A cron
expression that does not fire at a fixed local time of day (``*/10 * * * *``,
``@hourly``) instead keeps its spacing in elapsed time across the change
(Airflow's "DST fix"): an hourly DAG runs every 60 minutes, 23 or 25 times on
those days. A ``timedelta`` schedule is elapsed time, in UTC.

Everything here is pure: the scheduler calls :func:`from_dict` on the DAG's
serialized ``timetable`` and never imports DAG files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from hub import assets as asset_api
from hub.errors import InvalidDag

CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
#: The shortest timedelta schedule: anything shorter is a busy loop, not a schedule.
_MIN_DELTA = timedelta(seconds=1)


@dataclass(frozen=True)
class DataInterval:
    start: datetime
    end: datetime


@dataclass(frozen=True)
class DagRunInfo:
    """The next run a timetable wants: created at ``run_after``, covering ``data_interval``."""

    run_after: datetime
    data_interval: DataInterval

    @property
    def logical_date(self) -> datetime:
        return self.data_interval.start

    @classmethod
    def interval(cls, start: datetime, end: datetime) -> DagRunInfo:
        return cls(end, DataInterval(start, end))

    @classmethod
    def exact(cls, at: datetime) -> DagRunInfo:
        return cls(at, DataInterval(at, at))


# --- time zones ------------------------------------------------------------------


def timezone_name(tz: tzinfo | None) -> str:
    """A stored name for a time zone: an IANA key, ``UTC`` or a fixed ``+HH:MM``."""
    if tz is None or tz is UTC:
        return "UTC"
    key = getattr(tz, "key", None)  # ZoneInfo
    if isinstance(key, str):
        return key
    if isinstance(tz, timezone):
        offset = tz.utcoffset(None)
        if offset == timedelta(0):
            return "UTC"
        sign = "-" if offset < timedelta(0) else "+"
        minutes = abs(int(offset.total_seconds())) // 60
        return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    name = getattr(tz, "name", None) or getattr(tz, "zone", None) or str(tz)  # pendulum, pytz
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise InvalidDag(f"time zone {tz!r} is not an IANA time zone; use zoneinfo.ZoneInfo('Europe/Amsterdam') or datetime.timezone.utc") from None
    return str(name)


def parse_timezone(name: str) -> tzinfo:
    if name == "UTC":
        return UTC
    if name[:1] in "+-" and len(name) == 6:
        sign = -1 if name[0] == "-" else 1
        return timezone(sign * timedelta(hours=int(name[1:3]), minutes=int(name[4:6])))
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidDag(f"unknown time zone {name!r}: {exc}") from None


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(UTC)


def _wall_to_utc(naive: datetime, tz: tzinfo) -> datetime:
    """A local wall time in ``tz`` as UTC. A skipped local time (spring
    forward) lands after the gap and an ambiguous one (fall back) is its
    first occurrence: ``fold=0``, pendulum's and so Airflow's default."""
    return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)


# --- timetables ------------------------------------------------------------------


class Timetable:
    kind = "none"
    #: True when runs follow the clock (cron, delta): those can catch up and be backfilled.
    periodic = False
    summary = "None"

    def next_dagrun_info(
        self, last_interval: DataInterval | None, now: datetime, catchup: bool, start_date: datetime | None, end_date: datetime | None
    ) -> DagRunInfo | None:
        """The run to create after ``last_interval`` (the last automated run's
        interval, None before the first), or None when there is none. The
        answer may lie in the future: the caller creates it at ``run_after``."""
        return None

    def serialize(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def infer_manual_data_interval(self, run_after: datetime) -> DataInterval:
        """The data interval of a run triggered by hand at ``run_after``."""
        return DataInterval(run_after, run_after)

    def iter_intervals(self, earliest: datetime, latest: datetime) -> Iterator[DataInterval]:
        """Every data interval whose logical date (start) lies in
        ``[earliest, latest]``, oldest first (backfills)."""
        return iter(())


class NullTimetable(Timetable):
    """``schedule=None``: manual and API triggers only."""


class OnceTimetable(Timetable):
    """``@once``: one run, at the start date."""

    kind = "once"
    summary = "@once"

    def next_dagrun_info(self, last_interval: DataInterval | None, now: datetime, catchup: bool, start_date: datetime | None, end_date: datetime | None) -> DagRunInfo | None:
        if last_interval is not None or start_date is None:
            return None
        if end_date is not None and start_date > end_date:
            return None
        return DagRunInfo.exact(_utc(start_date))


class _IntervalTimetable(Timetable):
    """What cron and delta schedules share: Airflow's ``_DataIntervalTimetable``."""

    periodic = True

    def _get_next(self, current: datetime) -> datetime:
        raise NotImplementedError

    def _get_prev(self, current: datetime) -> datetime:
        raise NotImplementedError

    def _align_to_next(self, current: datetime) -> datetime:
        """``current`` if it is on a boundary, else the next boundary."""
        following = self._get_next(current)
        return current if self._get_prev(following) == current else following

    def _align_to_prev(self, current: datetime) -> datetime:
        previous = self._get_prev(current)
        return current if self._get_next(previous) == current else previous

    def _skip_to_latest(self, earliest: datetime | None, now: datetime) -> datetime:
        """Without catchup: the start of the latest interval that is complete
        at ``now`` (so it runs at once), but not before ``earliest``."""
        raise NotImplementedError

    def next_dagrun_info(
        self, last_interval: DataInterval | None, now: datetime, catchup: bool, start_date: datetime | None, end_date: datetime | None
    ) -> DagRunInfo | None:
        now = _utc(now)
        earliest = _utc(start_date) if start_date is not None else None
        if not catchup:
            earliest = self._skip_to_latest(earliest, now)
        elif earliest is not None:
            earliest = self._align_to_next(earliest)
        if last_interval is None:
            if earliest is None:
                return None
            start = earliest
        else:
            last_end = _utc(last_interval.end)
            if self._get_next(_utc(last_interval.start)) == last_end:
                # This schedule's own interval: the next one starts where it
                # ended. (Airflow re-aligns here too, which across a DST change
                # can step back before the end for a schedule such as
                # "0 */6 * * *" and make two intervals overlap.)
                start = last_end
            else:
                # A changed schedule continues on its own boundaries (Airflow).
                start = self._align_to_prev(last_end)
            if earliest is not None:
                start = max(start, earliest)
        if end_date is not None and start > _utc(end_date):
            return None
        return DagRunInfo.interval(start, self._get_next(start))

    def infer_manual_data_interval(self, run_after: datetime) -> DataInterval:
        # Airflow: the last complete interval before the trigger, so a manual
        # run of a daily DAG at 01:00 covers yesterday.
        end = self._align_to_prev(_utc(run_after))
        return DataInterval(self._get_prev(end), end)

    def iter_intervals(self, earliest: datetime, latest: datetime) -> Iterator[DataInterval]:
        start = self._align_to_next(_utc(earliest))
        latest = _utc(latest)
        while start <= latest:
            end = self._get_next(start)
            yield DataInterval(start, end)
            start = end


class CronTimetable(_IntervalTimetable):
    kind = "cron"

    def __init__(self, expression: str, tz: tzinfo = UTC) -> None:
        self.expression = CRON_PRESETS.get(expression, expression)
        self.tz = tz
        self.summary = expression
        try:
            if not croniter.is_valid(self.expression):
                raise ValueError("not valid")
            first, second = _two_fires(self.expression)
        except (ValueError, KeyError, TypeError):
            raise InvalidDag(
                f"schedule {expression!r} is not a cron expression or preset ({', '.join(['@once', *CRON_PRESETS])}), a timedelta, assets or None"
            ) from None
        # Airflow's test: a schedule whose next two fires share the time of day
        # is "fixed" (02:00 daily) and keeps its local time across DST; any
        # other keeps its elapsed spacing.
        self._fixed = (first.hour, first.minute) == (second.hour, second.minute)

    def serialize(self) -> dict[str, Any]:
        return {"kind": self.kind, "expression": self.expression, "timezone": timezone_name(self.tz)}

    def _get_next(self, current: datetime) -> datetime:
        naive = current.astimezone(self.tz).replace(tzinfo=None)
        it = croniter(self.expression, naive)
        scheduled = it.get_next(datetime)
        if not self._fixed:
            return _utc(current) + (scheduled - naive)
        result = _wall_to_utc(scheduled, self.tz)
        # In the repeated hour, a wall time already passed in its first
        # occurrence maps before ``current``: it fired then, so take the next.
        while result <= current:
            result = _wall_to_utc(it.get_next(datetime), self.tz)
        return result

    def _get_prev(self, current: datetime) -> datetime:
        naive = current.astimezone(self.tz).replace(tzinfo=None)
        it = croniter(self.expression, naive)
        scheduled = it.get_prev(datetime)
        if not self._fixed:
            return _utc(current) - (naive - scheduled)
        result = _wall_to_utc(scheduled, self.tz)
        # Just after a skipped hour, a wall time inside the gap maps onto the
        # gap's end, which may be ``current`` itself: that fire is not earlier.
        while result >= current:
            result = _wall_to_utc(it.get_prev(datetime), self.tz)
        return result

    def _skip_to_latest(self, earliest: datetime | None, now: datetime) -> datetime:
        last_start = self._get_prev(now)
        next_start = self._get_next(last_start)
        # On a boundary, the interval ending now is complete; between two, the
        # one that ended at the last boundary is.
        new_start = last_start if next_start == now else self._get_prev(last_start)
        return new_start if earliest is None else max(new_start, self._align_to_next(earliest))


class DeltaTimetable(_IntervalTimetable):
    """``schedule=timedelta(...)``: intervals of that length from the start
    date, in elapsed time."""

    kind = "delta"

    def __init__(self, delta: timedelta) -> None:
        if delta < _MIN_DELTA:
            raise InvalidDag(f"schedule timedelta {delta} is shorter than {_MIN_DELTA}")
        self.delta = delta
        self.summary = str(delta)

    def serialize(self) -> dict[str, Any]:
        return {"kind": self.kind, "seconds": self.delta.total_seconds()}

    # Every instant is a boundary of a delta schedule (Airflow aligns nothing).
    def _get_next(self, current: datetime) -> datetime:
        return _utc(current) + self.delta

    def _get_prev(self, current: datetime) -> datetime:
        return _utc(current) - self.delta

    def _align_to_next(self, current: datetime) -> datetime:
        return current

    def _align_to_prev(self, current: datetime) -> datetime:
        return current

    def _skip_to_latest(self, earliest: datetime | None, now: datetime) -> datetime:
        # The latest complete interval on the grid of the start date (Airflow
        # rounds to multiples of the delta since 1970 instead, which leaves
        # catchup=False runs off the start date's grid).
        anchor = earliest if earliest is not None else datetime(1970, 1, 1, tzinfo=UTC)
        if now <= anchor:
            return anchor
        periods = (now - anchor) // self.delta
        return max(anchor, anchor + (periods - 1) * self.delta)


class AssetTimetable(Timetable):
    """``schedule=[Asset(...), ...]``: runs when the asset condition holds,
    decided by the scheduler from asset events, never by the clock."""

    kind = "assets"

    def __init__(self, condition: asset_api.BaseAsset) -> None:
        self.condition = condition
        self.summary = _asset_summary(condition)

    def serialize(self) -> dict[str, Any]:
        return {"kind": self.kind, "condition": self.condition.serialize(), "uris": sorted(set(self.condition.iter_uris()))}


def _asset_summary(condition: asset_api.BaseAsset) -> str:
    if isinstance(condition, asset_api.Asset):
        return condition.uri
    assert isinstance(condition, asset_api.AssetAll | asset_api.AssetAny)
    joiner = " & " if isinstance(condition, asset_api.AssetAll) else " | "
    return "(" + joiner.join(_asset_summary(o) for o in condition.objects) + ")"


def _two_fires(expression: str) -> tuple[datetime, datetime]:
    it = croniter(expression, datetime(2001, 1, 1))
    return it.get_next(datetime), it.get_next(datetime)


# --- building and loading --------------------------------------------------------


def timetable_for(schedule: Any, tz: tzinfo = UTC) -> Timetable:
    """The timetable of a DAG's ``schedule`` argument; raises ``InvalidDag``."""
    if schedule is None:
        return NullTimetable()
    if isinstance(schedule, Timetable):
        return schedule
    if isinstance(schedule, str):
        if schedule == "@once":
            return OnceTimetable()
        if schedule == "@continuous":
            raise InvalidDag("schedule '@continuous' is not supported; use a short timedelta or an asset schedule")
        return CronTimetable(schedule, tz)
    if isinstance(schedule, timedelta):
        return DeltaTimetable(schedule)
    if isinstance(schedule, asset_api.BaseAsset) or (isinstance(schedule, list | tuple | set) and all(isinstance(s, asset_api.BaseAsset) for s in schedule)):
        return AssetTimetable(asset_api.condition_of(schedule))
    raise InvalidDag(f"schedule {schedule!r} is not a cron string or preset, '@once', a timedelta, assets or None")


def from_dict(data: dict[str, Any] | None) -> Timetable:
    """A timetable from a DAG's serialized ``timetable``."""
    if not data:
        return NullTimetable()
    kind = data.get("kind")
    if kind == "cron":
        return CronTimetable(data["expression"], parse_timezone(data.get("timezone", "UTC")))
    if kind == "delta":
        return DeltaTimetable(timedelta(seconds=float(data["seconds"])))
    if kind == "once":
        return OnceTimetable()
    if kind == "assets":
        return AssetTimetable(asset_api.from_dict(data["condition"]))
    if kind == "none":
        return NullTimetable()
    raise InvalidDag(f"unknown timetable kind {kind!r}")


def describe(schedule: Any) -> str | None:
    """A short text for the ``dags.schedule`` column and listings."""
    if schedule is None:
        return None
    text = schedule if isinstance(schedule, str) else timetable_for(schedule).summary
    return text if len(text) <= 100 else text[:97] + "..."  # the column's width


def parse_datetime(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def structure_schedule(structure: dict[str, Any]) -> tuple[Timetable, datetime | None, datetime | None, bool]:
    """From a serialized DAG: its timetable, start date, end date and catchup."""
    return (
        from_dict(structure.get("timetable")),
        parse_datetime(structure.get("start_date")),
        parse_datetime(structure.get("end_date")),
        bool(structure.get("catchup", False)),
    )


def schedule_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    """True when a reparsed DAG's schedule differs, so its next run must be recomputed."""
    keys = ("timetable", "start_date", "end_date", "catchup")
    return old is None or any(old.get(k) != new.get(k) for k in keys)


def check_cron(schedule: str) -> str:
    """The cron expression for a schedule string; raises ``InvalidDag``."""
    return CronTimetable(schedule).expression


# --- the DAG's side ------------------------------------------------------------------

#: Airflow's default for ``max_active_runs``.
DEFAULT_MAX_ACTIVE_RUNS = 16


def _aware(dag_id: str, name: str, value: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidDag(f"DAG {dag_id!r}: {name} must be a datetime, not {type(value).__name__}")
    # Airflow reads a naive date in its default time zone, UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def dag_schedule_options(
    dag_id: str, schedule: Any, start_date: Any, end_date: Any, catchup: Any, max_active_runs: Any, default_args: dict[str, Any]
) -> dict[str, Any]:
    """The scheduling attributes of a ``DAG``, checked; raises ``InvalidDag``
    naming the problem. ``start_date`` and ``end_date`` may come from
    ``default_args``, as in Airflow."""
    start = _aware(dag_id, "start_date", start_date if start_date is not None else default_args.get("start_date"))
    end = _aware(dag_id, "end_date", end_date if end_date is not None else default_args.get("end_date"))
    if start is not None and end is not None and end < start:
        raise InvalidDag(f"DAG {dag_id!r}: end_date {end.isoformat()} is before start_date {start.isoformat()}")
    tz = start.tzinfo if start is not None else UTC
    assert tz is not None
    try:
        timezone_name(tz)
        timetable = timetable_for(schedule, tz)
    except InvalidDag as exc:
        raise InvalidDag(f"DAG {dag_id!r}: {exc}") from None
    runs = DEFAULT_MAX_ACTIVE_RUNS if max_active_runs is None else max_active_runs
    if not isinstance(runs, int) or isinstance(runs, bool) or runs < 1:
        raise InvalidDag(f"DAG {dag_id!r}: max_active_runs must be a positive integer, not {max_active_runs!r}")
    if not isinstance(catchup, bool):
        raise InvalidDag(f"DAG {dag_id!r}: catchup must be True or False, not {catchup!r}")
    return {"schedule": schedule, "start_date": start, "end_date": end, "catchup": catchup, "max_active_runs": runs, "timezone": tz, "timetable": timetable}


def serialize_dag_schedule(dag: Any) -> dict[str, Any]:
    """The serialized DAG's scheduling keys (see the structure contract)."""
    return {
        "schedule": describe(dag.schedule),
        "timetable": dag.timetable.serialize(),
        "start_date": dag.start_date.isoformat() if dag.start_date else None,
        "end_date": dag.end_date.isoformat() if dag.end_date else None,
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "timezone": timezone_name(dag.timezone),
    }
