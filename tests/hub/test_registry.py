"""The device registry on the hub: inventories from heartbeats and statuses
stored (bounded, unknown keys kept), groups set by operators (audited), and
the agent list filtered by labels, groups, hardware, firmware range, online
state, job type and text, a page at a time; API and operator CLI."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from hub import fleet
from hub.db import transaction
from hub.models import Agent, AuditRecord, RejectedMessage
from shared.clock import to_datetime
from shared.messages import Heartbeat, JobTypeInfo, Status
from shared.topics import status_topic
from tests.hub.api_harness import START, Hub, hub, live_hub, open_hub, seed, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.conftest import fresh_pg_database
from tests.hub.test_ctl import Cli, cli  # noqa: F401  (fixture)

INVENTORY = {
    "hardware_model": "rpi4", "firmware_version": "1.2.0", "agent_version": "0.1.0", "job_types": {"noop": "1"},
    "disk_free_bytes": 5_000_000_000, "mem_free_bytes": 300_000_000, "mem_total_bytes": 1_000_000_000,
}


# --- storage, through real ingestion ----------------------------------------------


def stored(harness: Any, agent_id: str = "a1") -> Agent:
    with harness.sessions() as session:
        agent = session.get(Agent, agent_id)
        session.expunge(agent)
        return agent


def test_status_and_heartbeat_inventories_are_stored_with_indexed_copies(make_hub: Any) -> None:
    harness = make_hub({})
    status = Status("online", "0.1.0", "gw", {}, (JobTypeInfo("noop", "1"),), {**INVENTORY, "sensor_count": 4})
    harness.send("a1", status, topic=status_topic("a1"))
    agent = stored(harness)
    assert agent.inventory["sensor_count"] == 4  # keys this hub does not know are kept
    assert (agent.hardware_model, agent.firmware_version) == ("rpi4", "1.2.0")
    harness.clock.advance(5)
    harness.send("a1", Heartbeat("0.1.0", inbox_depth=2, inventory={**INVENTORY, "firmware_version": "1.3.0", "hardware_model": "x" * 300}))
    agent = stored(harness)
    assert agent.firmware_version == "1.3.0" and agent.hardware_model == "x" * 100  # cut to the column
    assert agent.inventory["hardware_model"] == "x" * 300
    assert agent.last_heartbeat["inbox_depth"] == 2 and "inventory" not in agent.last_heartbeat
    harness.clock.advance(5)
    harness.send("a1", Heartbeat("0.1.0", inbox_depth=1))  # an agent from before the registry: the inventory stays
    assert stored(harness).firmware_version == "1.3.0"


def test_an_oversize_inventory_is_not_stored_and_is_recorded_once(make_hub: Any) -> None:
    harness = make_hub({})
    harness.send("a1", Status("online", "0.1.0", "gw", {}, (), INVENTORY), topic=status_topic("a1"))
    huge = {**INVENTORY, "firmware_version": "9.9.9", "blob": "b" * (fleet.MAX_INVENTORY_BYTES + 1)}
    for _ in range(3):
        harness.clock.advance(5)
        harness.send("a1", Heartbeat("0.1.0", inbox_depth=7, inventory=huge))
    agent = stored(harness)
    assert agent.firmware_version == "1.2.0" and "blob" not in agent.inventory  # the previous one stays
    assert agent.last_heartbeat["inbox_depth"] == 7  # the heartbeat itself still applies
    with harness.sessions() as session:
        rows = session.scalars(select(RejectedMessage).where(RejectedMessage.code == "inventory_too_large")).all()
    assert len(rows) == 1 and rows[0].agent_id == "a1" and "exceeds the limit of 8192" in rows[0].detail
    assert harness.ingester.counters["rejected.inventory_too_large"] == 3


def test_group_names_are_checked_deduplicated_and_bounded() -> None:
    assert fleet.check_groups(["b", "a", "b", "canary:eu-1"]) == ["a", "b", "canary:eu-1"]
    for bad in (["-x"], [""], ["a b"], ["x" * 65], [1], "canary", [f"g{i}" for i in range(fleet.MAX_GROUPS + 1)]):
        with pytest.raises(ValueError):
            fleet.check_groups(bad)


# --- the API ------------------------------------------------------------------------


def fleet_of(hub: Hub, extra: int = 0) -> None:
    """Inventories and groups for the seeded agents (edge-1 and edge-3 online
    in berlin, edge-2 offline in paris), plus ``extra`` plain offline ones."""
    t0 = to_datetime(START)
    with transaction(hub.sessions) as s:
        for agent_id, model, version, groups in (("edge-1", "rpi4", "1.2.0", ["canary", "berlin"]), ("edge-2", "cm4", "2.0.1", ["paris"]), ("edge-3", "rpi4", "1.10.0", ["berlin"])):
            agent = s.get(Agent, agent_id)
            agent.inventory = {**INVENTORY, "hardware_model": model, "firmware_version": version}
            agent.hardware_model, agent.firmware_version, agent.groups = model, version, groups
        for i in range(extra):
            s.add(Agent(agent_id=f"pump-{i:03d}", hostname=f"pump-host-{i}", agent_version="0.1.0", labels={"site": "depot"}, job_types=[],
                        state="offline", first_seen=t0, last_seen=t0 - timedelta(hours=1), hardware_model="cm4", firmware_version="1.0.0", groups=["pumps"]))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_hub(request: pytest.FixtureRequest) -> Iterator[Hub]:
    """The seeded hub on SQLite, or on a fresh PostgreSQL database: the SQL narrowing must agree on both."""
    if request.param == "sqlite":
        yield request.getfixturevalue("hub")
        return
    with fresh_pg_database("outpost_registry") as url:
        h = open_hub(url)
        seed(h)
        yield h
        h.engine.dispose()


def ids(hub: Hub, role: str = "admin", **params: Any) -> list[str]:
    response = hub.client(role).get("/api/v1/agents", params=params)
    assert response.status_code == 200, response.text
    return [a["agent_id"] for a in response.json()["items"]]


def test_each_filter_selects_like_a_rollout_selector(any_hub: Hub) -> None:
    hub = any_hub
    fleet_of(hub)
    assert ids(hub) == ["edge-1", "edge-2", "edge-3"]
    assert ids(hub, label="site=berlin") == ["edge-1", "edge-3"]
    assert ids(hub, label=["site=berlin", "rack=b"]) == ["edge-3"]
    assert ids(hub, group="canary") == ["edge-1"]
    assert ids(hub, group=["canary", "paris"]) == ["edge-1", "edge-2"]  # any of
    assert ids(hub, hardware="rpi4") == ["edge-1", "edge-3"]
    assert ids(hub, hardware=["cm4", "rpi4"]) == ["edge-1", "edge-2", "edge-3"]
    assert ids(hub, firmware=">=1.2,<2.0") == ["edge-1", "edge-3"]  # 1.10.0 is above 1.2.0: compared as versions
    assert ids(hub, firmware=">1.2.0") == ["edge-2", "edge-3"]
    assert ids(hub, online="true") == ["edge-1", "edge-3"] and ids(hub, online="false") == ["edge-2"]
    assert ids(hub, job_type="command.run") == ["edge-1"]
    assert ids(hub, q="BERLIN-2") == ["edge-3"] and ids(hub, q="edge-") == ["edge-1", "edge-2", "edge-3"]
    assert ids(hub, q="%") == [] and ids(hub, q="_") == []  # LIKE wildcards are text
    assert ids(hub, hardware="rpi4", group="berlin", firmware="<1.5", online="true") == ["edge-1"]
    assert ids(hub, state="online", online="false") == []
    agent = hub.client().get("/api/v1/agents", params={"group": "canary"}).json()["items"][0]
    assert (agent["hardware_model"], agent["firmware_version"], agent["groups"]) == ("rpi4", "1.2.0", ["canary", "berlin"])
    assert (agent["disk_free_bytes"], agent["mem_free_bytes"], agent["mem_total_bytes"]) == (5_000_000_000, 300_000_000, 1_000_000_000)


def test_a_bad_filter_is_a_clear_invalid_request(hub: Hub) -> None:
    client = hub.client()
    for params, words in (({"firmware": ">=1.2,~2"}, "'~2'"), ({"firmware": "banana"}, "banana"), ({"label": "site"}, "key=value"), ({"q": "x" * 201}, "200")):
        response = client.get("/api/v1/agents", params=params)
        assert response.status_code == 422, params  # the hub's status for invalid_request
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and words in error["message"], error
    assert client.get("/api/v1/agents", params={"online": "maybe"}).status_code == 422


def test_paging_is_bounded_and_counts_every_match(any_hub: Hub) -> None:
    hub = any_hub
    fleet_of(hub, extra=25)
    client = hub.client()
    page = client.get("/api/v1/agents", params={"limit": 10, "offset": 20}).json()
    assert (page["total"], page["limit"], page["offset"], len(page["items"])) == (28, 10, 20, 8)
    page = client.get("/api/v1/agents", params={"group": "pumps", "limit": 10, "offset": 10}).json()  # filtered in Python, paged the same
    assert page["total"] == 25 and [a["agent_id"] for a in page["items"]] == [f"pump-{i:03d}" for i in range(10, 20)]
    page = client.get("/api/v1/agents", params={"firmware": "1.0.0", "limit": 5, "offset": 23}).json()
    assert page["total"] == 25 and [a["agent_id"] for a in page["items"]] == ["pump-023", "pump-024"]
    assert client.get("/api/v1/agents").json()["limit"] == 100  # the default stays
    assert client.get("/api/v1/agents", params={"limit": 100_000}).status_code == 422


def test_operators_set_groups_viewers_cannot_and_it_is_audited(hub: Hub) -> None:
    fleet_of(hub)
    put = lambda role, body, agent="edge-2": hub.client(role).put(f"/api/v1/agents/{agent}/groups", json=body)  # noqa: E731
    response = put("operator", {"groups": ["paris", "canary", "canary"]})
    assert response.status_code == 200, response.text
    assert response.json()["groups"] == ["canary", "paris"] and response.json()["inventory"]["hardware_model"] == "cm4"
    assert ids(hub, "viewer", group="canary") == ["edge-1", "edge-2"]
    assert put("viewer", {"groups": []}).status_code == 403
    assert put("admin", {"groups": []}).json()["groups"] == []
    assert put("admin", {"groups": ["bad name"]}).status_code == 422
    assert put("admin", {"groups": "canary"}).status_code == 422
    assert put("admin", {"groups": ["x"]}, agent="nope").status_code == 404
    with hub.sessions() as session:
        records = session.scalars(select(AuditRecord).where(AuditRecord.action == "agent.groups").order_by(AuditRecord.id)).all()
    assert [(r.actor, r.target, r.detail["before"], r.detail["after"]) for r in records] == [
        ("user:test-operator", "edge-2", ["paris"], ["canary", "paris"]),
        ("user:test-admin", "edge-2", ["canary", "paris"], []),
    ]
    detail = hub.client("viewer").get("/api/v1/agents/edge-1").json()
    assert detail["groups"] == ["canary", "berlin"] and detail["inventory"]["mem_total_bytes"] == 1_000_000_000


# --- the operator CLI ---------------------------------------------------------------


def test_cli_filters_sets_groups_and_shows_the_registry_columns(cli: Cli, live_hub: tuple[Hub, str]) -> None:
    fleet_of(live_hub[0])
    code, out, _ = cli("agents", "list", "--online", "--hardware", "rpi4")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:7] == ["AGENT_ID", "HOSTNAME", "STATE", "LAST_SEEN", "HARDWARE", "FIRMWARE", "GROUPS"]
    assert lines[1].split()[:2] == ["edge-1", "gw-berlin-1"] and "rpi4" in lines[1] and "1.2.0" in lines[1] and "canary,berlin" in lines[1]
    assert len(lines) == 3 and lines[2].startswith("edge-3")
    listed = lambda *argv: [a["agent_id"] for a in cli.json("agents", "list", *argv)["items"]]  # noqa: E731
    assert listed("--offline") == ["edge-2"]
    assert listed("--firmware", ">=1.2,<2.0", "--group", "berlin") == ["edge-1", "edge-3"]
    assert listed("--job-type", "command.run", "-q", "gw-berlin") == ["edge-1"]
    code, _, err = cli("agents", "list", "--firmware", "~1")
    assert code == 4 and "'~1'" in err

    assert cli("agents", "groups", "set", "edge-3", "canary", "berlin") == (0, "edge-3: groups berlin, canary\n", "")
    assert cli("agents", "groups", "add", "edge-3", "eu")[1] == "edge-3: groups berlin, canary, eu\n"
    assert cli("agents", "groups", "remove", "edge-3", "canary", "nope")[1] == "edge-3: groups berlin, eu\n"
    assert listed("--group", "canary") == ["edge-1"]
    assert cli.json("agents", "groups", "set", "edge-3")["groups"] == []
    code, out, _ = cli("agents", "show", "edge-1")
    assert code == 0 and "groups:         canary, berlin\n" in out and "hardware:       rpi4\n" in out and '"mem_total_bytes":1000000000' in out


# --- the dashboard (the browser test is test_registry_browser.py) ----------------------


def test_dashboard_pages_filters_and_refuses_bad_ones_in_the_page(hub: Hub) -> None:
    fleet_of(hub, extra=210)
    with hub.client() as client:
        first = client.get("/agents", params={"group": "pumps"})
        assert first.status_code == 200 and first.text.count("data-agent-id=") == 200
        assert "200 of 213 online" not in first.text and "0 of 210 online" in first.text
        assert 'href="/agents?group=pumps&amp;offset=200" rel="next"' in first.text
        second = client.get("/agents", params={"group": "pumps", "offset": 200})
        assert second.text.count("data-agent-id=") == 10 and 'rel="prev"' in second.text and 'rel="next"' not in second.text
        for params, words in (({"firmware": "1.x"}, "1.x"), ({"online": "maybe"}, "online must be true or false"), ({"offset": "-1"}, "offset must be a whole number"), ({"offset": "²"}, "offset must"), ({"offset": "9" * 30}, "offset must")):
            bad = client.get("/agents", params=params)
            assert bad.status_code == 400 and words in bad.text and 'data-refresh="0"' in bad.text, params
        detail = client.get("/agents/edge-1").text
    assert 'class="inventory"' in detail and "mem_total_bytes" in detail and "953.7 MiB" in detail and "canary" in detail
