"""The conflict rule against the real hub, as a hypothesis state machine.

Hub decisions (automatic give-ups, operator mark / clear / cancel),
devices finishing tries while offline, their results delivered late,
duplicated and in any order, and restarts of the hub's ingester and
scheduler (new objects on the same SQLite database) interleave at random.
After every step the hub's stored state must be what
``shared.conflicts.resolve`` gives for the reports it holds, each
override must have exactly one conflict record, and no record may exist
that the rule never asked for.
"""

from __future__ import annotations

from shared.frames import unsigned_part

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from sqlalchemy import select

from hub import actions, lifecycle, reconcile
from hub.dagprocessor import SerializedDagBag
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.dispatcher import Dispatcher
from hub.events import EventBus
from hub.executor import LocalExecutor
from hub.hubkeys import LiveRing
from hub.ingest import Ingester
from hub.security import Throttle
from hub.models import Assignment, ConflictRecord, Decision, OutboxMessage, TaskInstance, TaskResult
from hub.scheduler import Scheduler, trigger_run
from shared.clock import ManualClock, utcnow
from shared.conflicts import resolve
from shared.envelope import decode
from shared.hlc import HybridClock
from shared.messages import Result
from shared.states import TaskState
from tests.hub.conftest import HubHarness, RecordingLink

pytestmark = pytest.mark.timeout(120)

DAG = """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent
with DAG("sm", default_args={"retries": 2, "retry_delay": 0}) as dag:
    t = AgentOperator(task_id="t", job_type="noop", target=any_agent())
    t >> PythonOperator(task_id="after", python_callable=lambda ti: ti.xcom_pull("t"))
"""
AGENTS = ("a1", "a2", "a3")
START = 1_767_225_600.0
RARELY = st.sampled_from([False, False, False, True])

_template: dict[str, Path] = {}


def template() -> tuple[Path, Path]:
    """A migrated database with the DAG parsed, made once per session."""
    if not _template:
        root = Path(tempfile.mkdtemp(prefix="outpost_sm_"))
        folder = root / "dags"
        folder.mkdir()
        (folder / "sm.py").write_text(DAG)
        db = root / "template.db"
        url = f"sqlite:///{db}"
        upgrade(url)
        clock = ManualClock(START)
        engine = make_engine(url)
        hub = _assemble(make_sessionmaker(engine), clock, folder, RecordingLink(), [])
        hub.scheduler.parse_dags(utcnow(clock), force=True)
        engine.dispose()
        _template.update(db=db, folder=folder)
    return _template["db"], _template["folder"]


def _assemble(sessions: Any, clock: ManualClock, folder: Path, link: RecordingLink, queue: list[int]) -> HubHarness:
    events = EventBus()
    hlc = HybridClock("hub", lambda: int(clock.now() * 1000))
    scheduler = Scheduler(sessions, SerializedDagBag(folder), Dispatcher(hlc, 256 * 1024), clock, events, queue.append)
    keyring = LiveRing(Path(tempfile.mkdtemp(prefix="outpost_sm_keys_")))
    ingester = Ingester(sessions, link, clock, hlc, events, keyring=keyring, security_throttle=Throttle(every=0))  # type: ignore[arg-type]
    return HubHarness(sessions, clock, scheduler, ingester, LocalExecutor(sessions, clock, events), link, queue, keyring)


