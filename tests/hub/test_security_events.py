"""Security events end to end inside the hub: messages that do not verify
are not applied and are recorded (MQTT path), devices' reports land in the
same table, and the API, metrics, the operator CLI and the dashboard show
them (everything escaped)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from hub.api.app import create_app
from hub.ctl import main as ctl_main
from hub.db import transaction
from hub.identity import register_agent, revoke_agent
from hub.models import SecurityEvent, TaskResult
from hub.web import views
from shared.clock import utcnow
from shared.envelope import Envelope
from shared.frames import unsigned_part
from shared.messages import Heartbeat, Rejected, Result
from shared.signing import SigningKey
from shared.topics import events_topic

from .api_harness import XSS, LiveServer, admin_headers, hub_settings, make_token

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("a1"))
"""


def setup(make_hub: Any) -> tuple[Any, int, Any]:
    hub = make_hub({"d.py": DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("d")
    hub.tick()
    return hub, run_pk, hub.assignments_sent()[0].body


def events(hub: Any) -> list[tuple[str | None, str, str]]:
    with hub.sessions() as session:
        return [(e.agent_id, e.source, e.code) for e in session.scalars(select(SecurityEvent).order_by(SecurityEvent.id))]


def results(hub: Any) -> int:
    with hub.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(TaskResult)) or 0)


