"""Variables and connections in DAGs: templates (var, conn) and hub-task
code (Variable.get, Connection.get) read them; the device receives what it
needs, humans see ***; template escapes fail the task and never run."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from hub import secretvars, vault
from hub.encryption import parse_keys
from hub.masking import MASK, MASKER
from hub.models import TaskInstance, TaskLogChunk
from shared.messages import LogChunk, Result
from tests.hub.api_harness import Hub

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TOKEN = "fleet-token-5b7e2d"
PASSWORD = "warehouse-pw-91c4"

DAG = """
from hub.sdk import DAG, AgentOperator, Connection, PythonOperator, Variable, mask_secret, on_agent

def use_secrets(**context):
    token = Variable.get("fleet_api_token")
    limits = Variable.get("limits", deserialize_json=True)
    conn = Connection.get("warehouse")
    marked = "dag-marked-value-77"
    mask_secret(marked)
    return {"token": token, "max": limits["max"], "uri": conn.get_uri(), "region": conn.extra_dejson["region"], "marked": marked}

def echo(value, marked):
    return {"value": value, "marked": marked}

with DAG("secrets_dag") as dag:
    AgentOperator(
        task_id="probe", job_type="site.probe", target=on_agent("a1"),
        params={"token": "{{ var.value.fleet_api_token }}", "region": "{{ var.value.region }}", "max": "{{ var.json.limits.max }}",
                "host": "{{ conn.warehouse.host }}", "password": "{{ conn.warehouse.password }}", "fallback": "{{ var.value.get('nope', 'dflt') }}"},
    )
    PythonOperator(task_id="hub_reads", python_callable=use_secrets)
    PythonOperator(task_id="templated_hub", python_callable=echo, op_kwargs={"value": "{{ var.value.fleet_api_token }}", "marked": "plain"})
"""

ESCAPES = """
from hub.sdk import DAG, AgentOperator, PythonOperator, on_agent

def touch(path):
    open(path, "w").write("ran")

with DAG("escapes") as dag:
    AgentOperator(task_id="agent_escape", job_type="site.probe", target=on_agent("a1"),
                  params={"x": "{{ ''.__class__.__mro__[1].__subclasses__() }}"})
    PythonOperator(task_id="hub_escape", python_callable=touch,
                   op_kwargs={"path": "{{ var.__class__.__init__.__globals__['os'].system('touch MARKER') }}MARKER"})
    PythonOperator(task_id="hub_escape_conn", python_callable=touch,
                   op_kwargs={"path": "{{ conn.get.__globals__ }}MARKER"})
