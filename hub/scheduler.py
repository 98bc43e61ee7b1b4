"""The scheduling loop.

``Scheduler.tick()`` does one pass: reload changed DAG files, create runs that
are due (cron), decide every waiting task instance with its trigger rule,
dispatch ready agent tasks (through the transactional outbox) and hand ready
hub tasks to the local executor, bring retries back, re-send assignments no
agent accepted, mark silent agents offline, and finish runs. Each step is its
own transaction, and rows are claimed with ``SKIP LOCKED`` on PostgreSQL so
several schedulers can share a database.

``run_until_idle()`` and ``run_forever()`` drive ``tick()``; tests call
``tick()`` with a manual clock and never sleep.
"""

from __future__ import annotations

import json
import logging
from collections import namedtuple
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session, defer, sessionmaker

from hub import asset_events, offline, timetables
from hub import branching, rollouts, tasklogs, templating
from hub import events as ev
from hub.admission import OCCUPYING, Admission, Candidate, Verdict, effective_weights, ordered
from hub.dagprocessor import SerializedDagBag
from hub.db import skip_locked, transaction
from hub.dispatcher import Dispatcher
from hub.errors import DagNotFound, InvalidDag, InvalidRequest
from hub.deadlines import check_deadlines
from hub.events import EventBus
from hub.mapping import DEFAULT_MAX_MAP_LENGTH, MappingFailure, agent_params, mapping_input_fetcher, resolve_expansion, xcom_sources
from hub.lifecycle import current_dag_spec, dag_callback, task_callback
from hub.params import resolve_run_params
from hub.xcom import render_agent_task
from hub.models import Agent, Assignment, Backfill, Dag, DagRun, DagVersion, Pool, TaskInstance
from hub.scheduling_options import DEFAULT_MAX_ACTIVE_RUNS, DEFAULT_MAX_ACTIVE_TASKS, DEFAULT_POOL
from hub.targeting import choose
from hub.trigger_rules import Decision, decide
from shared.clock import Clock, utcnow
from shared.errors import PayloadTooLarge
from shared.states import FINISHED, RunState, TaskState

log = logging.getLogger(__name__)

_MAX_CONF_BYTES = 64 * 1024
_WAITING = frozenset({TaskState.NONE.value, TaskState.SCHEDULED.value})
#: The columns of a task instance that deciding it needs.
_ROW = (TaskInstance.id, TaskInstance.run_pk, TaskInstance.task_id, TaskInstance.state, TaskInstance.map_index,
        TaskInstance.pool, TaskInstance.pool_slots, TaskInstance.priority_weight)


def trigger_run(
    session: Session, dag_id: str, conf: dict[str, Any], now: datetime, run_type: str = "manual", logical_date: datetime | None = None,
    *, data_interval: tuple[datetime, datetime] | None = None, backfill_id: int | None = None, triggered_by: dict[str, Any] | None = None,
) -> DagRun:
    """Create a run of ``dag_id`` with one task instance per task, in the
    caller's transaction. Raises ``DagNotFound`` or ``InvalidRequest``.
    ``data_interval`` defaults to the logical date alone (a manual run)."""
    dag = session.get(Dag, dag_id)
    if dag is None or not dag.is_active:
        raise DagNotFound(f"DAG {dag_id!r} does not exist (or its file was removed); see 'outpost dags list'")
    if not isinstance(conf, dict):
        raise InvalidRequest("conf must be a JSON object")
    if len(json.dumps(conf)) > _MAX_CONF_BYTES:
        raise InvalidRequest(f"conf is larger than {_MAX_CONF_BYTES} bytes; pass references, not data")
    params = resolve_run_params(dag.structure.get("params") or {}, conf)  # InvalidRequest names each bad param
    when = logical_date or now
    run_id = f"{run_type}__{when.isoformat(timespec='microseconds')}"
    taken = set(session.scalars(select(DagRun.run_id).where(DagRun.dag_id == dag_id, DagRun.run_id.startswith(run_id, autoescape=True))))
    if run_id in taken:
        if run_type == "scheduled":
            raise InvalidRequest(f"run {run_id!r} of {dag_id!r} already exists")
        # Two manual triggers in the same microsecond are two runs, not an error.
        run_id = next(f"{run_id}.{n}" for n in range(1, len(taken) + 2) if f"{run_id}.{n}" not in taken)
    # Queued first: it starts below, or later when max_active_runs allows.
    interval_start, interval_end = data_interval or _manual_interval(dag, when)
    run = DagRun(dag_id=dag_id, run_id=run_id, run_type=run_type, state=RunState.QUEUED, logical_date=when, conf=conf, created_at=now, queued_at=now,
                 dag_version_id=dag.latest_version_id,  # the run follows this version to its end
                 data_interval_start=interval_start, data_interval_end=interval_end, backfill_id=backfill_id, triggered_by=triggered_by,
                 params=params)
    session.add(run)
    session.flush()
    weights = effective_weights({t["task_id"]: t for t in dag.structure.get("tasks", [])})
    for task in dag.structure.get("tasks", []):
        session.add(
            TaskInstance(
                run_pk=run.id,
                dag_id=dag_id,
                run_id=run_id,
                task_id=task["task_id"],
                map_index=-1,
                kind=task["kind"],
                state=TaskState.NONE,
                try_number=0,
                max_tries=int(task.get("retries", 0)) + 1,
                retry_delay=float(task.get("retry_delay") or 0.0),
                execution_timeout=task.get("execution_timeout"),
                job_type=task.get("job_type"),
                params=task.get("params") or {},
                operator=task.get("operator") or "",
                pool=task.get("pool") or DEFAULT_POOL,
                pool_slots=int(task.get("pool_slots") or 1),
                priority_weight=weights[task["task_id"]],
            )
        )
    session.flush()
    start_queued_runs(session, now, {dag_id})
    return run


def _manual_interval(dag: Dag, when: datetime) -> tuple[datetime, datetime]:
    """Airflow's data interval for a run triggered by hand: the schedule's
    last complete interval before it (the logical date alone without one)."""
    try:
        interval = timetables.from_dict((dag.structure or {}).get("timetable")).infer_manual_data_interval(when)
    except InvalidDag:
        return when, when
    return interval.start, interval.end


def start_queued_runs(session: Session, now: datetime, dag_ids: set[str] | None = None) -> list[DagRun]:
    """Move queued runs to running, oldest logical date first, while their
    DAG runs fewer than ``max_active_runs`` (a backfill's runs count against
    the backfill's own limit instead). Runs of a paused DAG or backfill wait."""
    stmt = select(DagRun).where(DagRun.state == RunState.QUEUED)
    if dag_ids is not None:
        stmt = stmt.where(DagRun.dag_id.in_(dag_ids))
    queued = list(session.scalars(skip_locked(stmt.order_by(DagRun.logical_date, DagRun.id), session)))
    if not queued:
        return []
    involved = {r.dag_id for r in queued}
    dags = {d.dag_id: d for d in session.scalars(select(Dag).where(Dag.dag_id.in_(involved)))}
    backfill_ids = {r.backfill_id for r in queued if r.backfill_id is not None}
    backfills = {b.id: b for b in session.scalars(select(Backfill).where(Backfill.id.in_(backfill_ids)))} if backfill_ids else {}
    # A backfill with run_backwards starts its latest interval first (Airflow).
    backwards = {b.id for b in backfills.values() if b.run_backwards}
    if backwards:
        newest_first = sorted((r for r in queued if r.backfill_id in backwards), key=lambda r: (r.logical_date, r.id), reverse=True)
        slots = iter(newest_first)
        queued = [next(slots) if r.backfill_id in backwards else r for r in queued]
    running_dag: dict[str, int] = dict(
        session.execute(
            select(DagRun.dag_id, func.count()).where(DagRun.state == RunState.RUNNING, DagRun.dag_id.in_(involved), DagRun.backfill_id.is_(None)).group_by(DagRun.dag_id)
        ).all()
    )
    running_backfill: dict[int, int] = dict(
        session.execute(select(DagRun.backfill_id, func.count()).where(DagRun.state == RunState.RUNNING, DagRun.backfill_id.in_(backfill_ids)).group_by(DagRun.backfill_id)).all()
    ) if backfill_ids else {}
    started: list[DagRun] = []
    for run in queued:
        dag = dags.get(run.dag_id)
        if dag is None or dag.is_paused:
            continue
        if run.backfill_id is not None:
            backfill = backfills.get(run.backfill_id)
            if backfill is None or backfill.is_paused or running_backfill.get(run.backfill_id, 0) >= backfill.max_active_runs:
                continue
            running_backfill[run.backfill_id] = running_backfill.get(run.backfill_id, 0) + 1
        else:
            limit = int(current_dag_spec(session, run.dag_id).get("max_active_runs") or dag.max_active_runs or DEFAULT_MAX_ACTIVE_RUNS)
            if running_dag.get(run.dag_id, 0) >= limit:
                continue
            running_dag[run.dag_id] = running_dag.get(run.dag_id, 0) + 1
        run.state, run.started_at = RunState.RUNNING, now
        started.append(run)
    return started