class ConflictMachine(RuleBasedStateMachine):
    @initialize()
    def start(self) -> None:
        db, self.folder = template()
        self.root = Path(tempfile.mkdtemp(prefix="outpost_sm_run_"))
        shutil.copy(db, self.root / "hub.db")
        self.engine = make_engine(f"sqlite:///{self.root / 'hub.db'}")
        self.clock = ManualClock(START + 10)
        self.hub = _assemble(make_sessionmaker(self.engine), self.clock, self.folder, RecordingLink(), [])
        for agent in AGENTS:
            self.hub.agent_online(agent)
        self.run_pk = self.hub.trigger("sm")
        self.hub.tick()
        #: Results devices hold in their outboxes (assignment id -> result), delivered or not.
        self.finished: dict[str, Result] = {}
        self.finished_by: dict[str, str] = {}
        self.delivered: set[str] = set()
        self.decisions_made = 0
        #: Every override key the rule has asked for so far.
        self.ever: set[str] = set()

    def teardown(self) -> None:
        if hasattr(self, "engine"):
            self.engine.dispose()
            shutil.rmtree(self.root, ignore_errors=True)

    def _step(self) -> None:
        # Distinct wall milliseconds per step: hub stamps from the API's clock
        # and the ingester's clock then order the way the steps happened.
        self.clock.advance(0.002)

    def _ti(self, session: Any) -> TaskInstance:
        return session.scalar(select(TaskInstance).where(TaskInstance.run_pk == self.run_pk, TaskInstance.task_id == "t"))

    def _assignments(self) -> list[tuple[str, str, int]]:
        with self.hub.sessions() as session:
            rows = session.scalars(select(OutboxMessage).order_by(OutboxMessage.id)).all()
        out = []
        for row in rows:
            env = decode(unsigned_part(row.payload))
            if env.type == "assign":
                out.append((row.topic.split("/")[3], env.body.assignment_id, env.body.try_number))
        return list(dict.fromkeys(out))

    # --- the hub ------------------------------------------------------------

    @rule()
    def tick(self) -> None:
        self._step()
        self.hub.tick(2)

    @rule()
    def hub_times_out(self) -> None:
        self.hub_gives_up("execution_timeout")

    @rule()
    def hub_gives_up_on_an_offline_device(self) -> None:
        self.hub_gives_up("offline_grace")

    def hub_gives_up(self, kind: str) -> None:
        self._step()
        with transaction(self.hub.sessions) as session:
            ti = self._ti(session)
            if ti.state not in (TaskState.QUEUED, TaskState.DELIVERED, TaskState.RUNNING):
                return
            lifecycle.abandon_try(session, ti, utcnow(self.clock), self.hub.ingester.hlc, kind, "gave up")
        self.decisions_made += 1

    # Operators act rarely (a drawn "not now" most of the time), so that
    # devices and automatic decisions get to disagree between their actions.
    @rule(state=st.sampled_from(["success", "failed", "skipped"]), now=RARELY)
    def operator_marks(self, state: str, now: bool) -> None:
        self._step()
        if not now:
            return
        changed = actions.mark(self.hub.sessions, self.hub.ingester.events, self.clock, self.run_pk, state, task_ids=["t"])
        self.decisions_made += len(changed)

    @rule(now=RARELY)
    def operator_clears(self, now: bool) -> None:
        self._step()
        if not now:
            return
        changed = actions.clear(self.hub.sessions, self.hub.ingester.events, self.clock, self.run_pk, task_ids=["t"], include_downstream=True)
        self.decisions_made += sum(1 for c in changed if c["task_id"] == "t")

    @rule(now=RARELY)
    def operator_cancels_the_run(self, now: bool) -> None:
        self._step()
        if not now:
            return
        from hub.models import DagRun

        with self.hub.sessions() as session:
            if session.get(DagRun, self.run_pk).state not in ("running", "queued"):
                return
        changed = actions.set_run_state(self.hub.sessions, self.hub.ingester.events, self.clock, self.run_pk, "failed")
        self.decisions_made += sum(1 for c in changed if c["task_id"] == "t")

    @rule()
    def hub_restarts(self) -> None:
        self._step()
        self.hub = _assemble(self.hub.sessions, self.clock, self.folder, self.hub.link, self.hub.hub_queue)

    # --- the devices --------------------------------------------------------------

    @rule(data=st.data(), status=st.sampled_from(["success", "success", "failed"]))
    def device_finishes(self, data: st.DataObject, status: str) -> None:
        """A device runs a try it holds, offline or not, whatever the hub decided meanwhile."""
        self._step()
        open_ = [a for a in self._assignments() if a[1] not in self.finished]
        if not open_:
            return
        agent, assignment_id, try_number = data.draw(st.sampled_from(open_))
        self.finished[assignment_id] = Result(assignment_id, try_number, status, {"by": agent, "try": try_number} if status == "success" else None)
        self.finished_by[assignment_id] = agent

    @rule(data=st.data())
    def device_finishes_a_try_the_hub_took_back(self, data: st.DataObject) -> None:
        """The interesting case, made likely: a device that was offline
        succeeds at a try the hub gave up, cancelled or cleared meanwhile."""
        self._step()
        with self.hub.sessions() as session:
            taken_back = set(session.scalars(select(Assignment.id).where(Assignment.state == "cancelled")))
        candidates = [a for a in self._assignments() if a[1] in taken_back and a[1] not in self.finished]
        if not candidates:
            return
        agent, assignment_id, try_number = data.draw(st.sampled_from(candidates))
        self.finished[assignment_id] = Result(assignment_id, try_number, "success", {"by": agent, "try": try_number})
        self.finished_by[assignment_id] = agent

    @precondition(lambda self: bool(self.finished))
    @rule(data=st.data())
    def device_delivers(self, data: st.DataObject) -> None:
        """Any result, in any order, once or again (a lost ack)."""
        self._step()
        assignment_id = data.draw(st.sampled_from(sorted(self.finished)))
        self.hub.send(self.finished_by[assignment_id], self.finished[assignment_id])
        self.delivered.add(assignment_id)

    @rule(agent=st.sampled_from(AGENTS))
    def agent_restarts(self, agent: str) -> None:
        """Its outbox survives; its clock starts again from the wall clock."""
        self._step()
        self.hub.agent_clocks.pop(agent, None)

    # --- what must hold -------------------------------------------------------------

    @invariant()
    def hub_holds_what_the_rule_gives(self) -> None:
        if not hasattr(self, "hub"):
            return
        with self.hub.sessions() as session:
            ti = self._ti(session)
            reports, results = reconcile.load_reports(session, ti.id)
            resolution = resolve(reports)
            stored = list(session.scalars(select(ConflictRecord.key).where(ConflictRecord.ti_id == ti.id)))
            decisions = session.scalars(select(Decision)).all()
            result_ids = set(session.scalars(select(TaskResult.assignment_id)))
        assert result_ids == self.delivered, "every delivered result is stored, once"
        assert len(decisions) == self.decisions_made
        if resolution.state is not None:
            assert ti.state == resolution.state, (ti.state, resolution)
        if resolution.output_from is not None:
            assert ti.output == results[resolution.output_from.ref].output
        self.ever |= {o.key for o in resolution.overrides}
        assert len(stored) == len(set(stored)), "one record per override"
        assert {o.key for o in resolution.overrides} <= set(stored), "every override is recorded"
        assert set(stored) <= self.ever, "no record the rule never asked for"


ConflictMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_conflicts_state_machine = ConflictMachine.TestCase
