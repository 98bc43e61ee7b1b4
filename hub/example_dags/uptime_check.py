"""uptime_check: run an allow-listed command on one device of the 'demo' site."""

from __future__ import annotations

from hub.dag import DAG, AgentOperator, PythonOperator, any_agent


def report(ti) -> str:  # type: ignore[no-untyped-def]
    result = ti.xcom_pull("uptime")
    return result["stdout"].strip()


with DAG("uptime_check", description="One device runs `uptime`.", tags=["example"]) as dag:
    uptime = AgentOperator(task_id="uptime", job_type="command.run", params={"argv": ["uptime"]}, target=any_agent(site="demo"))
    uptime >> PythonOperator(task_id="report", python_callable=report)