@dataclass
class _Dirty:
    """What changed since the last pass, as the events told: finished task
    instances, and runs to evaluate whole (pk -> None)."""

    tis: set[int] = field(default_factory=set)
    #: Run pk -> ids of tasks with a finished instance there, or None: the whole run.
    runs: dict[int, set[str] | None] = field(default_factory=dict)
    #: An instance finished: it may have freed a slot others wait for.
    finished: bool = False

    def task_changed(self, run_pk: int, task_id: str) -> None:
        self.finished = True
        if run_pk not in self.runs:
            self.runs[run_pk] = {task_id}
        elif (tasks := self.runs[run_pk]) is not None:
            tasks.add(task_id)
    #: A run was triggered (it may still be queued behind max_active_runs).
    triggered: bool = False
    #: Something no run names changed: evaluate every running run.
    everything: bool = False

    def empty(self) -> bool:
        return not (self.tis or self.runs or self.triggered or self.everything)


@dataclass(frozen=True)
class _Derived:
    """What the incremental pass reads from one DAG version's structure."""

    #: Task id -> the tasks a change of its state may decide: its direct
    #: downstream and the tasks that map over its output.
    affects: dict[str, frozenset[str]]
    deciders: tuple[str, ...]
    #: Some task depends on the run before (depends_on_past): a finished
    #: instance may make a task of another run ready.
    past: bool

    @staticmethod
    def of(tasks: dict[str, dict[str, Any]]) -> _Derived:
        affects: dict[str, set[str]] = defaultdict(set)
        for task_id, task in tasks.items():
            for up in task.get("upstream", []):
                affects[up].add(task_id)
            if task.get("mapped"):
                for source in xcom_sources(task["mapped"]):
                    affects[source].add(task_id)
        return _Derived(
            {t: frozenset(a) for t, a in affects.items()}, branching.deciders(tasks),
            any(t.get("depends_on_past") or t.get("wait_for_downstream") for t in tasks.values()),
        )