"""


@pytest.fixture
def secret_hub(make_hub: Any) -> Iterator[Any]:
    """The tick-by-tick hub with keys: the scheduler renders agent params
    with the process's store, hub tasks read through the executor's."""
    key = Fernet.generate_key().decode()
    cipher = parse_keys(key)
    hubs = []

    def build(dags: dict[str, str]) -> Any:
        hub = make_hub(dags)
        hub.executor.fernet_keys = key
        secretvars.set_default_store(secretvars.SecretStore(hub.sessions, cipher))
        MASKER.set_source(vault.secret_values(hub.sessions, cipher))
        vault.set_variable(hub.sessions, cipher, "fleet_api_token", TOKEN, NOW)
        vault.set_variable(hub.sessions, cipher, "region", "eu-central-1", NOW)
        vault.set_variable(hub.sessions, cipher, "limits", '{"max": 5}', NOW)
        vault.save_connection(hub.sessions, cipher, "warehouse", {"conn_type": "postgres", "host": "db.example", "login": "etl", "port": 5432,
                                                                  "password": PASSWORD, "extra": {"region": "eu"}}, NOW, create=True)
        hubs.append(hub)
        return hub

    yield build
    secretvars.set_default_store(None)
    MASKER.set_source(None)


def _tis(hub: Any, run_pk: int) -> dict[str, TaskInstance]:
    return {ti.task_id: ti for ti in hub.tis(run_pk)}


def _api(hub: Any) -> Any:
    engine = hub.sessions.kw["bind"]
    return Hub(str(engine.url), engine, hub.sessions, hub.clock).client()


def test_templates_and_hub_tasks_read_variables_and_connections(secret_hub: Any) -> None:
    hub = secret_hub({"secrets_dag.py": DAG})
    hub.agent_online("a1", job_types=("site.probe",))
    run_pk = hub.trigger("secrets_dag", {"note": "x"})
    hub.tick()
    # The device gets the real values: it needs them to do the work.
    [assign] = [e.body for e in hub.assignments_sent()]
    assert assign.params == {"token": TOKEN, "region": "eu-central-1", "max": "5", "host": "db.example", "password": PASSWORD, "fallback": "dflt"}
    tis = _tis(hub, run_pk)
    assert tis["hub_reads"].state == "success", tis["hub_reads"].error
    assert tis["hub_reads"].output == {"token": TOKEN, "max": 5, "uri": f"postgres://etl:{PASSWORD}@db.example:5432", "region": "eu", "marked": "dag-marked-value-77"}
    assert tis["templated_hub"].state == "success", tis["templated_hub"].error
    # Hub-task rendered fields are stored masked: they are only for humans.
    assert tis["templated_hub"].rendered_fields["op_kwargs"] == {"value": MASK, "marked": "plain"}
    assert tis["templated_hub"].output == {"value": TOKEN, "marked": "plain"}  # the task itself got the value

    # The device echoes the token in its log and its output.
    hub.send("a1", LogChunk(assign.assignment_id, 0, f"connecting with {TOKEN} and {PASSWORD}\n", final=True))
    hub.send("a1", Result(assign.assignment_id, assign.try_number, "success", output={"used": TOKEN, "api_key": "device-made-key"}))
    hub.tick()
    with _api(hub) as client:
        run = client.get(f"/api/v1/runs/{run_pk}").json()
        text = client.get(f"/api/v1/runs/{run_pk}").text
        probe = next(t for t in run["task_instances"] if t["task_id"] == "probe")
        log = client.get(f"/api/v1/runs/{run_pk}/tasks/{probe['id']}/tries/1/log").json()
    assert TOKEN not in text and PASSWORD not in text
    assert probe["rendered_fields"]["params"]["token"] == MASK and probe["rendered_fields"]["params"]["password"] == MASK
    assert probe["rendered_fields"]["params"]["region"] == "eu-central-1"  # not a secret
    assert probe["output"] == {"used": MASK, "api_key": MASK}
    assert log["logs"][0]["text"] == f"connecting with {MASK} and {MASK}\n"
    hub_reads = next(t for t in run["task_instances"] if t["task_id"] == "hub_reads")
    assert hub_reads["output"]["token"] == MASK and PASSWORD not in hub_reads["output"]["uri"]
    # The stored chunk is masked too: the secret never reaches the log table.
    with hub.sessions() as session:
        assert list(session.scalars(select(TaskLogChunk.data))) == [f"connecting with {MASK} and {MASK}\n"]


def test_a_missing_variable_fails_the_task_with_a_template_error(secret_hub: Any) -> None:
    hub = secret_hub({"m.py": 'from hub.sdk import DAG, AgentOperator, on_agent\nwith DAG("m") as dag:\n'
                             '    AgentOperator(task_id="t", job_type="site.probe", target=on_agent("a1"), params={"x": "{{ var.value.nope }}"})\n'})
    hub.agent_online("a1", job_types=("site.probe",))
    run_pk = hub.trigger("m")
    hub.tick()
    [ti] = hub.tis(run_pk)
    assert ti.state == "failed" and ti.error["code"] == "template_error" and "'nope' does not exist" in ti.error["message"]
    assert hub.assignments_sent() == []


def test_template_escapes_fail_the_task_and_never_run(secret_hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hub = secret_hub({"escapes.py": ESCAPES})
    hub.agent_online("a1", job_types=("site.probe",))
    run_pk = hub.trigger("escapes")
    hub.tick()
    tis = _tis(hub, run_pk)
    for task_id in ("agent_escape", "hub_escape", "hub_escape_conn"):
        assert tis[task_id].state == "failed", task_id
        assert tis[task_id].error["code"] == "template_error", tis[task_id].error
        assert tis[task_id].error["retryable"] is False
        assert "unsafe" in tis[task_id].error["message"] or "SecurityError" in tis[task_id].error["message"], tis[task_id].error
    assert hub.assignments_sent() == []
    assert not (tmp_path / "MARKER").exists() and list(tmp_path.glob("*MARKER*")) == []
