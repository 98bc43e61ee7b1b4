"""The variables and connections API and CLI: write-only (no answer ever
carries a value), audited, and 503 on a hub without keys."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from hub import vault
from hub.api.app import create_app
from hub.config import HubSettings
from hub.db import transaction
from hub.encryption import parse_keys
from hub.models import AuditRecord, DagRun, TaskInstance
from tests.hub.api_harness import FERNET_KEY, SEEDED_SECRET, Hub, hub, hub_settings, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.test_ctl import Cli

pytestmark = pytest.mark.timeout(60)


def _read_variable(hub: Hub, key: str) -> str | None:
    with hub.sessions() as session:
        return vault.read_variable(session, parse_keys(FERNET_KEY), key)


def _read_connection(hub: Hub, conn_id: str) -> dict[str, Any] | None:
    with hub.sessions() as session:
        return vault.read_connection(session, parse_keys(FERNET_KEY), conn_id)


def test_variables_are_write_only(hub: Hub) -> None:
    with hub.client() as client:
        listed = client.get("/api/v1/variables")
        assert listed.status_code == 200
        assert [(v["key"], v["is_set"], v["sensitive"]) for v in listed.json()["items"]] == [("fleet_api_token", True, True), ("region", True, False)]
        created = client.post("/api/v1/variables", json={"key": "db_password", "value": "pw-created-1", "description": "for the ETL"})
        assert created.status_code == 201 and created.json()["key"] == "db_password" and created.json()["is_set"] is True
        assert client.post("/api/v1/variables", json={"key": "db_password", "value": "x"}).json()["error"]["code"] == "conflict"
        replaced = client.put("/api/v1/variables/db_password", json={"value": "pw-replaced-2"})
        assert replaced.status_code == 200 and replaced.json()["description"] == "for the ETL"  # kept
        shown = client.get("/api/v1/variables/db_password")
        answers = [listed.text, created.text, replaced.text, shown.text, client.get("/api/v1/variables").text]
        for text in answers:
            assert "pw-created-1" not in text and "pw-replaced-2" not in text and SEEDED_SECRET not in text and "eu-central-1" not in text
        assert set(shown.json()) == {"key", "description", "is_set", "sensitive", "created_at", "updated_at"}
        assert _read_variable(hub, "db_password") == "pw-replaced-2"
        assert client.delete("/api/v1/variables/db_password").status_code == 204
        missing = client.get("/api/v1/variables/db_password")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "variable_not_found"
        assert client.put("/api/v1/variables/bad key!", json={"value": "v"}).status_code == 422
        assert client.put("/api/v1/variables/big", json={"value": "x" * (vault.MAX_VALUE_CHARS + 1)}).status_code == 422
        assert client.put("/api/v1/variables/k", json={"value": 5}).status_code == 422  # strict: a string


def test_connections_show_no_password_and_mask_secret_extras(hub: Hub) -> None:
    with hub.client() as client:
        shown = client.get("/api/v1/connections/warehouse").json()
        assert shown["host"] == "db.example" and shown["port"] == 5432 and shown["schema"] == "fleet" and shown["login"] == "etl"
        assert shown["password"] == "***"
        assert shown["extra"] == {"sslmode": "require", "client_secret": "***"}
        created = client.post("/api/v1/connections", json={"conn_id": "weather", "conn_type": "http", "host": "api.example",
                                                           "extra": {"api_key": "ak-created-1", "units": "metric"}})
        assert created.status_code == 201, created.text
        assert created.json()["password"] is None and created.json()["extra"] == {"api_key": "***", "units": "metric"}
        patched = client.patch("/api/v1/connections/warehouse", json={"host": "db2.example"})
        assert patched.status_code == 200 and patched.json()["host"] == "db2.example" and patched.json()["password"] == "***"
        assert _read_connection(hub, "warehouse")["password"] == SEEDED_SECRET + "-pw"  # kept: PATCH changes only what it names
        cleared = client.patch("/api/v1/connections/warehouse", json={"password": None, "schema": None})
        assert cleared.json()["password"] is None and cleared.json()["schema"] is None
        assert client.post("/api/v1/connections", json={"conn_id": "weather"}).status_code == 409
        assert client.patch("/api/v1/connections/nope", json={"host": "h"}).status_code == 404
        assert client.post("/api/v1/connections", json={"conn_id": "x", "port": 70000}).status_code == 422
        assert client.post("/api/v1/connections", json={"conn_id": "x", "secret_field": 1}).status_code == 422
        everything = client.get("/api/v1/connections").text + created.text + json.dumps(shown)
        assert "ak-created-1" not in everything and "cs-seeded-1" not in everything and SEEDED_SECRET not in everything
        assert client.delete("/api/v1/connections/weather").status_code == 204
        assert client.get("/api/v1/connections/weather").json()["error"]["code"] == "connection_not_found"


def test_secret_changes_are_audited_without_values(hub: Hub) -> None:
    with hub.client() as client:
        client.put("/api/v1/variables/api_token", json={"value": "audited-secret-1"})
        client.patch("/api/v1/connections/warehouse", json={"password": "audited-secret-2"})
        client.delete("/api/v1/variables/api_token")
    with hub.sessions() as session:
        rows = session.scalars(select(AuditRecord).order_by(AuditRecord.id)).all()
    assert [(r.action, r.target) for r in rows] == [("variable.create", "api_token"), ("connection.update", "warehouse"), ("variable.delete", "api_token")]
    assert rows[1].detail == {"fields": ["password"]}
    assert "audited-secret" not in repr([(r.detail, r.target) for r in rows])


def test_a_hub_without_keys_answers_503_and_stores_nothing(hub: Hub) -> None:
    app = create_app(hub_settings(database_url=hub.url, fernet_keys=""), hub.sessions, hub.events, hub.clock)
    with TestClient(app, headers={"Authorization": f"Bearer {hub.token()}"}) as client:
        answer = client.put("/api/v1/variables/x", json={"value": "v"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "secrets_unavailable"
        assert client.get("/api/v1/variables").status_code == 200
        shown = client.get("/api/v1/connections/warehouse").json()
        assert shown["password"] == "***" and shown["extra"] is None  # no key: nothing decrypted


def test_run_conf_outputs_and_errors_are_masked_in_the_api_and_dashboard(hub: Hub) -> None:
    assert hub.seeded is not None
    with transaction(hub.sessions) as session:
        run = session.get(DagRun, hub.seeded.run_running)
        run.conf = {"reason": "audit", "password": "conf-pw-123", "note": f"uses {SEEDED_SECRET}"}
        ti = session.scalars(select(TaskInstance).where(TaskInstance.run_pk == run.id, TaskInstance.map_index == 0)).first()
        ti.output = {"echo": SEEDED_SECRET, "auth_token": "device-token-1", "n": 3}
        ti.error = {"code": "exception", "message": f"login {SEEDED_SECRET} refused"}
        ti.rendered_fields = {"params": {"token": SEEDED_SECRET, "host": "db.example"}}
    with hub.client() as client:
        answer = client.get(f"/api/v1/runs/{hub.seeded.run_running}")
        page = client.get(f"/runs/{hub.seeded.run_running}")
    assert answer.status_code == 200 and page.status_code == 200
    for text in (answer.text, page.text):
        assert SEEDED_SECRET not in text and "conf-pw-123" not in text and "device-token-1" not in text
    doc = answer.json()
    assert doc["conf"] == {"reason": "audit", "password": "***", "note": "uses ***"}
    ti_doc = next(t for t in doc["task_instances"] if t["id"] == ti.id)
    assert ti_doc["output"] == {"echo": "***", "auth_token": "***", "n": 3}
    assert ti_doc["error"]["message"] == "login *** refused"
    assert ti_doc["rendered_fields"] == {"params": {"token": "***", "host": "db.example"}}


# --- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli(live_hub: tuple[Hub, str], capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(live_hub[1], capsys)


def test_outpost_variables_commands(cli: Cli, live_hub: tuple[Hub, str], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = live_hub[0]
    assert cli("variables", "set", "region", "eu-west-3", "--description", "main region") == (0, "variable region set\n", "")
    monkeypatch.setattr("sys.stdin", io.StringIO("stdin-secret-1"))
    assert cli("variables", "set", "push_token", "--stdin")[0] == 0
    assert _read_variable(hub, "push_token") == "stdin-secret-1" and _read_variable(hub, "region") == "eu-west-3"
    code, out, _ = cli("variables", "list")
    assert code == 0 and out.splitlines()[0].split() == ["KEY", "SET", "SENSITIVE", "UPDATED", "DESCRIPTION"]
    assert "stdin-secret-1" not in out and "eu-west-3" not in out and "push_token" in out
    assert cli.json("variables", "get", "push_token")["sensitive"] is True
    code, _, err = cli("variables", "set", "x")
    assert code == 2 and "either as an argument or with --stdin" in err
    assert cli("variables", "delete", "region") == (0, "variable region deleted\n", "")
    code, _, err = cli("variables", "get", "region")
    assert code == 3 and "variable_not_found" in err


def test_outpost_connections_commands(cli: Cli, live_hub: tuple[Hub, str], monkeypatch: pytest.MonkeyPatch) -> None:
    hub = live_hub[0]
    monkeypatch.setattr("sys.stdin", io.StringIO("stdin-pw-1\n"))
    code, out, err = cli("connections", "add", "broker", "--type", "mqtt", "--host", "mqtt.example", "--port", "8883", "--login", "hub",
                         "--password-stdin", "--extra", '{"ca_cert_password": "cap-1", "qos": 1}')
    assert (code, out) == (0, "connection broker added\n"), err
    assert _read_connection(hub, "broker")["password"] == "stdin-pw-1"
    shown = cli.json("connections", "get", "broker")
    assert shown["password"] == "***" and shown["extra"] == {"ca_cert_password": "***", "qos": 1}
    assert cli("connections", "update", "broker", "--host", "mqtt2.example")[0] == 0
    assert _read_connection(hub, "broker")["password"] == "stdin-pw-1"
    assert cli("connections", "update", "broker", "--clear-password")[0] == 0
    assert _read_connection(hub, "broker")["password"] is None
    code, out, _ = cli("connections", "list")
    assert code == 0 and "mqtt2.example" in out and "stdin-pw-1" not in out and "cap-1" not in out
    assert cli("connections", "update", "broker")[0] == 2
    assert cli("connections", "add", "bad", "--extra", "[1]")[0] == 2
    assert cli("connections", "delete", "broker") == (0, "connection broker deleted\n", "")