@dataclass
class Scheduler:
    sessions: sessionmaker[Session]
    dagbag: SerializedDagBag
    dispatcher: Dispatcher
    clock: Clock
    events: EventBus
    #: Called with a hub task instance id after it was committed as queued.
    submit_hub_task: Callable[[int], None]
    interval: float = 0.5
    redeliver_after: float = 30.0
    agent_offline_after: float = 35.0
    #: Seconds an agent task may stay device_offline before it is re-targeted
    #: or given up, for tasks that set no offline_grace (hub.offline).
    default_offline_grace: float = 3600.0
    dag_reparse_interval: float = 5.0
    #: Most instances one mapped task may expand to (Airflow's max_map_length).
    max_map_length: int = DEFAULT_MAX_MAP_LENGTH
    #: False when DAG parsing runs in its own thread (``run_dag_processing``),
    #: so a slow DAG file never delays a scheduling pass.
    parse_in_tick: bool = True
    #: Slots of ``default_pool`` unless the pools table sets them.
    default_pool_slots: int = 128
    #: Days stored log chunks of finished tries are kept (0: forever).
    task_log_retention_days: float = 30.0
    #: Seconds between log-pruning passes while no backlog is left.
    log_prune_interval: float = 60.0
    #: When the next log-pruning pass is due (None: at the next full pass).
    _next_log_prune: datetime | None = None
    _wake: threading.Event = field(default_factory=threading.Event)
    _last_parse: float = float("-inf")
    #: A parse whose DB write failed is written again at the next interval.
    _sync_pending: bool = False
    _structure_cache: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    #: Tasks by id of each DAG version seen; versions never change.
    _version_cache: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: Events of the current step, emitted once its transaction committed.
    _after_commit: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Online agents whose last heartbeat said ``accepting: false``, as of
    #: the last redelivery pass (one that accepts again is re-sent to at once).
    _not_accepting: set[str] = field(default_factory=set)
    #: Each DAG's schedule as last seen, to notice a changed one.
    _schedule_fingerprints: dict[str, str] = field(default_factory=dict)
    #: DAGs whose schedule has no next run (until their schedule changes).
    _schedule_ended: set[str] = field(default_factory=set)
    #: Each DAG's parsed schedule, by (last_parsed_at, latest_version_id).
    _schedule_cache: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    #: What changed since the last pass (see _note): the next pass that is not
    #: full evaluates only that. Written by other threads, under _dirty_lock.
    _dirty: _Dirty = field(default_factory=lambda: _Dirty())
    _dirty_lock: threading.Lock = field(default_factory=threading.Lock)
    #: Per DAG version, what the incremental pass needs from its structure.
    _derived_cache: dict[int, _Derived] = field(default_factory=dict)
    #: Held by each step and by ``decide_after`` (the executor's thread), which
    #: share the steps' state (_after_commit). Taken before any DB lock.
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: Runs the last _advance_runs evaluated.
    _evaluated: set[int] = field(default_factory=set)
    #: What decide_after queued, for after_decided.
    _decided: tuple[list[int], bool] = ([], False)

    def __post_init__(self) -> None:
        # Only events that can make a task ready wake the scheduler; a task
        # that was merely delivered or started changes no decision.
        for name in (ev.RUN_TRIGGERED, ev.RESULT_APPLIED, ev.HUB_TASK_FINISHED, ev.AGENT_CHANGED, ev.ASSET_UPDATED):
            self.events.subscribe(name, self._note)

    def wake(self) -> None:
        """Evaluate every running run at once (not only the changed ones)."""
        with self._dirty_lock:
            self._dirty.everything = True
        self._wake.set()

    def _note(self, name: str, data: dict[str, Any]) -> None:
        """Remember what an event changed, then wake the loop. A finished task
        instance names the run and task whose downstream may now be ready; a
        triggered (or cleared) run is evaluated whole; anything else (an agent
        online, an asset event) makes the next pass evaluate every run."""
        with self._dirty_lock:
            dirty = self._dirty
            if data.get("decided"):
                return  # decide_after did it in the transaction that recorded it
            if name in (ev.HUB_TASK_FINISHED, ev.RESULT_APPLIED) and isinstance(data.get("run_pk"), int) and isinstance(data.get("task_id"), str):
                dirty.task_changed(data["run_pk"], data["task_id"])
            elif name in (ev.HUB_TASK_FINISHED, ev.RESULT_APPLIED) and isinstance(data.get("ti_id"), int):
                dirty.tis.add(data["ti_id"])
                dirty.finished = True
            elif name == ev.RUN_TRIGGERED and isinstance(data.get("run_pk"), int):
                dirty.runs[data["run_pk"]] = None
                dirty.triggered = True
            else:
                dirty.everything = True
        self._wake.set()

    def _mark(self, run_pk: int) -> None:
        """This pass changed the run in a way that can make more of its tasks
        ready (a skip, a failure, an expansion): the next pass evaluates it whole."""
        with self._dirty_lock:
            self._dirty.runs[run_pk] = None

    def _take_dirty(self) -> _Dirty:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, _Dirty()
        return dirty

    def _has_dirty(self) -> bool:
        with self._dirty_lock:
            return not self._dirty.empty()

    # --- loop drivers ------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        last_full = float("-inf")
        while not stop.is_set():
            # A wake-up by an event only advances what the event changed; the
            # full pass (every run, and the housekeeping steps: cron, retries,
            # redelivery, silent agents) runs every ``interval``, so a missed
            # event costs at most that much latency.
            full = time.monotonic() - last_full >= self.interval
            # Cleared before the changes are taken: an event after this point
            # is either in this pass or wakes the next one.
            self._wake.clear()
            dirty = self._take_dirty()
            failed = False
            try:
                self.tick(full=full, dirty=dirty)
            except Exception:
                log.exception("scheduler tick failed; retrying")
                with self._dirty_lock:
                    self._dirty.everything = True  # what this pass was to look at is not lost
                failed = True
            if full:
                last_full = time.monotonic()
            # Another pass at once only if this one left work for it (a skip
            # or failure whose downstream may now be decided, a new event);
            # a task merely queued wakes the loop when it finishes.
            if failed or not self._has_dirty():
                self._wake.wait(max(0.0, self.interval - (time.monotonic() - last_full)))

    def run_until_idle(self, max_ticks: int = 1000) -> None:
        for _ in range(max_ticks):
            if not self.tick():
                return
        raise RuntimeError(f"scheduler still busy after {max_ticks} ticks")

    @contextmanager
    def _step(self) -> Iterator[Session]:
        """One step's transaction; its events go out after the commit."""
        with self.lock:
            self._after_commit.clear()
            with transaction(self.sessions) as session:
                yield session
            events, self._after_commit = self._after_commit, []
            for name, data in events:
                self.events.emit(name, **data)

    # --- deciding right after a hub task finished (the executor's thread) ---

    def decide_after(self, session: Session, now: datetime, finished: list[tuple[int, str]]) -> set[int]:
        """Airflow's "mini scheduler": called by the executor, holding
        ``lock``, inside the transaction that records finished hub task
        instances (run pk, task id), it decides their downstream tasks and
        queues the ready ones in that same transaction, by the very rules of
        an incremental pass (trigger rules, branches, mapping, pools and
        limits, paused DAGs, depends_on_past). Returns the runs it evaluated
        (a run another scheduler holds is skipped: its own pass decides it).
        A failure rolls back only this part (a savepoint) and is raised;
        ``after_decided`` follows the commit either way."""
        self._after_commit.clear()
        self._decided = ([], False)
        dirty = _Dirty()
        for run_pk, task_id in finished:
            dirty.task_changed(run_pk, task_id)
        try:
            with session.begin_nested():
                self._decided = self._advance_runs(session, now, dirty)
        except Exception:
            self._after_commit.clear()
            self._decided = ([], False)
            raise
        return set(self._evaluated)

    def after_decided(self, committed: bool) -> None:
        """After the executor's transaction: announce and hand out what
        ``decide_after`` decided, if it was committed. Called holding ``lock``."""
        (hub_tasks, changed), self._decided = self._decided, ([], False)
        events, self._after_commit = self._after_commit, []
        if not committed:
            return
        for name, data in events:
            self.events.emit(name, **data)
        if changed:
            self.events.emit(ev.OUTBOX_WRITTEN)
        for ti_id in hub_tasks:
            self.submit_hub_task(ti_id)
        if self._has_dirty():
            self._wake.set()  # it left work for a pass (a skip to propagate, say)

    def tick(self, full: bool = True, dirty: _Dirty | None = None) -> bool:
        """One scheduling pass. Returns True if it changed anything. A pass
        that is not ``full`` only advances runs (dispatch and decisions):
        with ``dirty``, only the runs and tasks it names; a full pass
        evaluates every running run."""
        now = utcnow(self.clock)
        busy = False
        if full:
            if self.parse_in_tick:
                busy |= self.parse_dags(now)
            with self._step() as session:
                busy |= self._create_scheduled_runs(session, now)
            with self._step() as session:
                busy |= self._bring_back_retries(session, now)
            with self._step() as session:
                busy |= check_deadlines(session, now, self._after_commit, self.dispatcher.hlc)
            with self._step() as session:
                busy |= self._offline_work(session, now)
            with self._step() as session:
                busy |= rollouts.advance_all(session, now, self.dispatcher, self._after_commit)
        with self._step() as session:
            hub_tasks, changed = self._advance_runs(session, now, None if full or dirty is None or dirty.everything else dirty)
        if changed:
            self.events.emit(ev.OUTBOX_WRITTEN)  # wake the publisher before the slower steps
        for ti_id in hub_tasks:
            self.submit_hub_task(ti_id)
        busy |= changed
        if not full:
            return busy
        with self._step() as session:
            redelivered = self._redeliver(session, now)
        if redelivered:
            self.events.emit(ev.OUTBOX_WRITTEN)
        with self._step() as session:
            self._mark_silent_agents(session, now)
        self._prune_logs(now)
        return busy or redelivered

    # --- steps -------------------------------------------------------------

    def parse_dags(self, now: datetime, force: bool = False) -> bool:
        """Parse changed DAG files (in another process) and record the result.
        A failed round is logged and retried at the next interval; the DAGs
        already known keep working meanwhile."""
        moment = now.timestamp()
        if not force and moment - self._last_parse < self.dag_reparse_interval:
            return False
        self._last_parse = moment
        try:
            changed = self.dagbag.collect()
            if not changed and not force and not self._sync_pending:
                return False
            self._sync_pending = True
            with transaction(self.sessions) as session:
                self.dagbag.sync_to_db(session, now)
            self._sync_pending = False
        except Exception:
            log.exception("DAG processing failed; retrying in %s s", self.dag_reparse_interval)
            return False
        return True

    def run_dag_processing(self, stop: threading.Event) -> None:
        """The DAG processing loop, for a thread of its own."""
        while not stop.wait(self.dag_reparse_interval):
            self._last_parse = float("-inf")  # this loop keeps the interval itself
            self.parse_dags(utcnow(self.clock))

    def _create_scheduled_runs(self, session: Session, now: datetime) -> bool:
        """Create the runs that are due: each time-based DAG's next data
        interval once it is over (its ``run_after``), one after another when
        catching up, while the DAG has fewer than ``max_active_runs`` active
        (queued or running) non-backfill runs; Airflow likewise stops
        creating there and goes on as runs finish. Then the runs of DAGs
        whose asset condition holds, and the bookkeeping of backfills."""
        created = False
        # The structure (all the tasks' JSON) is loaded only when the DAG was
        # reparsed, not on every pass (see _schedule_of).
        stmt = skip_locked(
            select(Dag).options(defer(Dag.structure)).where(Dag.schedule.is_not(None), Dag.is_active.is_(True), Dag.is_paused.is_(False)), session
        )
        dags = list(session.scalars(stmt))
        active = dict(
            session.execute(
                select(DagRun.dag_id, func.count())
                .where(DagRun.dag_id.in_([d.dag_id for d in dags]), DagRun.state.in_([RunState.QUEUED, RunState.RUNNING]), DagRun.backfill_id.is_(None))
                .group_by(DagRun.dag_id)
            ).all()
        ) if dags else {}
        for dag in dags:
            try:
                created |= self._schedule_dag(session, dag, now, active.get(dag.dag_id, 0))
            except InvalidDag as exc:  # a structure stored by another version of the hub
                log.warning("DAG %s: cannot schedule: %s", dag.dag_id, exc)
        created |= self._create_asset_triggered_runs(session, now)
        created |= self._complete_backfills(session, now)
        return created

    def _schedule_of(self, session: Session, dag: Dag) -> tuple[timetables.Timetable, datetime | None, datetime | None, bool, int | None, str]:
        """The DAG's timetable, start and end dates, catchup, max_active_runs
        and a fingerprint of them, read from its structure once per parse."""
        stamp = (dag.last_parsed_at, dag.latest_version_id)
        cached = self._schedule_cache.get(dag.dag_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        structure = session.scalar(select(Dag.structure).where(Dag.dag_id == dag.dag_id)) or {}
        timetable, start_date, end_date, catchup = timetables.structure_schedule(structure)
        fingerprint = json.dumps([structure.get(k) for k in ("timetable", "start_date", "end_date", "catchup")], sort_keys=True)
        limit = structure.get("max_active_runs")
        schedule = (timetable, start_date, end_date, catchup, int(limit) if limit else None, fingerprint)
        self._schedule_cache[dag.dag_id] = (stamp, schedule)
        return schedule

    def _schedule_dag(self, session: Session, dag: Dag, now: datetime, active: int) -> bool:
        timetable, start_date, end_date, catchup, limit_in_file, fingerprint = self._schedule_of(session, dag)
        # A DAG whose schedule changed since its next run was computed gets a
        # new one (the DAG processor resets next_run_at too, when it can tell).
        if self._schedule_fingerprints.get(dag.dag_id, fingerprint) != fingerprint:
            dag.next_run_at = None
            self._schedule_ended.discard(dag.dag_id)
        self._schedule_fingerprints[dag.dag_id] = fingerprint
        limit = int(limit_in_file or dag.max_active_runs or DEFAULT_MAX_ACTIVE_RUNS)
        if dag.max_active_runs != limit:
            dag.max_active_runs = limit
        if not timetable.periodic and timetable.kind != "once":
            if dag.next_run_at is not None:
                dag.next_run_at = dag.next_data_interval_start = dag.next_data_interval_end = None
            return False
        # Recomputed when unknown, and without catchup whenever due: computed
        # before a pause or a downtime, it may no longer be the latest
        # complete interval, the only one that runs without catchup.
        if dag.next_run_at is None and dag.dag_id in self._schedule_ended:
            return False  # @once done, or past end_date: nothing to compute every tick
        stale = dag.next_data_interval_start is None or dag.next_data_interval_end is None  # e.g. set by a hub before data intervals
        if dag.next_run_at is None or stale or (not catchup and dag.next_run_at <= now):
            last = self._last_automated_interval(session, dag.dag_id)
            # Without a start date, the schedule starts when the hub first sees
            # it (Airflow would run the latest complete interval at once).
            first = start_date if start_date is not None or last is not None else (dag.next_data_interval_start or now)
            self._store_next(dag, timetable.next_dagrun_info(last, now, catchup, first, end_date))
        created = False
        while dag.next_run_at is not None and dag.next_data_interval_start is not None and dag.next_data_interval_end is not None \
                and dag.next_run_at <= now and active < limit:
            interval = timetables.DataInterval(dag.next_data_interval_start, dag.next_data_interval_end)
            exists = session.scalar(
                select(DagRun.id).where(DagRun.dag_id == dag.dag_id, DagRun.run_type == "scheduled", DagRun.logical_date == interval.start).limit(1)
            )
            if exists is None:
                run = trigger_run(session, dag.dag_id, {}, now, run_type="scheduled", logical_date=interval.start, data_interval=(interval.start, interval.end))
                self._after_commit.append((ev.RUN_TRIGGERED, {"dag_id": dag.dag_id, "run_pk": run.id}))
                active += 1
                created = True
            self._store_next(dag, timetable.next_dagrun_info(interval, now, catchup, start_date, end_date))
        if dag.next_run_at is None:
            self._schedule_ended.add(dag.dag_id)
        return created

    @staticmethod
    def _store_next(dag: Dag, info: timetables.DagRunInfo | None) -> None:
        if info is None:
            dag.next_run_at = dag.next_data_interval_start = dag.next_data_interval_end = None
        else:
            dag.next_run_at = info.run_after
            dag.next_data_interval_start, dag.next_data_interval_end = info.data_interval.start, info.data_interval.end

    @staticmethod
    def _last_automated_interval(session: Session, dag_id: str) -> timetables.DataInterval | None:
        row = session.execute(
            select(DagRun.logical_date, DagRun.data_interval_start, DagRun.data_interval_end)
            .where(DagRun.dag_id == dag_id, DagRun.run_type == "scheduled")
            .order_by(DagRun.logical_date.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return timetables.DataInterval(row.data_interval_start or row.logical_date, row.data_interval_end or row.logical_date)

    def _create_asset_triggered_runs(self, session: Session, now: datetime) -> bool:
        """Runs of DAGs whose asset condition holds (hub.asset_events)."""
        created = False
        for due in asset_events.due_asset_triggers(session):
            run = trigger_run(
                session, due.dag_id, {}, now, run_type=asset_events.ASSET_TRIGGERED, logical_date=now,
                data_interval=(due.first, due.last), triggered_by={"asset_event_ids": due.event_ids},
            )
            asset_events.consumed(session, due.dag_id)
            self._after_commit.append((ev.RUN_TRIGGERED, {"dag_id": due.dag_id, "run_pk": run.id}))
            created = True
        return created

    @staticmethod
    def _complete_backfills(session: Session, now: datetime) -> bool:
        """A backfill is complete once none of its runs is queued or running."""
        open_ids = list(session.scalars(select(Backfill.id).where(Backfill.completed_at.is_(None))))
        if not open_ids:
            return False
        busy = set(session.scalars(select(DagRun.backfill_id).where(DagRun.backfill_id.in_(open_ids), DagRun.state.in_([RunState.QUEUED, RunState.RUNNING])).distinct()))
        done = [b for b in open_ids if b not in busy]
        if done:
            session.execute(update(Backfill).where(Backfill.id.in_(done), Backfill.completed_at.is_(None)).values(completed_at=now))
        return False  # bookkeeping only: nothing for the next tick to do

    def _bring_back_retries(self, session: Session, now: datetime) -> bool:
        waiting = (TaskState.UP_FOR_RETRY, TaskState.UP_FOR_RESCHEDULE)
        stmt = skip_locked(select(TaskInstance).where(TaskInstance.state.in_(waiting), TaskInstance.next_try_at <= now), session)
        due = list(session.scalars(stmt))
        for ti in due:
            if ti.state == TaskState.UP_FOR_RESCHEDULE:
                # next_try_at stays set: it tells the queueing step that this
                # is the same try (a sensor's next poke), not a new one.
                ti.state = TaskState.SCHEDULED
                continue
            ti.state = TaskState.SCHEDULED
            ti.next_try_at = None
            ti.sensor_started_at = None  # a new try of a sensor counts its timeout afresh
        return bool(due)

    def _advance_runs(self, session: Session, now: datetime, dirty: _Dirty | None = None) -> tuple[list[int], bool]:
        """Decide the waiting task instances of running runs and start the
        ready ones. Without ``dirty``, every instance of every running run;
        with it, only the tasks that the changes it names may decide (the
        downstream of each finished instance), reading only their rows and
        their upstreams' rows; a run it names whole is evaluated whole."""
        self._evaluated = set()
        started = start_queued_runs(session, now) if dirty is None or dirty.triggered else []
        changed = bool(started)
        # Each run with its DAG's paused flag, in one query: the runs of a
        # paused DAG start no new task instances (Airflow).
        running = select(DagRun, Dag.is_paused).outerjoin(Dag, Dag.dag_id == DagRun.dag_id).where(DagRun.state == RunState.RUNNING)
        scope: dict[int, set[str] | None] = {}
        stmt = running
        if dirty is not None:
            found = self._scope(session, dirty)
            if found is None:
                dirty = None
            else:
                scope = found
                scope.update((run.id, None) for run in started)
                if not scope:
                    self._evaluated = set()
                    return [], changed
                stmt = running.where(DagRun.id.in_(scope))
        rows = self._locked_runs(session, stmt)
        if dirty is not None and any(
            scope.get(run.id) is not None and run.dag_version_id is not None and self._derived(run.dag_version_id, self._version_tasks(session, run.dag_version_id)).past
            for run, _ in rows
        ):
            # A finished instance may make a task of the next run ready
            # (depends_on_past): every running run is evaluated.
            dirty = None
            rows += self._locked_runs(session, running.where(DagRun.id.not_in([run.id for run, _ in rows])))
        runs = [run for run, _ in rows]
        paused = {run.dag_id for run, is_paused in rows if is_paused}
        self._evaluated = {run.id for run in runs}
        if not runs:
            return [], changed
        structures = self._structures(session, runs)
        states_by_run: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        # (task id, map index) -> state: tasks of a mapped task group depend index by index.
        index_states_by_run: dict[int, dict[tuple[str, int], str]] = defaultdict(dict)
        waiting_by_run: dict[int, list[Any]] = defaultdict(list)
        # Runs evaluated in part: run pk -> the tasks that may be decided.
        partial: dict[int, set[str]] = {}
        whole: list[int] = []
        for run in runs:
            changed_tasks = scope.get(run.id) if dirty is not None else None
            if changed_tasks is None or run.dag_version_id is None:
                whole.append(run.id)
                continue
            derived = self._derived(run.dag_version_id, structures[run.id])
            candidates = {t for changed_task in changed_tasks for t in derived.affects.get(changed_task, ())}
            if not candidates:
                partial[run.id] = candidates
                continue
            tasks = structures[run.id]
            needed = set(candidates) | set(derived.deciders)
            for task_id in candidates:
                task = tasks.get(task_id) or {}
                needed.update(task.get("upstream", []))
                if task.get("mapped"):
                    needed.update(xcom_sources(task["mapped"]))
            rows = list(session.execute(
                select(*_ROW).where(TaskInstance.run_pk == run.id, TaskInstance.task_id.in_(needed) | (TaskInstance.state == TaskState.SCHEDULED))
            ))
            if any(row.state == TaskState.SCHEDULED and row.task_id not in needed for row in rows):
                # Tasks of this run wait for a slot: a finished instance may
                # have freed one, so they are decided (and admitted) again.
                whole.append(run.id)
                continue
            partial[run.id] = candidates
            self._collect(rows, states_by_run, index_states_by_run, waiting_by_run, candidates)
        if whole:
            # States of every task instance as plain rows: cheap even for runs of
            # thousands of tasks. Only instances that are ready become ORM objects.
            self._collect(session.execute(select(*_ROW).where(TaskInstance.run_pk.in_(whole))), states_by_run, index_states_by_run, waiting_by_run, None)
        hub_tasks: list[int] = []
        ready: list[tuple[Candidate, DagRun]] = []
        past_ok = _PastChecker(session)
        # A trigger rule's answer depends only on the upstream states: the
        # many tasks of a wide run that share their upstreams ask it once.
        decisions: dict[tuple[str, tuple[str, ...]], Decision] = {}

        def decide_once(rule: str, upstream: list[str]) -> Decision:
            key = (rule, tuple(upstream))
            found = decisions.get(key)
            if found is None:
                found = decisions[key] = decide(rule, upstream)
            return found

        for run in runs:
            tasks = structures.get(run.id, {})
            by_task = states_by_run[run.id]
            skips = self._branch_skips(session, run.id, tasks, by_task) if waiting_by_run[run.id] else set()
            index_states = index_states_by_run[run.id]
            if self._expand_mapped(session, run.id, tasks, by_task, index_states, waiting_by_run[run.id], skips, now):
                changed = True
                self._mark(run.id)
            for row in sorted(waiting_by_run[run.id], key=lambda r: (r.task_id, r.id)):
                task = tasks.get(row.task_id)
                if task is not None:
                    upstream = self._upstream_states(task, tasks, by_task, index_states, row.map_index)
                    # A branch or short-circuit skips before any trigger rule is asked (Airflow).
                    decision = Decision.SKIP if row.task_id in skips else decide_once(task.get("trigger_rule", "all_success"), upstream)
                    if decision == Decision.WAIT:
                        continue
                    if decision == Decision.RUN:
                        if run.dag_id in paused or (task.get("depends_on_past") and not past_ok(run, row.task_id, tasks if task.get("wait_for_downstream") else None)):
                            continue
                        ready.append((Candidate(row.id, run.dag_id, row.pool, row.pool_slots, row.priority_weight, run.logical_date, run.id, row.task_id, row.map_index, row.state,
                                                task.get("max_active_tis_per_dag"), task.get("max_active_tis_per_dagrun")), run))
                        continue
                ti = session.get(TaskInstance, row.id)
                assert ti is not None
                before = ti.state
                if task is None:
                    ti.state = TaskState.REMOVED
                else:
                    ti.state, ti.ended_at = TaskState(decision.value), now
                if ti.state != before:
                    changed = True
                    self._mark(run.id)  # its downstream may be decided now
                self._replace_state(by_task[row.task_id], before, ti.state)
                index_states[(row.task_id, ti.map_index)] = ti.state
        if ready:
            hub_tasks, admitted = self._admit(session, ready, structures, states_by_run, now)
            changed |= admitted
        finished = set()
        for run in runs:
            by_task = states_by_run[run.id]
            if run.id in partial:
                # Only part of the run was read. It can be over only if
                # nothing read is unfinished and no other instance is either.
                if any(state not in FINISHED for states in by_task.values() for state in states):
                    continue
                session.flush()
                if session.scalar(select(TaskInstance.id).where(TaskInstance.run_pk == run.id, TaskInstance.state.not_in([str(s) for s in FINISHED])).limit(1)) is not None:
                    continue
                by_task = defaultdict(list)
                for task_id, state in session.execute(select(TaskInstance.task_id, TaskInstance.state).where(TaskInstance.run_pk == run.id)):
                    by_task[task_id].append(state)
            if self._finish_run_if_done(session, run, by_task, structures.get(run.id, {}), now):
                finished.add(run.dag_id)
        if finished:
            # A finished run makes room under max_active_runs at once.
            for started_run in start_queued_runs(session, now, finished):
                self._mark(started_run.id)
        return hub_tasks, changed or bool(finished)

    @staticmethod
    def _locked_runs(session: Session, stmt: Any) -> list[tuple[DagRun, bool | None]]:
        """The rows of ``stmt`` (runs with their DAG's paused flag), each run
        locked for this transaction; runs another scheduler holds are skipped
        (PostgreSQL; see hub.db.skip_locked)."""
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True, of=DagRun)
        return [(run, bool(is_paused)) for run, is_paused in session.execute(stmt)]

    def _scope(self, session: Session, dirty: _Dirty) -> dict[int, set[str] | None] | None:
        """The runs (and within each, the tasks whose instances changed, or
        None for the whole run) that the changes in ``dirty`` may advance;
        None when every running run must be evaluated."""
        scope = _Dirty(runs={pk: None if tasks is None else set(tasks) for pk, tasks in dirty.runs.items()})
        if dirty.tis:
            for run_pk, task_id in session.execute(select(TaskInstance.run_pk, TaskInstance.task_id).where(TaskInstance.id.in_(dirty.tis))):
                scope.task_changed(run_pk, task_id)
        if dirty.finished:
            # A finished instance frees a pool slot and a place under its DAG's
            # max_active_tasks: instances waiting for one, in any run, are admitted again.
            for run_pk in session.scalars(select(TaskInstance.run_pk).where(TaskInstance.state == TaskState.SCHEDULED).distinct()):
                scope.runs[run_pk] = None
        return scope.runs

    @staticmethod
    def _collect(
        rows: Any, states_by_run: dict[int, dict[str, list[str]]], index_states_by_run: dict[int, dict[tuple[str, int], str]],
        waiting_by_run: dict[int, list[Any]], candidates: set[str] | None,
    ) -> None:
        for row in rows:
            states_by_run[row.run_pk][row.task_id].append(row.state)
            index_states_by_run[row.run_pk][(row.task_id, row.map_index)] = row.state
            if row.state in _WAITING and (candidates is None or row.task_id in candidates):
                waiting_by_run[row.run_pk].append(row)

    def _derived(self, version_id: int, tasks: dict[str, dict[str, Any]]) -> _Derived:
        derived = self._derived_cache.get(version_id)
        if derived is None:
            derived = self._derived_cache[version_id] = _Derived.of(tasks)
        return derived

    def _version_tasks(self, session: Session, version_id: int) -> dict[str, dict[str, Any]]:
        tasks = self._version_cache.get(version_id)
        if tasks is None:
            structure = session.scalar(select(DagVersion.structure).where(DagVersion.id == version_id)) or {}
            tasks = self._version_cache[version_id] = {t["task_id"]: t for t in structure.get("tasks", [])}
        return tasks

    @staticmethod
    def _branch_skips(session: Session, run_pk: int, tasks: dict[str, dict[str, Any]], by_task: dict[str, list[str]]) -> set[str]:
        """Tasks of the run skipped by its successful branch and
        short-circuit tasks, decided by their output (``hub.branching``)."""
        done = [t for t in branching.deciders(tasks) if TaskState.SUCCESS in by_task.get(t, ())]
        if not done:
            return set()
        outputs = session.execute(
            select(TaskInstance.task_id, TaskInstance.output)
            .where(TaskInstance.run_pk == run_pk, TaskInstance.task_id.in_(done), TaskInstance.map_index == -1, TaskInstance.state == TaskState.SUCCESS)
        )
        return {skipped for task_id, output in outputs for skipped in branching.skipped_by(tasks, task_id, output)}

    def _admit(
        self, session: Session, ready: list[tuple[Candidate, DagRun]], structures: dict[int, dict[str, dict[str, Any]]],
        states_by_run: dict[int, dict[str, list[str]]], now: datetime,
    ) -> tuple[list[int], bool]:
        """Start ready instances by priority within pool slots and each DAG's
        max_active_tasks (``hub.admission``); the rest wait as ``scheduled``."""
        admission = self._admission(session, [c for c, _ in ready])
        runs = {c.ti_id: run for c, run in ready}
        fleet = None
        hub_tasks: list[int] = []
        changed = False
        to_wait: list[int] = []
        for candidate in ordered(c for c, _ in ready):
            run = runs[candidate.ti_id]
            by_task = states_by_run[run.id]
            verdict = admission.verdict(candidate)
            if verdict in (Verdict.POOL_FULL, Verdict.DAG_FULL, Verdict.TASK_FULL):
                # Its dependencies are met; it waits for a slot. One UPDATE for
                # all of them, not an object each (a wide DAG has thousands).
                if candidate.state != TaskState.SCHEDULED:
                    to_wait.append(candidate.ti_id)
                    self._replace_state(by_task[candidate.task_id], candidate.state, TaskState.SCHEDULED)
                continue
            if verdict != Verdict.UNKNOWN_POOL and structures[run.id][candidate.task_id].get("kind") == "hub":
                # Queued with one UPDATE for all of them below, without loading
                # each instance as an object (see _queue_hub_tasks).
                hub_tasks.append(candidate.ti_id)
                admission.charge(candidate)
                changed = True
                self._replace_state(by_task[candidate.task_id], candidate.state, TaskState.QUEUED)
                continue
            ti = session.get(TaskInstance, candidate.ti_id)
            assert ti is not None
            before = ti.state
            if verdict == Verdict.UNKNOWN_POOL:
                ti.state, ti.ended_at = TaskState.FAILED, now
                ti.error = {"code": "unknown_pool", "message": f"pool {candidate.pool!r} does not exist; create it with 'outpost pools set {candidate.pool} SLOTS' or change the task's pool", "retryable": False}
                if task_callback(session, ti, TaskState.FAILED, now):
                    self._after_commit.append((ev.CALLBACKS_REQUESTED, {"dag_id": ti.dag_id, "run_pk": ti.run_pk}))
            elif ti.kind == "hub":
                if ti.next_try_at is None:
                    ti.try_number += 1
                # else a rescheduled sensor pokes again within the same try
                ti.next_try_at = None
                ti.state, ti.queued_at = TaskState.QUEUED, now
                hub_tasks.append(ti.id)
                admission.charge(candidate)
            else:
                if fleet is None:
                    fleet = self.dispatcher.fleet_snapshot(session)
                queued = self._dispatch_agent_task(session, ti, structures[run.id][ti.task_id], fleet, by_task, now)
                if queued:
                    admission.charge(candidate, queued)
                elif ti.state == TaskState.FAILED and task_callback(session, ti, TaskState.FAILED, now):
                    # Failed before it was sent (a template or size error): still its failure.
                    self._after_commit.append((ev.CALLBACKS_REQUESTED, {"dag_id": ti.dag_id, "run_pk": ti.run_pk}))
            changed |= ti.state != before
            if ti.state in FINISHED:
                self._mark(run.id)  # failed or skipped before it started: its downstream may be decided
            self._replace_state(by_task[ti.task_id], before, ti.state)
        if to_wait:
            session.execute(
                update(TaskInstance).where(TaskInstance.id.in_(to_wait), TaskInstance.state == TaskState.NONE).values(state=TaskState.SCHEDULED),
                execution_options={"synchronize_session": False},
            )
        if hub_tasks:
            self._queue_hub_tasks(session, hub_tasks, now)
        return hub_tasks, changed or bool(to_wait)

    @staticmethod
    def _queue_hub_tasks(session: Session, ti_ids: list[int], now: datetime) -> None:
        """Queue ready hub task instances for the executor: a new try each,
        except a rescheduled sensor's next poke (next_try_at set), which is
        the same try."""
        session.flush()  # changes made to any of them as objects go first
        session.execute(
            update(TaskInstance).where(TaskInstance.id.in_(ti_ids)).values(
                try_number=case((TaskInstance.next_try_at.is_(None), TaskInstance.try_number + 1), else_=TaskInstance.try_number),
                next_try_at=None, state=TaskState.QUEUED, queued_at=now,
            ),
            execution_options={"synchronize_session": False},
        )
        # An instance already loaded in this pass (expanded, say) is read again if used.
        for ti_id in ti_ids:
            loaded = session.identity_map.get(session.identity_key(TaskInstance, ti_id))  # type: ignore[arg-type]
            if loaded is not None:
                session.expire(loaded)

    def _admission(self, session: Session, candidates: list[Candidate]) -> Admission:
        """Open capacity now: pool sizes, slots held, each DAG's limit and load,
        and the load of tasks with a per-task limit."""
        dag_ids = {c.dag_id for c in candidates}
        sizes = {DEFAULT_POOL: self.default_pool_slots}
        sizes.update({name: slots for name, slots in session.execute(select(Pool.name, Pool.slots))})
        admission = Admission(sizes, {d: int(current_dag_spec(session, d).get("max_active_tasks") or DEFAULT_MAX_ACTIVE_TASKS) for d in dag_ids})
        held = session.execute(
            select(TaskInstance.dag_id, TaskInstance.pool, func.count(), func.coalesce(func.sum(TaskInstance.pool_slots), 0))
            .where(TaskInstance.state.in_([str(s) for s in OCCUPYING]))
            .group_by(TaskInstance.dag_id, TaskInstance.pool)
        )
        for dag_id, pool, count, slots in held:
            admission.pool_used[pool] += int(slots)
            admission.dag_used[dag_id] += int(count)
        limited = {(c.dag_id, c.task_id) for c in candidates if c.max_per_dag is not None or c.max_per_run is not None}
        if limited:
            per_task = session.execute(
                select(TaskInstance.dag_id, TaskInstance.task_id, TaskInstance.run_pk, func.count())
                .where(TaskInstance.state.in_([str(s) for s in OCCUPYING]), TaskInstance.dag_id.in_({d for d, _ in limited}),
                       TaskInstance.task_id.in_({t for _, t in limited}))
                .group_by(TaskInstance.dag_id, TaskInstance.task_id, TaskInstance.run_pk)
            )
            for dag_id, task_id, run_pk, count in per_task:
                admission.task_used[(dag_id, task_id)] += int(count)
                admission.run_task_used[(run_pk, task_id)] += int(count)
        return admission

    def _structures(self, session: Session, runs: list[DagRun]) -> dict[int, dict[str, dict[str, Any]]]:
        """Each run's tasks by id (keyed by run pk), from the DAG version the
        run started with, so a changed file never changes a running run.
        Versions are immutable, so each is parsed from JSON once and cached
        for good (the JSON is most of a tick's cost for a large DAG)."""
        wanted = {r.dag_version_id for r in runs if r.dag_version_id is not None} - self._version_cache.keys()
        if wanted:
            for version_id, structure in session.execute(select(DagVersion.id, DagVersion.structure).where(DagVersion.id.in_(wanted))):
                self._version_cache[version_id] = {t["task_id"]: t for t in structure.get("tasks", [])}
        unversioned = {r.dag_id for r in runs if r.dag_version_id is None}
        legacy = self._legacy_structures(session, unversioned) if unversioned else {}
        return {
            r.id: self._version_cache.get(r.dag_version_id, {}) if r.dag_version_id is not None else legacy.get(r.dag_id, {})
            for r in runs
        }

    def _legacy_structures(self, session: Session, dag_ids: set[str]) -> dict[str, dict[str, Any]]:
        """Runs from before DAG versions follow the DAG's current structure,
        parsed once per parse of the DAG."""
        stamps = dict(session.execute(select(Dag.dag_id, Dag.last_parsed_at).where(Dag.dag_id.in_(dag_ids))).all())
        stale = [d for d, stamp in stamps.items() if self._structure_cache.get(d, (None, None))[0] != stamp]
        if stale:
            for dag_id, stamp, structure in session.execute(select(Dag.dag_id, Dag.last_parsed_at, Dag.structure).where(Dag.dag_id.in_(stale))):
                self._structure_cache[dag_id] = (stamp, {t["task_id"]: t for t in structure.get("tasks", [])})
        return {d: self._structure_cache[d][1] for d in stamps}

    # --- dynamic task mapping (hub/mapping.py) ------------------------------

    def _expand_mapped(
        self, session: Session, run_pk: int, tasks: dict[str, Any], by_task: dict[str, list[str]],
        index_states: dict[tuple[str, int], str], waiting: list[Any], skips: set[str], now: datetime,
    ) -> bool:
        """Replace the single instance (map index -1) of each mapped task that
        may run by one instance per mapped value (0..n-1), each with its own
        argument values in ``params``; the new instances join ``waiting`` and
        are decided in this same pass. Zero values skip the task (Airflow);
        an unusable upstream output or too many values fail it. A mapped task
        cleared as a whole (every instance back to none) is expanded again,
        as Airflow revises map indexes: its upstream may now give another
        number of values; surplus instances become ``removed``."""
        changed = False
        for item in list(waiting):
            ti_id, task_id, map_index = item.id, item.task_id, item.map_index
            task = tasks.get(task_id)
            mapped = task.get("mapped") if task is not None else None
            if not mapped or map_index > 0 or task_id in skips:
                continue
            if map_index == 0 and any(s != TaskState.NONE for s in by_task[task_id]):
                continue  # expanded and under way
            upstream = [state for up in task.get("upstream", []) for state in by_task.get(up, [])]
            decision = decide(task.get("trigger_rule", "all_success"), upstream)
            if decision in (Decision.SKIP, Decision.UPSTREAM_FAILED):
                continue  # decided below like any task
            if not all(by_task.get(s) and all(x in FINISHED for x in by_task[s]) for s in xcom_sources(mapped)):
                # Airflow's MappedTaskUpstreamDep: whatever the trigger rule, the
                # values to map over must exist first; until then nothing of
                # this task is decided (an "always" task must not start unmapped).
                waiting[:] = [w for w in waiting if w.task_id != task_id]
                continue
            if decision == Decision.WAIT and mapped.get("group") is None:
                # A task of a mapped group expands as soon as its length is
                # known: its instance i then waits only for instance i of its
                # upstreams in the group, not for the whole group.
                continue
            ti = session.get(TaskInstance, ti_id)
            assert ti is not None
            if map_index == 0 and ti.try_number == 0:
                continue  # expanded earlier and not started yet (a paused DAG, say), not cleared
            existing = [ti] if map_index < 0 else list(
                session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run_pk, TaskInstance.task_id == task_id).order_by(TaskInstance.map_index))
            )
            failure: MappingFailure | None = None
            try:
                values = resolve_expansion(mapped, mapping_input_fetcher(session, run_pk), self.max_map_length)
                params = [agent_params(task, v) if ti.kind == "agent" else v for v in values]
            except MappingFailure as exc:
                failure, params = exc, []
                if exc.source is not None and by_task.get(exc.source) and all(s == TaskState.SKIPPED for s in by_task[exc.source]):
                    exc.state = TaskState.SKIPPED  # Airflow: a skipped mapped-over upstream skips the mapped task
            changed = True
            instances = self._apply_expansion(session, task, existing, params, failure, now)
            # The task's instances are listed again, as rows shaped like the caller's.
            waiting[:] = [w for w in waiting if w.task_id != task_id]
            for instance in existing:
                index_states.pop((task_id, instance.map_index), None)
            states = by_task[task_id]
            states.clear()
            entry = namedtuple("entry", item._fields)  # type: ignore[misc]
            for instance in instances:
                states.append(instance.state)
                index_states[(task_id, instance.map_index)] = instance.state
                if instance.state == TaskState.NONE:
                    fields = {"id": instance.id, "map_index": instance.map_index, "state": instance.state}
                    waiting.append(entry(**{**item._asdict(), **{k: v for k, v in fields.items() if k in item._fields}}))
        return changed

    @staticmethod
    def _apply_expansion(
        session: Session, task: dict[str, Any], existing: list[TaskInstance], params: list[dict[str, Any]], failure: MappingFailure | None, now: datetime,
    ) -> list[TaskInstance]:
        """Give ``existing`` (the -1 instance, or a cleared task's instances)
        one instance per entry of ``params``; returns every instance."""
        first = existing[0]
        if failure is not None or not params:
            first.map_index = -1  # like a task that never expanded
            if failure is not None:
                first.state, first.error = failure.state, failure.as_error()
            else:
                first.state = TaskState.SKIPPED
                first.error = {"code": "empty_mapping", "message": "the mapped task has zero values to map over", "retryable": False}
            first.ended_at = now
            for surplus in existing[1:]:
                surplus.state, surplus.ended_at = TaskState.REMOVED, now
            session.flush()
            return existing
        for index, (instance, value) in enumerate(zip(existing, params)):
            instance.map_index, instance.params, instance.rendered_fields = index, value, None
        for surplus in existing[len(params):]:
            surplus.state, surplus.ended_at = TaskState.REMOVED, now
        fresh = {"state": TaskState.NONE, "try_number": 0, "max_tries": int(task.get("retries", 0)) + 1, "agent_id": None, "output": None, "error": None,
                 "queued_at": None, "started_at": None, "ended_at": None, "next_try_at": None, "rendered_fields": None, "sensor_started_at": None,
                 "pid": None, "note": None, "offline_since": None, "offline_until": None}
        copied = [c.key for c in TaskInstance.__table__.columns if c.key not in ("id", "map_index", "params", *fresh)]
        instances = list(existing)
        for index, value in enumerate(params[len(existing):], start=len(existing)):
            clone = TaskInstance(**{c: getattr(first, c) for c in copied}, **fresh, map_index=index, params=value)
            session.add(clone)
            instances.append(clone)
        session.flush()
        return instances

    @staticmethod
    def _upstream_states(
        task: dict[str, Any], tasks: dict[str, Any], by_task: dict[str, list[str]], index_states: dict[tuple[str, int], str], map_index: int
    ) -> list[str]:
        """The states a task's trigger rule counts: every instance of each
        upstream, except that instance i of a mapped group's task counts only
        instance i of its upstreams in the same group (Airflow 2.5+)."""
        group = (task.get("mapped") or {}).get("group")
        if group is None or map_index < 0:
            return [state for up in task.get("upstream", []) for state in by_task.get(up, [])]
        states: list[str] = []
        for up in task.get("upstream", []):
            if ((tasks.get(up) or {}).get("mapped") or {}).get("group") == group:
                state = index_states.get((up, map_index), index_states.get((up, -1)))
                states.extend([state] if state is not None else [])
            else:
                states.extend(by_task.get(up, []))
        return states

    # --- end of dynamic task mapping ----------------------------------------

    @staticmethod
    def _replace_state(states: list[str], old: str, new: str) -> None:
        states[states.index(old)] = new

    def _dispatch_agent_task(self, session: Session, ti: TaskInstance, task: dict[str, Any], fleet: list[Any], by_task: dict[str, list[str]], now: datetime) -> int:
        """Assign ``ti`` (and, for a fleet fan-out, its copies) to agents;
        returns how many instances were queued."""
        target = task.get("target") or {"mode": "any"}
        mode = target.get("mode", "any")
        # A fleet task with a rollout policy hands its devices to hub.rollouts (below);
        # a device's retry goes to its device, a cleared device rejoins the rollout.
        rollout = mode == "all" and bool(task.get("rollout"))
        if rollout and ti.map_index >= 0:
            if rollouts.rejoin(session, ti, now, self._after_commit):
                return 0
            rollout = False
        if ti.agent_id is not None and (mode != "any" or (ti.map_index >= 0 and not task.get("mapped"))):
            agents = [ti.agent_id]  # a retry of a pinned or fanned-out instance stays on its device
        else:
            agents = choose(mode, ti.job_type or "", rollouts.select_fleet(target, fleet) if mode == "all" else fleet, agent_id=target.get("agent_id"), labels=target.get("labels") or {})
        revoked = [a for a in agents if a in {v.agent_id for v in fleet if v.revoked}]
        if revoked:
            # Work pinned to a revoked device (on_agent, or a retry of one device's
            # instance) can never run there; it fails rather than waiting forever.
            ti.state, ti.ended_at = TaskState.FAILED, now
            ti.error = {"code": "agent_revoked", "message": f"agent {revoked[0]!r} is revoked; reinstate it or target another agent", "retryable": False}
            return 0
        if not agents and not rollout:
            if mode == "all":
                ti.state = TaskState.SKIPPED  # Airflow: a zero-length mapped task is skipped
                ti.ended_at = now
                ti.error = {"code": "no_matching_agents", "message": "no online agent matched the target", "retryable": False}
            else:
                ti.state = TaskState.SCHEDULED  # waits for a matching agent to come online
            return 0
        if not task.get("mapped") and templating.has_templates((task.get("templates") or {}).get("params")):
            # Templated params (Jinja, XComArgs) are rendered for each try, from the structure.
            try:
                ti.params = render_agent_task(session, ti, task, native=bool(task.get("render_native")))
            except templating.TemplateError as exc:
                ti.state, ti.ended_at, ti.error = TaskState.FAILED, now, exc.as_error()
                return 0
            ti.rendered_fields = {"params": ti.params}
        elif task.get("mapped") and (xcom_sources(task["mapped"]) or templating.has_templates(ti.params)):
            # A mapped instance's own params (a mapped value with Jinja, say) are
            # rendered for each try; ti.params keeps them unrendered for the next
            # try, and the assignment carries the rendered ones (rendered_fields).
            # Rendering checks them against the job's schema too, which values
            # from an upstream's output have not met yet (literals were, at parse).
            try:
                rendered = render_agent_task(session, ti, {**task, "templates": {**(task.get("templates") or {}), "params": ti.params}}, native=bool(task.get("render_native")))
            except templating.TemplateError as exc:
                ti.state, ti.ended_at, ti.error = TaskState.FAILED, now, exc.as_error()
                return 0
            ti.rendered_fields = {"params": rendered}
        if rollout:
            return rollouts.start(session, ti, task, fleet, now, self.dispatcher, self._after_commit, by_task)
        instances = [ti]
        if mode == "all" and ti.map_index < 0:
            ti.map_index = 0
            for index, _agent in enumerate(agents[1:], start=1):
                clone = TaskInstance(
                    run_pk=ti.run_pk, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=index, kind=ti.kind,
                    state=TaskState.NONE, try_number=0, max_tries=ti.max_tries, retry_delay=ti.retry_delay,
                    execution_timeout=ti.execution_timeout, job_type=ti.job_type, params=dict(ti.params or {}),
                    pool=ti.pool, pool_slots=ti.pool_slots, priority_weight=ti.priority_weight,
                )
                session.add(clone)
                instances.append(clone)
                by_task[ti.task_id].append(TaskState.QUEUED)
            session.flush()
        try:
            not_before, deadline = offline.assignment_window(session, ti, task)
        except templating.TemplateError as exc:
            for instance in instances:
                instance.state, instance.ended_at, instance.error = TaskState.FAILED, now, exc.as_error()
            return 0
        for instance, agent_id in zip(instances, agents):
            try:
                self.dispatcher.assign(session, instance, agent_id, now, timeout=instance.execution_timeout, not_before=not_before, deadline=deadline)
                # Count it at once, so the next task of this tick sees the new load.
                for i, view in enumerate(fleet):
                    if view.agent_id == agent_id:
                        fleet[i] = replace(view, load=view.load + 1)
            except PayloadTooLarge as exc:
                instance.state = TaskState.FAILED
                instance.ended_at = now
                instance.error = {"code": exc.code, "message": str(exc), "retryable": False}
        return sum(1 for instance in instances if instance.state == TaskState.QUEUED)

    def _finish_run_if_done(self, session: Session, run: DagRun, by_task: dict[str, list[str]], tasks: dict[str, Any], now: datetime) -> bool:
        if not by_task or any(state not in FINISHED for states in by_task.values() for state in states):
            return False
        # Airflow's rule: the leaves decide. A failed task whose failure was
        # handled downstream (say, by an all_done cleanup) does not fail the run.
        upstream_of_something = {up for t in tasks.values() for up in t.get("upstream", [])}
        # A rollout's task counts by the rollout's outcome (failures within its threshold are tolerated).
        outcomes = rollouts.run_outcomes(session, run.id)
        if outcomes is None:
            return False
        failed = not all(outcomes.values()) or any(
            state in (TaskState.FAILED, TaskState.UPSTREAM_FAILED)
            for task_id, states in by_task.items() if task_id not in upstream_of_something and task_id not in outcomes
            for state in states
        )
        run.state = RunState.FAILED if failed else RunState.SUCCESS
        run.ended_at = now
        if dag_callback(session, run, "dag_failure" if failed else "dag_success", now, {"reason": "task_failure" if failed else "success"}):
            self._after_commit.append((ev.CALLBACKS_REQUESTED, {"dag_id": run.dag_id, "run_pk": run.id}))
        self._after_commit.append((ev.RUN_FINISHED, {"dag_id": run.dag_id, "run_pk": run.id, "state": str(run.state)}))
        return True

    def _redeliver(self, session: Session, now: datetime) -> bool:
        """Re-send assignments that were sent but never accepted in time. The
        agent's inbox is keyed by assignment id, so a copy never runs twice.

        Only to online agents (the broker's session already holds a copy for
        an offline one), and backing off: after the n-th copy the next waits
        ``redeliver_after * 2**(n-1)``, at most 32 times as long.

        Not to agents whose last heartbeat says ``accepting: false`` (outbox
        over its quota): each copy would be refused, and each refusal would
        only grow the backoff. Once such an agent accepts again, what it holds
        back is re-sent at the next pass, whatever the backoff."""
        cutoff = now - timedelta(seconds=self.redeliver_after)
        online = select(Agent.agent_id).where(Agent.state == "online")
        refusing = set(session.scalars(online.where(Agent.last_heartbeat["accepting"].as_boolean().is_(False))))
        accepting_again, self._not_accepting = self._not_accepting - refusing, refusing
        stmt = skip_locked(
            select(Assignment)
            .where(Assignment.state == "sent", Assignment.last_sent_at < cutoff, Assignment.agent_id.in_(online))
            .where(Assignment.agent_id.not_in(refusing))
            .order_by(Assignment.last_sent_at)
            .limit(500),
            session,
        )
        resent = False
        for assignment in session.scalars(stmt):
            backoff = self.redeliver_after * 2 ** min(max(assignment.send_count - 1, 0), 5)
            held_back = assignment.agent_id in accepting_again
            if not held_back and assignment.last_sent_at is not None and assignment.last_sent_at > now - timedelta(seconds=backoff):
                continue
            ti = session.get(TaskInstance, assignment.ti_id)
            if ti is None or ti.try_number != assignment.try_number or ti.state in FINISHED:
                assignment.state = "cancelled"
                continue
            assignment.state = "pending"
            session.add(self.dispatcher.outbox_row(ti, assignment, now, ti.execution_timeout))
            resent = True
        return resent

    def _mark_silent_agents(self, session: Session, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self.agent_offline_after)
        silent = list(session.scalars(select(Agent.agent_id).where(Agent.state == "online", Agent.last_seen < cutoff)))
        if not silent:
            return
        # Conditional: a heartbeat committed meanwhile by ingestion wins.
        session.execute(update(Agent).where(Agent.agent_id.in_(silent), Agent.state == "online", Agent.last_seen < cutoff).values(state="offline"))
        for agent_id in silent:
            log.info("agent %s silent for %ss: marking offline", agent_id, self.agent_offline_after)
            self._after_commit.append((ev.AGENT_CHANGED, {"agent_id": agent_id, "state": "offline"}))
        self._announce(offline.mark_offline(session, now, self.default_offline_grace, silent))

    def _prune_logs(self, now: datetime) -> None:
        """Log retention: one bounded batch (its own short transaction) per
        pass; while a full batch went, the next full pass goes on at once,
        otherwise after ``log_prune_interval``."""
        if self.task_log_retention_days <= 0 or (self._next_log_prune is not None and now < self._next_log_prune):
            return
        with self._step() as session:
            pruned = tasklogs.prune_chunks(session, now, self.task_log_retention_days)
        if pruned:
            log.info("pruned %d log chunk(s) older than %s day(s)", pruned, self.task_log_retention_days)
        self._next_log_prune = None if pruned >= tasklogs.PRUNE_BATCH else now + timedelta(seconds=self.log_prune_interval)

    def _offline_work(self, session: Session, now: datetime) -> bool:
        """Offline operation (hub.offline): work on offline devices shows
        ``device_offline``, work of returned devices is restored and re-sent,
        and ``offline_grace`` re-targets or gives up what waited too long."""
        marked = offline.mark_offline(session, now, self.default_offline_grace)
        restored = offline.restore_returned(session, now, self.dispatcher)
        retargeted, given_up = offline.apply_offline_grace(session, now, self.dispatcher.hlc, self.default_offline_grace)
        for changes in (marked, restored, retargeted, given_up):
            self._announce(changes)
        for _ti_id, run_pk, _task_id, _state in retargeted.states + given_up.states:
            self._mark(run_pk)  # dispatch the re-targeted instance, decide after a failure
        if retargeted or given_up:
            self._after_commit.append((ev.OUTBOX_WRITTEN, {}))  # their Cancel messages
        return bool(retargeted or given_up or restored)

    def _announce(self, changes: offline.Changes) -> None:
        self._after_commit.extend(changes.events())


