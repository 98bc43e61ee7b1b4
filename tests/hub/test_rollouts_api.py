"""The rollouts API and the ``outpost rollouts`` CLI over a rollout made by
the real scheduler: list, detail, devices, pause/resume/abort with role
checks and audit records, and the error shape."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from hub.ctl import main
from hub.models import AuditRecord
from tests.hub.api_harness import Hub, LiveServer
from tests.hub.test_rollouts import dag, fleet, open_work, succeed_all

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def api(make_hub: Any) -> Iterator[tuple[Any, Hub]]:
    """A rollout of 6 devices with its canary sent, and the API over the same database."""
    harness = make_hub(dag("canary=1, batch_size=2, failure_threshold=0.25"))
    fleet(harness, 6)
    harness.trigger("fw")
    harness.tick()
    engine = harness.sessions.kw["bind"]
    yield harness, Hub(engine.url.render_as_string(hide_password=False), engine, harness.sessions, harness.clock)


def test_list_detail_and_devices(api: tuple[Any, Hub]) -> None:
    harness, hub = api
    client = hub.client("viewer")
    page = client.get("/api/v1/rollouts").json()
    assert page["total"] == 1
    item = page["items"][0]
    assert (item["dag_id"], item["task_id"], item["state"], item["phase"], item["batch"], item["batch_target"]) == ("fw", "update", "running", "canary", 0, 1)
    assert item["counts"] == {"pending": 5, "notified": 1, "succeeded": 0, "failed": 0, "timed_out": 0, "skipped": 0}
    assert client.get("/api/v1/rollouts", params={"state": "paused"}).json()["total"] == 0
    assert client.get("/api/v1/rollouts", params={"dag_id": "fw"}).json()["total"] == 1
    bad = client.get("/api/v1/rollouts", params={"state": "exploded"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
    succeed_all(harness)
    detail = client.get(f"/api/v1/rollouts/{item['id']}").json()
    assert (detail["phase"], detail["batch"], detail["failure_rate"], detail["failure_threshold"]) == ("batches", 1, 0.0, 0.25)
    assert detail["policy"]["canary"] == 1 and detail["selector"]["labels"] == {}
    assert detail["batches"] == [{"batch": 0, "counts": {"succeeded": 1}}, {"batch": 1, "counts": {"notified": 2}}]
    devices = client.get(f"/api/v1/rollouts/{item['id']}/devices", params={"state": "notified"}).json()
    assert [(d["agent_id"], d["batch"], d["try_number"], d["ti_state"]) for d in devices["items"]] == [("dev001", 1, 1, "queued"), ("dev002", 1, 1, "queued")]
    assert devices["items"][0]["run_pk"] == item["run_pk"] and devices["items"][0]["map_index"] == 1
    paged = client.get(f"/api/v1/rollouts/{item['id']}/devices", params={"limit": 2, "offset": 4}).json()
    assert (paged["total"], [d["agent_id"] for d in paged["items"]]) == (6, ["dev004", "dev005"])
    missing = client.get("/api/v1/rollouts/999")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "rollout_not_found"


def test_pause_resume_abort_need_the_operator_role_and_are_audited(api: tuple[Any, Hub]) -> None:
    harness, hub = api
    rollout_id = hub.client("viewer").get("/api/v1/rollouts").json()["items"][0]["id"]
    refused = hub.client("viewer").post(f"/api/v1/rollouts/{rollout_id}/pause")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "forbidden"
    operator = hub.client("operator")
    paused = operator.post(f"/api/v1/rollouts/{rollout_id}/pause", json={"reason": "night shift"}).json()
    assert (paused["state"], paused["reason"]) == ("paused", "night shift")
    again = operator.post(f"/api/v1/rollouts/{rollout_id}/pause")
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    succeed_all(harness)
    assert open_work(harness) == {}  # paused: the canary passed, nothing new was sent
    assert operator.post(f"/api/v1/rollouts/{rollout_id}/resume").json()["state"] == "running"
    harness.tick()
    assert len(open_work(harness)) == 2
    assert operator.post(f"/api/v1/rollouts/{rollout_id}/abort", json={"reason": "x" * 501}).status_code == 422
    assert operator.post(f"/api/v1/rollouts/{rollout_id}/abort", json={"reason": 5}).status_code == 422
    aborted = operator.post(f"/api/v1/rollouts/{rollout_id}/abort", json={"reason": "bad build"}).json()
    assert (aborted["state"], aborted["reason"], aborted["counts"]["skipped"], aborted["actor"]) == ("aborted", "bad build", 3, "user:test-operator")
    assert operator.post(f"/api/v1/rollouts/{rollout_id}/resume").status_code == 409
    with hub.sessions() as session:
        audit = [(a.actor, a.action, a.target, a.detail["reason"]) for a in session.scalars(select(AuditRecord).where(AuditRecord.action.startswith("rollout.")).order_by(AuditRecord.id))]
    assert audit == [
        ("user:test-operator", "rollout.pause", f"rollout:{rollout_id}", "night shift"),
        ("user:test-operator", "rollout.resume", f"rollout:{rollout_id}", ""),
        ("user:test-operator", "rollout.abort", f"rollout:{rollout_id}", "bad build"),
    ]


def test_the_cli(api: tuple[Any, Hub], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    harness, hub = api
    monkeypatch.setenv("OUTPOST_TOKEN", hub.token("operator"))
    with LiveServer(hub.app) as server:
        def cli(*argv: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = main(["--hub", server.url, *argv])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, _ = cli("rollouts", "list")
        assert code == 0 and out.splitlines()[0].split() == ["ID", "DAG_ID", "RUN", "TASK", "STATE", "PHASE", "BATCH", "DEVICES", "FAILED/THRESHOLD", "STARTED"]
        assert "running  canary" in out and "5 pending 1 notified" in out and "0.0% / 25.0%" in out
        rollout_id = json.loads(cli("rollouts", "list", "-o", "json")[1])["items"][0]["id"]
        code, out, _ = cli("rollouts", "show", str(rollout_id))
        assert code == 0 and "batch:" in out and "0 (takes 1)" in out
        code, out, _ = cli("rollouts", "devices", str(rollout_id), "--state", "notified")
        assert code == 0 and "dev000" in out and "dev001" not in out
        code, out, _ = cli("rollouts", "pause", str(rollout_id), "--reason", "checking")
        assert code == 0 and "paused" in out and "checking" in out
        code, _, err = cli("rollouts", "pause", str(rollout_id))
        assert code != 0 and "cannot be paused" in err
        assert cli("rollouts", "resume", str(rollout_id))[0] == 0
        assert cli("rollouts", "abort", str(rollout_id), "-o", "json")[0] == 0
        code, _, err = cli("rollouts", "show", "999")
        assert code != 0 and "no rollout 999" in err
