"""Run parameters never reach a shell string: a hostile value in a run's
conf goes through templating into a device's ``command.run`` as one argv
element, runs as data, and creates nothing."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from firmware_jobs import registry
from shared.clock import ManualClock
from tests.firmware_jobs.conftest import RecordingContext

DAG = """
from hub.sdk import DAG, AgentOperator, Param, on_agent
with DAG("shell_safe", params={"msg": Param("hello", type="string")}) as dag:
    AgentOperator(task_id="echo", job_type="command.run", target=on_agent("a1"),
                  params={"argv": ["echo", "{{ params.msg }}", "--tag={{ dag_run.conf.msg }}"]})
"""


def test_a_hostile_run_param_stays_one_argv_element_and_runs_nothing(make_hub: Any, tmp_path: Path) -> None:
    target = Path("/tmp") / f"outpost-pwned-{uuid.uuid4().hex}"
    hostile = f'"; touch {target}; echo "$(touch {target})` touch {target}`'
    hub = make_hub({"shell_safe.py": DAG})
    hub.agent_online("a1", job_types=("command.run",))
    hub.trigger("shell_safe", {"msg": hostile})
    hub.tick()
    [assign] = [e.body for e in hub.assignments_sent()]
    assert assign.params["argv"] == ["echo", hostile, f"--tag={hostile}"]

    # What the device does with it: the real job, with echo allow-listed.
    work = tmp_path / "work"
    work.mkdir()
    ctx = RecordingContext("a-1", work, ManualClock(0.0), {"command_allowlist": ["echo"], "state_dir": str(tmp_path / "state")})
    job = registry.get("command.run")
    result = job.run(ctx, job.validate(dict(assign.params)))
    assert result["exit_code"] == 0
    assert result["stdout"] == f"{hostile} --tag={hostile}\n"  # printed, not executed
    assert not target.exists()
    assert list(work.iterdir()) == []
