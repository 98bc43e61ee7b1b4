"""fleet_health: collect diagnostics from every online device, then
summarise the fleet on the hub."""

from __future__ import annotations

from typing import Any

from hub.dag import DAG, AgentOperator, PythonOperator, every_agent


def summarise(ti: Any) -> dict[str, Any]:
    reports: dict[str, Any] = ti.xcom_pull_agents("collect")
    if not reports:
        raise ValueError("no device reported diagnostics")
    free = {agent: r["disk"]["free_bytes"] for agent, r in reports.items()}
    load = {agent: (r.get("load") or [0.0])[0] for agent, r in reports.items()}
    return {
        "devices": len(reports),
        "lowest_free_disk": min(free.items(), key=lambda kv: kv[1]),
        "highest_load": max(load.items(), key=lambda kv: kv[1]),
        "agent_versions": sorted({r["agent_version"] for r in reports.values()}),
    }


with DAG(
    "fleet_health",
    schedule="@hourly",
    description="Diagnostics from every device, summarised on the hub.",
    tags=["fleet", "example"],
    default_args={"retries": 1, "retry_delay": 5},
) as dag:
    collect = AgentOperator(task_id="collect", job_type="diagnostics.collect", target=every_agent(), execution_timeout=60)
    summary = PythonOperator(task_id="summarise", python_callable=summarise)
    collect >> summary
