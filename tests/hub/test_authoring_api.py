"""Run conf against DAG params through the REST API: an invalid conf is a
422 naming the param, a valid one is stored merged with the defaults."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from hub.dag import DAG, EmptyOperator
from hub.db import transaction
from hub.models import Dag, DagRun
from hub.params import Param
from tests.hub.api_harness import Hub, hub, seed, seeded_sqlite_template  # noqa: F401  (fixtures)


def add_dag_with_params(target: Hub) -> None:
    with DAG("with_params", params={"limit": Param(5, type="integer", minimum=1), "site": Param("a", enum=["a", "b"])}) as d:
        EmptyOperator(task_id="t")
    d.validate()
    with transaction(target.sessions) as session:
        session.add(Dag(dag_id="with_params", fileloc="/dags/with_params.py", structure=d.serialize(), last_parsed_at=datetime(2026, 1, 1, tzinfo=UTC)))


def test_trigger_rejects_conf_that_breaks_a_param_schema(hub: Hub) -> None:  # noqa: F811
    add_dag_with_params(hub)
    with hub.client() as client:
        response = client.post("/api/v1/dags/with_params/runs", json={"conf": {"limit": 0, "site": "c"}})
        assert response.status_code == 422, response.text
        error: dict[str, Any] = response.json()["error"]
        assert error["code"] == "invalid_request"
        assert "'limit'" in error["message"] and "minimum" in error["message"] and "'site'" in error["message"]
        with hub.sessions() as session:
            assert session.scalars(select(DagRun).where(DagRun.dag_id == "with_params")).all() == []
        response = client.post("/api/v1/dags/with_params/runs", json={"conf": {"limit": 2, "note": "{{ not rendered }}"}})
        assert response.status_code == 201, response.text
    with hub.sessions() as session:
        run = session.scalars(select(DagRun).where(DagRun.dag_id == "with_params")).one()
        assert run.conf == {"limit": 2, "note": "{{ not rendered }}"}
        assert run.params == {"limit": 2, "site": "a", "note": "{{ not rendered }}"}
