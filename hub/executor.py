"""The local executor for hub tasks: Airflow's LocalExecutor, with a pool of
long-lived worker processes.

Hub tasks are orchestration glue written in DAG files (summing fleet
results, calling an HTTP API). The executor starts ``workers`` processes
once (from a fork server, never a fork of the threaded hub) and reuses them:
each receives one task instance id at a time over a pipe, imports the DAG
file itself (hub/worker.py) and answers with the try's outcome, which the
executor records with ``finish_try`` and only then announces
(``HUB_TASK_FINISHED`` wakes the scheduler).

Task code cannot take the hub down: a task that outlives its
``execution_timeout`` fails with ``execution_timeout`` (retryable) and its
worker is killed (SIGTERM, SIGKILL after ``kill_grace``) and replaced; a
task that kills its worker (``os._exit``, a segfault) fails with
``worker_died``. Callbacks requested by the scheduler or result ingestion
(``callback_requests``) run in the same workers.

Two threads of the hub drive it. The executor thread hands queued tasks to
idle workers and waits on the workers' pipes and process sentinels together
(no polling). The recorder thread writes what the workers finished, all of
what arrived meanwhile in one transaction, so workers never wait for the
database. A task that ends within MARK_RUNNING_AFTER goes from queued to
its final state in that one commit; a longer one is recorded as running
(with its worker's pid) first. Each worker holds a lifeline pipe to the
hub and exits the moment the hub dies, so a task the next hub adopts is
never still running elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection, wait
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from hub import events as ev
from hub.db import transaction
from hub.events import EventBus
from hub.lifecycle import finish_try
from hub.models import CallbackRequest, DagRun, TaskInstance
from hub.xcom import XComValueError, record_return
from hub.worker import MAX_CALLBACK_ATTEMPTS, MAX_OUTPUT_BYTES, WorkerRuntime, execute_task, run_callback, worker_main, worker_store
from shared.clock import Clock, utcnow
from shared.states import TaskState

log = logging.getLogger(__name__)

__all__ = ["MAX_OUTPUT_BYTES", "LocalExecutor"]

#: Seconds a callback may run before its worker is killed.
CALLBACK_TIMEOUT = 60.0
#: Seconds between looks for callback requests written by other processes.
CALLBACK_POLL_INTERVAL = 5.0
#: Seconds a task runs before it is recorded as running (see _due_marks).
MARK_RUNNING_AFTER = 0.1


@dataclass
class _Job:
    kind: str  # "task" or "callback"
    key: int  # task instance id or callback request id
    since: float  # time.monotonic() when it was handed to the worker
    started_at: datetime | None = None  # the same moment on the executor's clock
    try_number: int | None = None  # known once the worker read the instance
    deadline: float | None = None  # time.monotonic() after which the worker is killed
    marked: bool = False  # recorded as running


@dataclass
class _Mark:
    ti_id: int
    try_number: int | None
    started_at: datetime | None
    pid: int


@dataclass
class _Result:
    ti_id: int
    try_number: int | None  # None: the worker died before it read the instance
    outcome: dict[str, Any]
    started_at: datetime | None
    pid: int


class _Worker:
    def __init__(self, process: Any, conn: Connection, lifeline: Connection) -> None:
        self.process = process
        self.conn = conn
        #: Held open while the worker lives; closed (or the hub dead), it exits.
        self.lifeline = lifeline
        self.job: _Job | None = None
        self.kill_at: float | None = None  # set once SIGTERM was sent

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class LocalExecutor:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        clock: Clock,
        events: EventBus,
        workers: int = 4,
        *,
        kill_grace: float = 5.0,
        sqlite_synchronous: str = "FULL",
        callback_timeout: float = CALLBACK_TIMEOUT,
        fernet_keys: str = "",
    ) -> None:
        self.sessions = sessions
        self.clock = clock
        self.events = events
        self.workers = workers
        self.kill_grace = kill_grace
        self.callback_timeout = callback_timeout
        self.sqlite_synchronous = sqlite_synchronous
        #: Handed to each worker so task code can read variables and connections.
        self.fernet_keys = fernet_keys
        engine = sessions.kw["bind"]
        self.db_url = engine.url.render_as_string(hide_password=False)
        self._lock = threading.Lock()
        self._pending: deque[int] = deque()
        self._known: set[int] = set()  # submitted and not yet recorded
        self._callbacks: deque[int] = deque()
        self._callbacks_known: set[int] = set()
        self._callbacks_due = True
        self._pool: list[_Worker] = []
        #: A worker that died between tasks is replaced no sooner than this
        #: (time.monotonic()), so a worker that cannot start does not spin.
        self._respawn_after = 0.0
        self._dying: list[_Worker] = []
        #: Finished tries and "running" marks for the recorder thread.
        self._recorder_cond = threading.Condition()
        self._to_record: list[_Result] = []
        self._to_mark: list[_Mark] = []
        self._recorder: threading.Thread | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._inline: WorkerRuntime | None = None
        self._ctx: Any = None
        #: The scheduler (``Scheduler.decide_after``), when the hub wires it:
        #: the downstream of a finished task is then decided and queued in the
        #: transaction that records it, not in a later scheduler pass.
        self.mini_scheduler: Any = None
        events.subscribe(ev.CALLBACKS_REQUESTED, lambda _n, _d: self._callbacks_wanted())

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._ctx = multiprocessing.get_context("forkserver")
        # The fork server imports the worker's modules once; each worker is
        # then a cheap fork of it, so replacing a killed worker takes
        # milliseconds, and no worker inherits the hub's threads or locks.
        self._ctx.set_forkserver_preload(["hub.worker"])
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stopping.clear()
        self._pool = [self._spawn() for _ in range(self.workers)]
        self._thread = threading.Thread(target=self._loop, name="hub-executor", daemon=True)
        self._recorder = threading.Thread(target=self._record_loop, name="hub-executor-recorder", daemon=True)
        self._thread.start()
        self._recorder.start()

    def stop(self, wait: bool = False) -> None:
        """Stop the workers and reap them. A task still running is
        interrupted; it stays running in the DB and is adopted (run again as
        a new try) when a hub starts. ``wait`` is accepted for compatibility:
        interrupted tasks are never waited for."""
        if self._thread is None:
            return
        self._stopping.set()
        self._wake()
        self._thread.join(30)
        with self._recorder_cond:
            self._recorder_cond.notify_all()
        if self._recorder is not None:
            self._recorder.join(30)  # records what the workers finished before the stop
        self._thread = self._recorder = None
        workers, self._pool, dying, self._dying = self._pool, [], self._dying, []
        for worker in workers:
            try:
                if worker.job is None:
                    worker.conn.send(None)
                else:
                    os.kill(worker.pid, signal.SIGTERM)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + self.kill_grace
        for worker in [*workers, *dying]:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(5)
            worker.conn.close()
            worker.lifeline.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r, self._wake_w = -1, -1

    def worker_pids(self) -> list[int]:
        """The pids of the live worker processes (for the dashboard and tests)."""
        return [w.pid for w in self._pool]

    def submit(self, ti_id: int) -> None:
        """Run hub task instance ``ti_id``, committed as queued."""
        if self._thread is None:
            raise RuntimeError("executor is not started")
        with self._lock:
            if ti_id in self._known:
                return
            self._known.add(ti_id)
            self._pending.append(ti_id)
        self._wake()

    def adopt_orphans(self) -> int:
        """Hub tasks left queued or running by a dead hub process (whose
        workers died with it) go back to the scheduler, which starts them
        again as a new try."""
        with transaction(self.sessions) as session:
            result = session.execute(
                update(TaskInstance)
                .where(TaskInstance.kind == "hub", TaskInstance.state.in_([TaskState.QUEUED, TaskState.RUNNING]))
                .values(state=TaskState.SCHEDULED, pid=None)
            )
            return result.rowcount or 0  # type: ignore[attr-defined]

    # --- in-process execution for the tick-by-tick harness -----------------

    def run_inline(self, ti_id: int) -> None:
        """Run one queued hub task in this process and record it, with this
        executor's clock: for tests that drive the hub tick by tick. No
        ``execution_timeout`` here; the worker processes enforce it."""
        started_at = utcnow(self.clock)
        try:
            try_number, outcome = execute_task(self._inline_runtime(), ti_id, started_at)
        except Exception as exc:
            log.exception("hub task %s: executor failure", ti_id)
            try_number, outcome = None, {"kind": "failed", "error": {"code": "executor_error", "message": f"{type(exc).__name__}: {exc}", "retryable": True}}
        self._write([], [_Result(ti_id, try_number, outcome, started_at, os.getpid())])

    def run_callbacks_inline(self) -> int:
        """Run every pending callback request in this process; returns how
        many ran."""
        ran = 0
        for callback_id in self._pending_callbacks():
            if self._claim_callback(callback_id):
                error = run_callback(self._inline_runtime(), callback_id)
                self._record_callback(callback_id, error)
                ran += 1
        return ran

    def _inline_runtime(self) -> WorkerRuntime:
        if self._inline is None:
            self._inline = WorkerRuntime(self.sessions, self.clock, store=worker_store(self.sessions, self.fernet_keys))
        return self._inline

    # --- the executor thread -----------------------------------------------

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"x")
            except (BlockingIOError, OSError):
                pass  # the pipe is full: the loop is awake anyway

    def _callbacks_wanted(self) -> None:
        self._callbacks_due = True
        self._wake()

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        life_r, life_w = self._ctx.Pipe(duplex=False)
        process = self._ctx.Process(target=worker_main, args=(child, life_r, self.db_url, self.sqlite_synchronous, self.fernet_keys), name="outpost-hub-worker", daemon=True)
        process.start()
        child.close()
        life_r.close()
        return _Worker(process, parent, life_w)

    def _loop(self) -> None:
        next_callback_poll = 0.0
        while not self._stopping.is_set():
            try:
                if self._callbacks_due or time.monotonic() >= next_callback_poll:
                    self._callbacks_due = False
                    next_callback_poll = time.monotonic() + CALLBACK_POLL_INTERVAL
                    self._queue_callbacks()
                self._fill_pool()
                self._dispatch()
                self._wait_and_collect(min(self._timeout(), max(0.0, next_callback_poll - time.monotonic())))
            except Exception:
                log.exception("hub executor loop failed; continuing")
                self._stopping.wait(0.5)

    def _fill_pool(self) -> None:
        while len(self._pool) < self.workers and time.monotonic() >= self._respawn_after and not self._stopping.is_set():
            try:
                self._pool.append(self._spawn())
            except OSError:
                log.exception("cannot start a hub worker process; retrying in 1 s")
                self._respawn_after = time.monotonic() + 1.0

    def _timeout(self) -> float:
        now = time.monotonic()
        moments = [w.job.deadline for w in self._pool if w.job is not None and w.job.deadline is not None]
        moments += [w.job.since + MARK_RUNNING_AFTER for w in self._pool if w.job is not None and w.job.kind == "task" and not w.job.marked]
        moments += [w.kill_at for w in self._dying if w.kill_at is not None]
        timeout = min((m - now for m in moments), default=CALLBACK_POLL_INTERVAL)
        if len(self._pool) < self.workers:
            timeout = min(timeout, 1.0)
        return max(0.0, timeout)

    def _dispatch(self) -> None:
        idle = [w for w in self._pool if w.job is None]
        if not idle:
            return
        with self._lock:
            pairs = [(idle.pop(), self._pending.popleft()) for _ in range(min(len(idle), len(self._pending)))]
        for worker, ti_id in pairs:
            worker.job = _Job("task", ti_id, time.monotonic(), utcnow(self.clock))
            self._send(worker, ("task", ti_id, worker.job.started_at))
        while idle and self._callbacks:
            callback_id = self._callbacks.popleft()
            try:
                claimed = self._claim_callback(callback_id)
            except Exception:
                log.exception("could not claim callback %s; it is tried again later", callback_id)
                claimed = False
            if not claimed:
                self._callbacks_known.discard(callback_id)
                continue
            worker = idle.pop()
            now = time.monotonic()
            worker.job = _Job("callback", callback_id, now, deadline=now + self.callback_timeout)
            self._send(worker, ("callback", callback_id))

    @staticmethod
    def _send(worker: _Worker, message: Any) -> None:
        try:
            worker.conn.send(message)
        except (OSError, ValueError):
            pass  # the worker just died: its sentinel reports it, with the job

    def _wait_and_collect(self, timeout: float) -> None:
        watched: list[Any] = [self._wake_r]
        for worker in self._pool:
            watched += [worker.conn, worker.process.sentinel]
        watched += [w.process.sentinel for w in self._dying]
        ready = set(wait(watched, timeout))
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        tasks: list[_Result] = []
        callbacks: list[tuple[int, str | None]] = []
        dead: list[_Worker] = []
        for worker in self._pool:
            if worker.conn in ready or worker.process.sentinel in ready:
                try:
                    while worker.conn.poll():
                        self._take_message(worker, worker.conn.recv(), tasks, callbacks)
                except (EOFError, OSError):
                    dead.append(worker)
                    continue
                if worker.process.sentinel in ready and worker not in dead:
                    dead.append(worker)
        now = time.monotonic()
        for worker in self._pool:
            job = worker.job
            if worker in dead or job is None or job.deadline is None or now < job.deadline:
                continue
            if job.kind == "task":
                error = {"code": "execution_timeout", "message": f"the task ran longer than its execution_timeout; its worker (pid {worker.pid}) was killed", "retryable": True}
                tasks.append(_Result(job.key, job.try_number, {"kind": "failed", "error": error}, job.started_at, worker.pid))
            else:
                callbacks.append((job.key, f"the callback ran longer than {self.callback_timeout:g} s; its worker was killed"))
            log.warning("hub %s %s timed out: killing worker %s", job.kind, job.key, worker.pid)
            worker.job = None
            self._terminate(worker, now)
            dead.append(worker)
        for worker in dead:
            job, worker.job = worker.job, None
            if job is not None:
                if worker.process.exitcode is None and worker.kill_at is None:
                    worker.process.join(1.0)  # its pipe closed first; the exit status follows
                code = worker.process.exitcode
                how = f"exit code {code}" if code is not None and code >= 0 else f"signal {-code}" if code is not None else "its pipe closed"
                log.warning("hub worker %s died running %s %s (%s)", worker.pid, job.kind, job.key, how)
                message = f"the worker process (pid {worker.pid}) running the task died ({how}); a new worker replaced it"
                if job.kind == "task":
                    tasks.append(_Result(job.key, job.try_number, {"kind": "failed", "error": {"code": "worker_died", "message": message, "retryable": True}}, job.started_at, worker.pid))
                else:
                    callbacks.append((job.key, message))
            elif worker.kill_at is None:
                log.warning("hub worker %s exited between tasks (exit code %s)", worker.pid, worker.process.exitcode)
                self._respawn_after = now + 1.0
            if worker.kill_at is None:
                self._terminate(worker, now)
            self._pool.remove(worker)
        self._fill_pool()
        self._reap(ready, now)
        marks = self._due_marks(now)
        if tasks or marks:
            with self._recorder_cond:
                self._to_record.extend(tasks)
                self._to_mark.extend(marks)
                self._recorder_cond.notify()
        for callback_id, error in callbacks:
            self._record_callback(callback_id, error)

    def _take_message(self, worker: _Worker, message: Any, tasks: list[_Result], callbacks: list[Any]) -> None:
        job = worker.job
        if message[0] == "started":
            _, ti_id, try_number, timeout = message
            if job is not None and job.kind == "task" and job.key == ti_id:
                job.try_number = try_number
                job.deadline = None if timeout is None else job.since + float(timeout)
        elif message[0] == "task":
            _, ti_id, try_number, outcome = message
            if job is not None and job.kind == "task" and job.key == ti_id:
                worker.job = None
                tasks.append(_Result(ti_id, try_number, outcome, job.started_at, worker.pid))
        elif message[0] == "callback":
            _, callback_id, error = message
            if job is not None and job.kind == "callback" and job.key == callback_id:
                worker.job = None
                callbacks.append((callback_id, error))

    def _terminate(self, worker: _Worker, now: float) -> None:
        if worker.process.is_alive():
            try:
                os.kill(worker.pid, signal.SIGTERM)
            except OSError:
                pass
        worker.kill_at = now + self.kill_grace
        self._dying.append(worker)

    def _reap(self, ready: set[Any], now: float) -> None:
        for worker in list(self._dying):
            if worker.process.sentinel in ready or not worker.process.is_alive():
                worker.process.join(0.1)
                worker.conn.close()
                worker.lifeline.close()
                self._dying.remove(worker)
            elif worker.kill_at is not None and now >= worker.kill_at:
                log.warning("hub worker %s ignored SIGTERM for %ss: SIGKILL", worker.pid, self.kill_grace)
                worker.process.kill()
                worker.kill_at = None

    # --- the DB side -------------------------------------------------------

    def _due_marks(self, now: float) -> list[_Mark]:
        """Tasks on a worker for MARK_RUNNING_AFTER, to record as running. A
        task that ends sooner goes from queued to its final state in the one
        transaction that records it: one commit per short task, not two."""
        marks = []
        for worker in self._pool:
            job = worker.job
            if job is not None and job.kind == "task" and not job.marked and now - job.since >= MARK_RUNNING_AFTER:
                job.marked = True
                marks.append(_Mark(job.key, job.try_number, job.started_at, worker.pid))
        return marks

    def _record_loop(self) -> None:
        """The recorder thread: writes what the executor thread collected, all
        of it in one transaction, so the executor thread keeps handing out
        work while the database is busy, and results that arrive meanwhile
        share the next commit (a wide DAG's tasks finish in batches)."""
        while True:
            with self._recorder_cond:
                while not (self._to_record or self._to_mark or self._stopping.is_set()):
                    self._recorder_cond.wait()
                results, self._to_record = self._to_record, []
                marks, self._to_mark = self._to_mark, []
            if not results and not marks:
                return  # stopping, and nothing left to write
            if not self._write(marks, results):
                with self._recorder_cond:
                    self._to_record[:0] = results
                if self._stopping.wait(1.0):
                    log.error("hub executor stopping with %d result(s) unrecorded; their tasks are adopted at the next start", len(self._to_record))
                    return

    def _write(self, marks: list[_Mark], results: list[_Result]) -> bool:
        """Record running marks and finished tries in one transaction, then
        announce the finished ones. A try that is no longer current (cleared
        or marked meanwhile) is left as the operator decided; if a new try
        of it is queued already, it runs. Returns False if nothing could be
        written (the caller tries again)."""
        now = utcnow(self.clock)
        requeue: list[int] = []
        # The run and task of each recorded result: the scheduler then
        # decides only that task's downstream (see Scheduler._note).
        where: dict[int, dict[str, Any]] = {}
        mini = self.mini_scheduler
        # The scheduler's lock before the transaction, as its own steps take them.
        with mini.lock if mini is not None else contextlib.nullcontext():
            return self._write_locked(marks, results, now, requeue, where, mini)

    def _write_locked(
        self, marks: list[_Mark], results: list[_Result], now: datetime, requeue: list[int], where: dict[int, dict[str, Any]], mini: Any,
    ) -> bool:
        callbacks_added = False
        decided: set[int] = set()
        try:
            with transaction(self.sessions) as session:
                ids = {m.ti_id for m in marks} | {r.ti_id for r in results}
                rows = {ti.id: ti for ti in session.scalars(select(TaskInstance).where(TaskInstance.id.in_(list(ids))))}
                # Their runs, loaded once and held (the session's identity map
                # is weak): finish_try reads each instance's run, and found in
                # the session it costs no query (nor an autoflush).
                runs = session.scalars(select(DagRun).where(DagRun.id.in_({ti.run_pk for ti in rows.values()}))).all()
                for mark in marks:
                    ti = rows.get(mark.ti_id)
                    if ti is not None and ti.state == TaskState.QUEUED and mark.try_number in (None, ti.try_number):
                        ti.state, ti.started_at, ti.pid = TaskState.RUNNING, mark.started_at, mark.pid
                for result in results:
                    ti = rows.get(result.ti_id)
                    if ti is None:
                        continue
                    current = ti.state in (TaskState.QUEUED, TaskState.RUNNING) and result.try_number in (None, ti.try_number)
                    if not current or result.outcome.get("kind") == "stale":
                        if ti.state == TaskState.QUEUED and result.try_number is not None and ti.try_number != result.try_number:
                            requeue.append(ti.id)
                        continue
                    ti.started_at, ti.pid = result.started_at or now, result.pid
                    apply_outcome(ti, result.outcome, now)
                    where[ti.id] = {"run_pk": ti.run_pk, "task_id": ti.task_id}
                session.flush()
                callbacks_added = any(isinstance(o, CallbackRequest) for o in session.identity_map.values())
                if mini is not None and where:
                    try:
                        decided = mini.decide_after(session, now, [(w["run_pk"], w["task_id"]) for w in where.values()])
                    except Exception:
                        log.exception("deciding the downstream of %d hub task(s) failed; the scheduler's next pass does it", len(where))
                del runs
        except Exception:
            log.exception("could not record %d hub task result(s) and %d running mark(s); retrying", len(results), len(marks))
            if mini is not None:
                mini.after_decided(committed=False)
            return False
        with self._lock:
            self._known.difference_update(r.ti_id for r in results)
        if mini is not None:
            mini.after_decided(committed=True)
        if self._thread is not None:
            for ti_id in requeue:
                self.submit(ti_id)
        for result in results:
            place = where.get(result.ti_id, {})
            self.events.emit(ev.HUB_TASK_FINISHED, ti_id=result.ti_id, **place, decided=place.get("run_pk") in decided)
        if callbacks_added:
            self._callbacks_wanted()
        return True

    def _pending_callbacks(self) -> list[int]:
        with self.sessions() as session:
            return list(session.scalars(select(CallbackRequest.id).where(CallbackRequest.finished_at.is_(None)).order_by(CallbackRequest.id).limit(500)))

    def _queue_callbacks(self) -> None:
        for callback_id in self._pending_callbacks():
            if callback_id not in self._callbacks_known:
                self._callbacks_known.add(callback_id)
                self._callbacks.append(callback_id)

    def _claim_callback(self, callback_id: int) -> bool:
        """Count an attempt before running it, so a callback that kills its
        worker (or the hub) is still given up after MAX_CALLBACK_ATTEMPTS."""
        with transaction(self.sessions) as session:
            request = session.get(CallbackRequest, callback_id)
            if request is None or request.finished_at is not None:
                return False
            if request.attempts >= MAX_CALLBACK_ATTEMPTS:
                request.finished_at = utcnow(self.clock)
                request.error = (request.error or "") + f" (given up after {request.attempts} attempts)"
                return False
            request.attempts += 1
            return True

    def _record_callback(self, callback_id: int, error: str | None) -> None:
        self._callbacks_known.discard(callback_id)
        try:
            with transaction(self.sessions) as session:
                request = session.get(CallbackRequest, callback_id)
                if request is None:
                    return
                request.error = error
                if error is None or request.attempts >= MAX_CALLBACK_ATTEMPTS:
                    request.finished_at = utcnow(self.clock)
            if error is not None:
                log.warning("callback %s (%s of %s) failed, attempt %d of %d: %s", callback_id, request.kind, request.dag_id, request.attempts, MAX_CALLBACK_ATTEMPTS, error)
        except Exception:
            log.exception("could not record callback %s", callback_id)


def apply_outcome(ti: TaskInstance, outcome: dict[str, Any], now: datetime) -> None:
    """Record a worker's outcome for ``ti``'s current try (see
    ``hub.worker.execute_task`` for the outcome's shape)."""
    kind = outcome["kind"]
    if outcome.get("rendered_fields") is not None:
        ti.rendered_fields = outcome["rendered_fields"]
    if kind == "reschedule":
        # A sensor between pokes holds no worker, and the poke did not use up
        # a try; its timeout counts from the try's first poke.
        # next_try_at also tells the scheduler's queueing step not to count a new try.
        ti.state, ti.ended_at, ti.next_try_at = TaskState.UP_FOR_RESCHEDULE, now, outcome["reschedule_at"]
        if ti.sensor_started_at is None:
            ti.sensor_started_at = outcome.get("sensor_started_at")
        return
    ti.sensor_started_at = None  # the try is over: a retry's sensor times out afresh
    if kind == "success":
        try:
            # Checked again here (the worker did), and each key of a
            # multiple_outputs dict pushed, in the transaction that records the success.
            session = Session.object_session(ti)
            assert session is not None
            output = record_return(session, ti, outcome.get("output"), multiple_outputs=bool(outcome.get("multiple_outputs")), now=now)
        except XComValueError as exc:
            finish_try(ti, success=False, now=now, error=exc.as_error())
            return
        finish_try(ti, success=True, now=now, output=output)
    elif kind == "skipped":
        ti.state, ti.ended_at, ti.next_try_at, ti.error = TaskState.SKIPPED, now, None, None
    else:
        finish_try(ti, success=False, now=now, error=outcome.get("error"))
