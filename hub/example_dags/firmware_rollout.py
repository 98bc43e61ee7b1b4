"""firmware_rollout: a staged firmware update of every demo board.

One canary device first, then batches of half the rest; the rollout stops
notifying devices once more than 40% of the finished ones failed. Each
device downloads ``demo-fw-1.1.0`` from the hub's artifact store, checks
the release signature against the release key it trusts, installs it into
its inactive slot, switches, runs its health check, and commits or rolls
back by itself. Triggered by hand (``outpost dags trigger firmware_rollout``)
or by the standalone demo; watch it at /rollouts.
"""

from __future__ import annotations

from hub.dag import DAG, AgentOperator, Rollout, every_agent

with DAG(
    "firmware_rollout",
    schedule=None,
    description="Staged update of every demo board to demo-fw 1.1.0: canary, batches, abort threshold.",
    tags=["fleet", "firmware", "example"],
):
    AgentOperator(
        task_id="update",
        job_type="firmware.update",
        target=every_agent(hardware=["demo-board"]),
        params={"artifact_id": "demo-fw-1.1.0", "health_timeout": 5},
        rollout=Rollout(canary=1, batch_size="50%", failure_threshold=0.4, success_threshold=0.5, deadline=600),
        # A device that drops offline mid-update keeps its place until the deadline.
        offline_grace=600,
    )
