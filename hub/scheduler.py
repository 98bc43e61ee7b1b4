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
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from croniter import croniter
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hub import events as ev
from hub.dagbag import cron_expression
from hub.dagprocessor import SerializedDagBag
from hub.db import skip_locked, transaction
from hub.dispatcher import Dispatcher
from hub.errors import DagNotFound, InvalidRequest
from hub.events import EventBus
from hub.models import Agent, Assignment, Dag, DagRun, DagVersion, TaskInstance
from hub.targeting import choose
from hub.trigger_rules import Decision, decide
from shared.clock import Clock, utcnow
from shared.errors import PayloadTooLarge
from shared.states import FINISHED, RunState, TaskState

log = logging.getLogger(__name__)

_MAX_CONF_BYTES = 64 * 1024
_WAITING = frozenset({TaskState.NONE.value, TaskState.SCHEDULED.value})


def trigger_run(session: Session, dag_id: str, conf: dict[str, Any], now: datetime, run_type: str = "manual", logical_date: datetime | None = None) -> DagRun:
    """Create a run of ``dag_id`` with one task instance per task, in the
    caller's transaction. Raises ``DagNotFound`` or ``InvalidRequest``."""
    dag = session.get(Dag, dag_id)
    if dag is None or not dag.is_active:
        raise DagNotFound(f"DAG {dag_id!r} does not exist (or its file was removed); see 'outpost dags list'")
    if not isinstance(conf, dict):
        raise InvalidRequest("conf must be a JSON object")
    if len(json.dumps(conf)) > _MAX_CONF_BYTES:
        raise InvalidRequest(f"conf is larger than {_MAX_CONF_BYTES} bytes; pass references, not data")
    when = logical_date or now
    run_id = f"{run_type}__{when.isoformat(timespec='microseconds')}"
    taken = set(session.scalars(select(DagRun.run_id).where(DagRun.dag_id == dag_id, DagRun.run_id.startswith(run_id, autoescape=True))))
    if run_id in taken:
        if run_type == "scheduled":
            raise InvalidRequest(f"run {run_id!r} of {dag_id!r} already exists")
        # Two manual triggers in the same microsecond are two runs, not an error.
        run_id = next(f"{run_id}.{n}" for n in range(1, len(taken) + 2) if f"{run_id}.{n}" not in taken)
    run = DagRun(dag_id=dag_id, run_id=run_id, run_type=run_type, state=RunState.RUNNING, logical_date=when, conf=conf, created_at=now, started_at=now,
                 dag_version_id=dag.latest_version_id)  # the run follows this version to its end
    session.add(run)
    session.flush()
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
            )
        )
    session.flush()
    return run


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
    dag_reparse_interval: float = 5.0
    #: False when DAG parsing runs in its own thread (``run_dag_processing``),
    #: so a slow DAG file never delays a scheduling pass.
    parse_in_tick: bool = True
    _wake: threading.Event = field(default_factory=threading.Event)
    _last_parse: float = float("-inf")
    #: A parse whose DB write failed is written again at the next interval.
    _sync_pending: bool = False
    _structure_cache: dict[str, tuple[Any, dict[str, Any]]] = field(default_factory=dict)
    #: Tasks by id of each DAG version seen; versions never change.
    _version_cache: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    #: Events of the current step, emitted once its transaction committed.
    _after_commit: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Only events that can make a task ready wake the scheduler; a task
        # that was merely delivered or started changes no decision.
        for name in (ev.RUN_TRIGGERED, ev.RESULT_APPLIED, ev.HUB_TASK_FINISHED, ev.AGENT_CHANGED):
            self.events.subscribe(name, lambda _n, _d: self._wake.set())

    def wake(self) -> None:
        self._wake.set()

    # --- loop drivers ------------------------------------------------------

    def run_forever(self, stop: threading.Event) -> None:
        last_full = float("-inf")
        while not stop.is_set():
            # A wake-up by an event only advances runs; the housekeeping steps
            # (cron, retries, redelivery, silent agents) run every ``interval``.
            full = time.monotonic() - last_full >= self.interval
            try:
                busy = self.tick(full=full)
            except Exception:
                log.exception("scheduler tick failed; retrying")
                busy = False
            if full:
                last_full = time.monotonic()
            if not busy:
                self._wake.wait(max(0.0, self.interval - (time.monotonic() - last_full)))
            self._wake.clear()

    def run_until_idle(self, max_ticks: int = 1000) -> None:
        for _ in range(max_ticks):
            if not self.tick():
                return
        raise RuntimeError(f"scheduler still busy after {max_ticks} ticks")

    @contextmanager
    def _step(self) -> Iterator[Session]:
        """One step's transaction; its events go out after the commit."""
        self._after_commit.clear()
        with transaction(self.sessions) as session:
            yield session
        events, self._after_commit = self._after_commit, []
        for name, data in events:
            self.events.emit(name, **data)

    def tick(self, full: bool = True) -> bool:
        """One scheduling pass. Returns True if it changed anything. A pass
        that is not ``full`` only advances runs (dispatch and decisions)."""
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
            hub_tasks, changed = self._advance_runs(session, now)
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
            self.parse_dags(utcnow(self.clock))

    def _create_scheduled_runs(self, session: Session, now: datetime) -> bool:
        created = False
        stmt = skip_locked(select(Dag).where(Dag.schedule.is_not(None), Dag.is_active.is_(True), Dag.is_paused.is_(False)), session)
        for dag in session.scalars(stmt):
            expr = cron_expression(dag.schedule or "")
            if dag.next_run_at is None:
                dag.next_run_at = croniter(expr, now).get_next(datetime)
                continue
            if dag.next_run_at > now:
                continue
            # Without catchup (the spine's behaviour) missed intervals collapse
            # into one run at the latest due time.
            due = dag.next_run_at
            following = croniter(expr, due).get_next(datetime)
            while following <= now:
                due, following = following, croniter(expr, following).get_next(datetime)
            trigger_run(session, dag.dag_id, {}, now, run_type="scheduled", logical_date=due)
            dag.next_run_at = following
            created = True
        return created

    def _bring_back_retries(self, session: Session, now: datetime) -> bool:
        stmt = skip_locked(select(TaskInstance).where(TaskInstance.state == TaskState.UP_FOR_RETRY, TaskInstance.next_try_at <= now), session)
        due = list(session.scalars(stmt))
        for ti in due:
            ti.state = TaskState.SCHEDULED
            ti.next_try_at = None
        return bool(due)

    def _advance_runs(self, session: Session, now: datetime) -> tuple[list[int], bool]:
        runs = list(session.scalars(skip_locked(select(DagRun).where(DagRun.state == RunState.RUNNING), session)))
        if not runs:
            return [], False
        structures = self._structures(session, runs)
        # States of every task instance as plain rows: cheap even for runs of
        # thousands of tasks. Only instances that are ready become ORM objects.
        rows = session.execute(
            select(TaskInstance.id, TaskInstance.run_pk, TaskInstance.task_id, TaskInstance.state).where(TaskInstance.run_pk.in_([r.id for r in runs]))
        )
        states_by_run: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        waiting_by_run: dict[int, list[tuple[int, str]]] = defaultdict(list)
        for ti_id, run_pk, task_id, state in rows:
            states_by_run[run_pk][task_id].append(state)
            if state in _WAITING:
                waiting_by_run[run_pk].append((ti_id, task_id))
        fleet = None
        hub_tasks: list[int] = []
        changed = False
        for run in runs:
            tasks = structures.get(run.id, {})
            by_task = states_by_run[run.id]
            for ti_id, task_id in sorted(waiting_by_run[run.id], key=lambda item: (item[1], item[0])):
                task = tasks.get(task_id)
                ti = None
                if task is not None:
                    upstream = [state for up in task.get("upstream", []) for state in by_task.get(up, [])]
                    decision = decide(task.get("trigger_rule", "all_success"), upstream)
                    if decision == Decision.WAIT:
                        continue
                ti = session.get(TaskInstance, ti_id)
                assert ti is not None
                before = ti.state
                if task is None:
                    ti.state = TaskState.REMOVED
                elif decision in (Decision.SKIP, Decision.UPSTREAM_FAILED):
                    ti.state, ti.ended_at = TaskState(decision.value), now
                elif ti.kind == "hub":
                    ti.try_number += 1
                    ti.state, ti.queued_at = TaskState.QUEUED, now
                    hub_tasks.append(ti.id)
                else:
                    if fleet is None:
                        fleet = self.dispatcher.fleet_snapshot(session)
                    self._dispatch_agent_task(session, ti, task, fleet, by_task, now)
                changed |= ti.state != before
                self._replace_state(by_task[task_id], before, ti.state)
            changed |= self._finish_run_if_done(run, by_task, tasks, now)
        return hub_tasks, changed

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

    @staticmethod
    def _replace_state(states: list[str], old: str, new: str) -> None:
        states[states.index(old)] = new

    def _dispatch_agent_task(self, session: Session, ti: TaskInstance, task: dict[str, Any], fleet: list[Any], by_task: dict[str, list[str]], now: datetime) -> None:
        target = task.get("target") or {"mode": "any"}
        mode = target.get("mode", "any")
        if ti.agent_id is not None and (mode != "any" or ti.map_index >= 0):
            agents = [ti.agent_id]  # a retry of a pinned or fanned-out instance stays on its device
        else:
            agents = choose(mode, ti.job_type or "", fleet, agent_id=target.get("agent_id"), labels=target.get("labels") or {})
        if not agents:
            if mode == "all":
                ti.state = TaskState.SKIPPED  # Airflow: a zero-length mapped task is skipped
                ti.ended_at = now
                ti.error = {"code": "no_matching_agents", "message": "no online agent matched the target", "retryable": False}
            else:
                ti.state = TaskState.SCHEDULED  # waits for a matching agent to come online
            return
        instances = [ti]
        if mode == "all" and ti.map_index < 0:
            ti.map_index = 0
            for index, _agent in enumerate(agents[1:], start=1):
                clone = TaskInstance(
                    run_pk=ti.run_pk, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=index, kind=ti.kind,
                    state=TaskState.NONE, try_number=0, max_tries=ti.max_tries, retry_delay=ti.retry_delay,
                    execution_timeout=ti.execution_timeout, job_type=ti.job_type, params=dict(ti.params or {}),
                )
                session.add(clone)
                instances.append(clone)
                by_task[ti.task_id].append(TaskState.QUEUED)
            session.flush()
        for instance, agent_id in zip(instances, agents):
            try:
                self.dispatcher.assign(session, instance, agent_id, now, timeout=instance.execution_timeout)
                # Count it at once, so the next task of this tick sees the new load.
                for i, view in enumerate(fleet):
                    if view.agent_id == agent_id:
                        fleet[i] = replace(view, load=view.load + 1)
            except PayloadTooLarge as exc:
                instance.state = TaskState.FAILED
                instance.ended_at = now
                instance.error = {"code": exc.code, "message": str(exc), "retryable": False}

    def _finish_run_if_done(self, run: DagRun, by_task: dict[str, list[str]], tasks: dict[str, Any], now: datetime) -> bool:
        if not by_task or any(state not in FINISHED for states in by_task.values() for state in states):
            return False
        # Airflow's rule: the leaves decide. A failed task whose failure was
        # handled downstream (say, by an all_done cleanup) does not fail the run.
        upstream_of_something = {up for t in tasks.values() for up in t.get("upstream", [])}
        failed = any(
            state in (TaskState.FAILED, TaskState.UPSTREAM_FAILED)
            for task_id, states in by_task.items() if task_id not in upstream_of_something
            for state in states
        )
        run.state = RunState.FAILED if failed else RunState.SUCCESS
        run.ended_at = now
        self._after_commit.append((ev.RUN_FINISHED, {"dag_id": run.dag_id, "run_pk": run.id, "state": str(run.state)}))
        return True

    def _redeliver(self, session: Session, now: datetime) -> bool:
        """Re-send assignments that were sent but never accepted in time. The
        agent's inbox is keyed by assignment id, so a copy never runs twice.

        Only to online agents (the broker's session already holds a copy for
        an offline one), and backing off: after the n-th copy the next waits
        ``redeliver_after * 2**(n-1)``, at most 32 times as long."""
        cutoff = now - timedelta(seconds=self.redeliver_after)
        online = select(Agent.agent_id).where(Agent.state == "online")
        stmt = skip_locked(
            select(Assignment)
            .where(Assignment.state == "sent", Assignment.last_sent_at < cutoff, Assignment.agent_id.in_(online))
            .order_by(Assignment.last_sent_at)
            .limit(500),
            session,
        )
        resent = False
        for assignment in session.scalars(stmt):
            backoff = self.redeliver_after * 2 ** min(max(assignment.send_count - 1, 0), 5)
            if assignment.last_sent_at is not None and assignment.last_sent_at > now - timedelta(seconds=backoff):
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
