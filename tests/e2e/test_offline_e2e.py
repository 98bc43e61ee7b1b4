"""Offline operation with real processes: correctness never depends on the
broker's session store."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import select

from hub.db import make_engine, make_sessionmaker
from hub.models import Assignment
from shared.clock import SystemClock
from tests.e2e.test_fleet import assert_exactly_once

pytestmark = pytest.mark.e2e

PINNED = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("pinned") as dag:
    AgentOperator(task_id="work", job_type="noop", params={"echo": "kept by the hub"}, target=on_agent("agent-2"))
"""


def assignment_states(f: Any) -> list[str]:
    engine = make_engine(f.db_url)
    try:
        with make_sessionmaker(engine)() as session:
            return list(session.scalars(select(Assignment.state)))
    finally:
        engine.dispose()


def test_work_reaches_a_returning_device_after_the_broker_lost_every_session(fleet: Any) -> None:
    f = fleet({"pinned.py": PINNED})
    # No timed redelivery to lean on: only the re-send on return can bring the work.
    f.config.write_text(f.config.read_text().replace("redeliver_after = 3.0", "redeliver_after = 3600.0"))
    f.start_all(2)
    f.agents["agent-2"].stop()  # a clean stop: offline status; the broker keeps its session
    f.wait(lambda: f.api("GET", "/agents/agent-2")["state"] == "offline", 20, "agent-2 offline")
    run_pk = f.trigger("pinned")
    f.wait(lambda: f.api("GET", f"/runs/{run_pk}")["task_instances"][0]["state"] == "device_offline", 20, "the task to show device offline")
    f.wait(lambda: assignment_states(f) == ["sent"], 20, "the assignment to reach the broker (queued in agent-2's session)")
    # The broker restarts without its persistence file: agent-2's session, and the copy it held, are gone.
    f.broker.stop()
    (f.broker.folder / "mosquitto.db").unlink(missing_ok=True)
    f.broker.start()
    time.sleep(1)
    assert f.api("GET", f"/runs/{run_pk}")["state"] == "running"
    started = time.monotonic()
    f.start_agent("agent-2")
    run = f.wait_run(run_pk, timeout=60)
    assert run["state"] == "success", run
    assert run["task_instances"][0]["output"] == {"echo": "kept by the hub"}
    assert_exactly_once(f, run_pk)
    print(f"agent-2 start to run success: {time.monotonic() - started:.1f}s")


AHEAD = """
from datetime import timedelta
from hub.dag import DAG, AgentOperator, on_agent
with DAG("ahead") as dag:
    AgentOperator(task_id="later", job_type="noop", params={"echo": "on time"}, target=on_agent("agent-1"),
                  not_before=timedelta(seconds=6), deadline=timedelta(minutes=10))
"""


def test_scheduled_ahead_work_is_delivered_at_once_and_starts_at_not_before(fleet: Any) -> None:
    f = fleet({"ahead.py": AHEAD})
    f.start_all(1)
    triggered = SystemClock().now()
    run_pk = f.trigger("ahead")
    f.wait(lambda: f.api("GET", f"/runs/{run_pk}")["task_instances"][0]["state"] == "delivered", 5, "the work to be delivered ahead")
    ti = f.api("GET", f"/runs/{run_pk}")["task_instances"][0]
    assert ti["started_at"] is None  # held on the device until not_before
    run = f.wait_run(run_pk, timeout=30)
    assert run["state"] == "success", run
    started = run["task_instances"][0]["started_at"]
    assert datetime.fromisoformat(started).timestamp() >= triggered + 5  # not before its not_before (the run's logical date + 6 s)