class _PastChecker:
    """``depends_on_past`` (Airflow's): an instance may start only if the
    same task in the run before (by logical date) succeeded or was skipped,
    or there is no such run or task there; with ``wait_for_downstream`` the
    tasks immediately downstream of it there too. Previous runs are looked
    up once per pass."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._previous: dict[int, int | None] = {}

    def __call__(self, run: DagRun, task_id: str, tasks: dict[str, dict[str, Any]] | None = None) -> bool:
        if run.id not in self._previous:
            self._previous[run.id] = self._session.scalar(
                select(DagRun.id)
                .where(DagRun.dag_id == run.dag_id, DagRun.id != run.id,
                       (DagRun.logical_date < run.logical_date) | ((DagRun.logical_date == run.logical_date) & (DagRun.id < run.id)))
                .order_by(DagRun.logical_date.desc(), DagRun.id.desc())
                .limit(1)
            )
        previous = self._previous[run.id]
        if previous is None:
            return True
        wanted = [task_id]
        if tasks is not None:
            wanted += [t for t, spec in tasks.items() if task_id in spec.get("upstream", ())]
        states = self._session.scalars(select(TaskInstance.state).where(TaskInstance.run_pk == previous, TaskInstance.task_id.in_(wanted))).all()
        return all(state in (TaskState.SUCCESS, TaskState.SKIPPED) for state in states)