def test_nothing_unverified_is_applied_or_acknowledged(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    result = Result(assign.assignment_id, 1, "success", {"forged": True})
    topic = events_topic("a1")
    forger = SigningKey.generate()
    genuine = hub.frame("a1", result)
    hub.send_raw(topic, unsigned_part(genuine))  # signature stripped
    hub.send_raw(topic, unsigned_part(genuine).replace(b"forged", b"forgex") + genuine[len(unsigned_part(genuine)):])  # body changed
    hub.send_raw(topic, _signed_by(forger, hub, result))  # another key
    hub.send_raw(events_topic("a9"), _signed_by(forger, hub, result, sender="a9"))  # never registered
    assert results(hub) == 0 and hub.tis(run_pk)[0].state == "queued"
    assert hub.acks() == []  # no ack and no refusal: a forger must not make the device drop its work
    assert events(hub) == [("a1", "mqtt", "bad_signature"), ("a1", "mqtt", "bad_signature"), ("a1", "mqtt", "unknown_key"), ("a9", "mqtt", "unknown_agent")]
    hub.send("a1", result)  # the genuine one still applies
    assert results(hub) == 1 and hub.tis(run_pk)[0].output == {"forged": True}


def _signed_by(key: SigningKey, hub: Any, body: Any, sender: str = "a1") -> bytes:
    from shared.frames import AGENT_TO_HUB, sign_envelope
    from shared.hlc import HybridClock

    clock = HybridClock(sender, lambda: int(hub.clock.now() * 1000))
    return sign_envelope(Envelope(body, sender, clock.now()), key, AGENT_TO_HUB)


def test_a_revoked_device_is_refused_and_a_re_registered_key_replaces_the_old(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    old = hub.agent_key("a1")
    with transaction(hub.sessions) as session:
        revoke_agent(session, "a1", utcnow(hub.clock))
    hub.send("a1", Result(assign.assignment_id, 1, "success"))
    assert results(hub) == 0 and events(hub)[-1] == ("a1", "mqtt", "revoked_agent")
    from hub.identity import reinstate_agent

    new = SigningKey.generate()
    with transaction(hub.sessions) as session:
        reinstate_agent(session, "a1")
        register_agent(session, "a1", new.public, utcnow(hub.clock), replace=True)
    hub.send("a1", Heartbeat("0.1.0"))  # still signed with the old key
    assert events(hub)[-1] == ("a1", "mqtt", "unknown_key")
    hub.agent_keys["a1"] = new
    hub.send("a1", Result(assign.assignment_id, 1, "success"))
    assert results(hub) == 1 and old.kid != new.kid


def test_security_events_devices_report_land_in_the_same_table(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    hub.send("a1", Rejected("security.replayed", "assign sequence number 7 was already used", "m-7"))
    hub.send("a1", Rejected("deadline_passed", "late", assignment_id=assign.assignment_id))  # not a security event
    assert events(hub) == [("a1", "agent", "replayed")]
    with hub.sessions() as session:
        [event] = session.scalars(select(SecurityEvent))
        assert event.detail == "assign sequence number 7 was already used" and event.excerpt == "m-7"


def test_a_flood_is_counted_but_recorded_at_most_once_per_agent_and_code_per_interval(make_hub: Any) -> None:
    from hub.security import Throttle

    hub, _run_pk, _assign = setup(make_hub)
    hub.ingester.security_throttle = Throttle(every=3600)
    for _ in range(5):
        hub.send_raw(events_topic("a1"), b'{"v":1}')
    assert events(hub) == [("a1", "mqtt", "bad_signature")]
    assert hub.ingester.counters["security.bad_signature"] == 5


@pytest.fixture
def shown(make_hub: Any) -> Any:
    """A hub with security events of several kinds, one carrying an HTML payload."""
    hub, _run_pk, _assign = setup(make_hub)
    hub.send_raw(events_topic("a1"), XSS.encode())
    hub.send("a1", Rejected("security.wrong_device", f"signed for {XSS}", XSS))
    hub.send_raw(events_topic("a9"), b"{}\n0123456789abcdef.AAAA")
    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock, extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()})
    return hub, app


def test_the_api_lists_filters_and_counts(shown: Any) -> None:
    from fastapi.testclient import TestClient

    hub, app = shown
    with TestClient(app, headers=admin_headers(hub.sessions, "viewer")) as client:
        page = client.get("/api/v1/security-events").json()
        assert page["total"] == 3 and page["counts"] == {"bad_signature": 1, "unknown_agent": 1, "wrong_device": 1}
        assert [e["code"] for e in page["items"]] == ["unknown_agent", "wrong_device", "bad_signature"]  # newest first
        assert client.get("/api/v1/security-events", params={"source": "agent"}).json()["items"][0]["detail"] == f"signed for {XSS}"
        assert client.get("/api/v1/security-events", params={"agent_id": "a9"}).json()["counts"] == {"unknown_agent": 1}
        assert client.get("/api/v1/security-events", params={"code": "replayed"}).json()["total"] == 0
        later = (utcnow(hub.clock) + timedelta(seconds=1)).isoformat()
        assert client.get("/api/v1/security-events", params={"since": later}).json()["total"] == 0
        assert client.get("/api/v1/security-events", params={"source": "pigeon"}).status_code == 422
        metrics = client.get("/api/v1/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        text = metrics.text
        assert 'outpost_security_events_total{code="bad_signature",source="mqtt"} 1' in text
        assert 'outpost_security_events_total{code="wrong_device",source="agent"} 1' in text
        assert 'outpost_agents{state="online"} 1' in text and "outpost_outbox_unpublished 1" in text


def test_the_dashboard_page_escapes_everything_and_is_in_the_nav(shown: Any) -> None:
    from fastapi.testclient import TestClient

    hub, app = shown
    with TestClient(app, headers=admin_headers(hub.sessions, "viewer")) as client:
        page = client.get("/security")
        assert page.status_code == 200
        assert XSS not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text
        assert "<script>" not in page.text  # no inline script; the page's own scripts are files
        assert 'href="/security"' in client.get("/").text
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "unsafe-inline" not in policy
        assert client.get("/security", params={"code": "wrong_device"}).text.count("data-security-event") == 1


def test_the_operator_cli_lists_them(shown: Any, capsys: pytest.CaptureFixture[str]) -> None:
    hub, app = shown
    token = make_token(hub.sessions, "viewer")
    with LiveServer(app) as server:
        assert ctl_main(["--hub", server.url, "--token", token, "security-events"]) == 0
        out = capsys.readouterr().out
        assert "wrong_device" in out and "unknown_agent" in out and "counts: bad_signature 1, unknown_agent 1, wrong_device 1" in out
        assert ctl_main(["--hub", server.url, "--token", token, "security-events", "--source", "agent", "-o", "json"]) == 0
        import json

        assert json.loads(capsys.readouterr().out)["counts"] == {"wrong_device": 1}


FLEET_DAG = """
from hub.dag import DAG, AgentOperator, any_agent, every_agent, on_agent
with DAG("pinned") as pinned:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("a1"))
with DAG("anyone") as anyone:
    AgentOperator(task_id="t", job_type="noop", target=any_agent())
with DAG("everyone") as everyone:
    AgentOperator(task_id="t", job_type="noop", target=every_agent())
"""


def test_a_revoked_device_gets_no_new_work(make_hub: Any) -> None:
    """Targeting skips a revoked device; work pinned to it fails (agent_revoked)
    instead of waiting for a device that may never be trusted again."""
    hub = make_hub({"fleet.py": FLEET_DAG})
    hub.agent_online("a1")
    hub.agent_online("a2")
    with transaction(hub.sessions) as session:
        revoke_agent(session, "a1", utcnow(hub.clock))
    pinned, anyone, everyone = (hub.trigger(d) for d in ("pinned", "anyone", "everyone"))
    hub.tick()
    [ti] = hub.tis(pinned)
    assert (ti.state, (ti.error or {}).get("code"), (ti.error or {}).get("retryable")) == ("failed", "agent_revoked", False)
    assert [t.agent_id for t in hub.tis(anyone)] == ["a2"]
    assert [t.agent_id for t in hub.tis(everyone)] == ["a2"]
    from hub.models import Assignment

    with hub.sessions() as session:
        assert set(session.scalars(select(Assignment.agent_id))) == {"a2"}


def test_the_api_and_dashboard_show_each_device_s_identity(make_hub: Any) -> None:
    from fastapi.testclient import TestClient

    hub, _run_pk, _assign = setup(make_hub)
    key = hub.agent_key("a1")
    hub.agent_online("a2")
    with transaction(hub.sessions) as session:
        revoke_agent(session, "a2", utcnow(hub.clock))
    hub.send_raw(events_topic("a3"), b"{}")  # seen, never registered
    app = create_app(hub_settings(), hub.sessions, hub.ingester.events, hub.clock, extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()})
    with TestClient(app, headers=admin_headers(hub.sessions, "viewer")) as client:
        one = client.get("/api/v1/agents/a1").json()
        assert one["key_id"] == key.kid and one["registered_at"] and one["revoked_at"] is None
        assert client.get("/api/v1/agents/a2").json()["revoked_at"] is not None
        assert f"<code>{key.kid}</code>" in client.get("/agents/a1").text
        assert "revoked" in client.get("/agents/a2").text
