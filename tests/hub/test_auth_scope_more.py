"""Scope (DAG tags, device groups) on import errors, rejected messages,
security events, assets and backfills: out of scope is left out of lists and
404 on detail, in the API and on the dashboard (real app and SQLite)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.testclient import TestClient

from hub.db import transaction
from hub.models import Agent, Asset, AssetEvent, Backfill, DagImportError, RejectedMessage, SecurityEvent
from tests.hub.api_harness import Hub, hub, seeded_sqlite_template  # noqa: F401  (fixtures)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def scoped(hub: Hub, name: str, **scope: list[str]) -> TestClient:
    with hub.client() as admin:
        made = admin.post("/api/v1/users", json={"name": name, "password": f"{name}-password", "role": "operator", **scope})
        assert made.status_code == 201, made.text
        secret = admin.post("/api/v1/tokens", json={"user": name, "name": "t"}).json()["token"]
    return hub.client(role=None, headers={"Authorization": f"Bearer {secret}"})


def seed_more(hub: Hub) -> dict[str, int]:
    """edge-1 is in group berlin, edge-3 in munich; fleet_health has tag fleet, reboot_one none."""
    with transaction(hub.sessions) as s:
        for agent_id, group in (("edge-1", "berlin"), ("edge-3", "munich")):
            agent = s.get(Agent, agent_id)
            assert agent is not None
            agent.labels = {**agent.labels, "group": group}
        s.add(DagImportError(fileloc="/dags/fleet_health.py", kind="syntax", error="fleet file broke", recorded_at=T0))
        s.add(DagImportError(fileloc="/dags/reboot.py", kind="syntax", error="reboot file broke", recorded_at=T0))
        s.add(RejectedMessage(source="mqtt", topic="outpost/v1/agents/edge-1/events", agent_id="edge-1", code="berlin_code", detail="", excerpt="", received_at=T0))
        for agent_id, code in (("edge-1", "code_berlin"), ("edge-3", "code_munich"), (None, "code_nobody")):
            s.add(SecurityEvent(at=T0, agent_id=agent_id, source="mqtt", code=code, detail="d", excerpt=""))
        fleet = Backfill(dag_id="fleet_health", from_date=T0, to_date=T0, created_at=T0)
        reboot = Backfill(dag_id="reboot_one", from_date=T0, to_date=T0, created_at=T0)
        assets = {uri: Asset(uri=uri, created_at=T0) for uri in ("s3://fleet/out", "s3://reboot/out", "s3://external/in")}
        s.add_all([fleet, reboot, *assets.values()])
        s.flush()
        s.add(AssetEvent(asset_id=assets["s3://fleet/out"].id, source_dag_id="fleet_health", source_agent_id="edge-1", timestamp=T0))
        s.add(AssetEvent(asset_id=assets["s3://fleet/out"].id, source_dag_id="fleet_health", source_agent_id="edge-3", timestamp=T0))
        s.add(AssetEvent(asset_id=assets["s3://fleet/out"].id, timestamp=T0))  # external update of an asset in scope
        s.add(AssetEvent(asset_id=assets["s3://reboot/out"].id, source_dag_id="reboot_one", timestamp=T0))
        s.add(AssetEvent(asset_id=assets["s3://external/in"].id, timestamp=T0))
        return {"fleet": fleet.id, "reboot": reboot.id}


def test_import_errors_follow_the_dags_of_their_file(hub: Hub) -> None:
    seed_more(hub)
    with hub.client() as admin:
        assert {e["fileloc"] for e in admin.get("/api/v1/import-errors").json()["items"]} == {"/dags/broken.py", "/dags/fleet_health.py", "/dags/reboot.py"}
    with scoped(hub, "fleet-ops", scope_tags=["fleet"]) as client:
        page = client.get("/api/v1/import-errors").json()
        # A file that never parsed has no DAG, hence no tags: left out too.
        assert [e["fileloc"] for e in page["items"]] == ["/dags/fleet_health.py"] and page["total"] == 1
        html = client.get("/").text
        assert "fleet file broke" in html and "reboot file broke" not in html and "broken.py" not in html
    with scoped(hub, "berlin-only", scope_groups=["berlin"]) as client:  # import errors belong to no device
        assert client.get("/api/v1/import-errors").json()["total"] == 3


def test_rejected_messages_and_security_events_follow_the_device_group(hub: Hub) -> None:
    seed_more(hub)
    with scoped(hub, "berlin-ops", scope_groups=["berlin"]) as client:
        rejected = client.get("/api/v1/rejected").json()
        assert [r["agent_id"] for r in rejected["items"]] == ["edge-1"] and rejected["total"] == 1
        assert rejected["counts"] == {"berlin_code": 1}  # no counts of other devices' rejections
        assert client.get("/api/v1/rejected", params={"agent_id": "edge-2"}).json()["items"] == []
        events = client.get("/api/v1/security-events").json()
        assert [e["agent_id"] for e in events["items"]] == ["edge-1"] and events["counts"] == {"code_berlin": 1} and events["total"] == 1
        page = client.get("/security").text
        assert "code_berlin" in page and "code_munich" not in page and "code_nobody" not in page
    with scoped(hub, "fleet-only", scope_tags=["fleet"]) as client:  # they belong to no DAG
        assert client.get("/api/v1/rejected").json()["total"] == 4
        assert client.get("/api/v1/security-events").json()["total"] == 3


def test_backfills_follow_their_dag(hub: Hub) -> None:
    ids = seed_more(hub)
    with scoped(hub, "fleet-ops", scope_tags=["fleet"]) as client:
        page = client.get("/api/v1/backfills").json()
        assert [b["id"] for b in page["items"]] == [ids["fleet"]] and page["total"] == 1
        assert client.get(f"/api/v1/backfills/{ids['fleet']}").status_code == 200
        hidden = client.get(f"/api/v1/backfills/{ids['reboot']}")
        missing = client.get("/api/v1/backfills/999999")
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "backfill_not_found"
        assert "reboot_one" not in hidden.text
        paused = client.put(f"/api/v1/backfills/{ids['reboot']}/pause")
        assert paused.status_code == 404 and "reboot_one" not in paused.text
        dry = client.post("/api/v1/backfills/dry_run", json={"dag_id": "reboot_one", "from_date": "2025-12-31T10:00:00Z", "to_date": "2025-12-31T12:00:00Z"})
        assert dry.status_code == 404 and dry.json()["error"]["code"] == "dag_not_found"


def test_assets_and_their_events_follow_the_dags_and_devices(hub: Hub) -> None:
    seed_more(hub)
    with hub.client() as admin:
        assert admin.get("/api/v1/assets").json()["total"] == 3
    with scoped(hub, "fleet-berlin", scope_tags=["fleet"], scope_groups=["berlin"]) as client:
        assets = client.get("/api/v1/assets").json()
        assert [a["uri"] for a in assets["items"]] == ["s3://fleet/out"] and assets["total"] == 1
        assert assets["items"][0]["event_count"] == 2  # its external event and edge-1's; not munich's edge-3
        events = client.get("/api/v1/assets/events").json()
        assert sorted((e["uri"], e["source_agent_id"] or "") for e in events["items"]) == [("s3://fleet/out", ""), ("s3://fleet/out", "edge-1")]
        assert client.get("/api/v1/assets/events", params={"uri": "s3://reboot/out"}).json()["total"] == 0
    with scoped(hub, "munich-only", scope_groups=["munich"]) as client:  # assets belong to no device; events from devices do
        assert client.get("/api/v1/assets").json()["total"] == 3
        agents = {e["source_agent_id"] for e in client.get("/api/v1/assets/events").json()["items"]}
        assert agents == {None, "edge-3"}
