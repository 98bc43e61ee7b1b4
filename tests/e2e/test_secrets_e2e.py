"""End to end: a secret set through the API reaches the device that needs
it and hub-task code, and is masked in the hub processes' logs (the
scheduler's and its workers') and in the API."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.e2e

SECRET = "e2e-device-token-6c2f9a"

DAG = """
import logging
from hub.sdk import DAG, AgentOperator, PythonOperator, Variable, any_agent

def leaky():
    token = Variable.get("device_token")
    logging.getLogger("dag.leaky").warning("calling the API with %s", token)
    raise RuntimeError("the API refused " + token)

with DAG("secret_e2e") as dag:
    AgentOperator(task_id="use", job_type="noop", params={"echo": "{{ var.value.device_token }}"}, target=any_agent())
    PythonOperator(task_id="leaky", python_callable=leaky, retries=0)
"""


def test_a_secret_reaches_the_device_and_hub_code_and_never_the_logs_or_the_api(fleet: Any) -> None:
    f = fleet({"secret_e2e.py": DAG})
    f.start_all(1)
    assert f.api("PUT", "/variables/device_token", json={"value": SECRET})["sensitive"] is True
    run_pk = f.trigger("secret_e2e")
    run = f.wait_run(run_pk)
    tasks = {t["task_id"]: t for t in run["task_instances"]}
    assert tasks["use"]["state"] == "success" and tasks["use"]["output"] == {"echo": "***"}
    tis, _ = f.results(run_pk)
    assert next(t for t in tis if t.task_id == "use").output == {"echo": SECRET}  # the device got the value and echoed it
    assert tasks["leaky"]["state"] == "failed" and tasks["leaky"]["error"]["message"] == "RuntimeError: the API refused ***"
    f.wait(lambda: "calling the API with ***" in f.log("scheduler"), 10, "the worker's log line")
    for role in ("scheduler", "api"):
        assert SECRET not in f.log(role), role
