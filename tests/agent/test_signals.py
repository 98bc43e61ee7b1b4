"""Signals on a real ``python -m agent run`` process: SIGTERM stops it
gracefully within ``stop_timeout`` and leaves a clean retained ``offline``
status; SIGHUP reloads the configuration file."""

from __future__ import annotations

import signal
import time

from shared.envelope import decode
from shared.frames import unsigned_part
from shared.topics import status_topic

from .conftest import AGENT_ID, read_retained, wait_until


def test_sigterm_finishes_within_the_budget_aborts_the_rest_and_publishes_a_clean_offline(spawn_agent, hub, mosquitto, tmp_path):
    proc = spawn_agent('stop_timeout = 1.0\ncommand_allowlist = ["sleep"]\n')
    online = hub.wait_status("online", timeout=15)
    hub.assign("quick", params={"echo": "q", "sleep": 0.4})
    hub.assign("rerun", params={"echo": "r", "sleep": 2.5})  # noop: safe to run again
    hub.assign("cmd", job_type="command.run", params={"argv": ["sleep", "30"]})  # not safe to run again
    for aid in ("quick", "rerun", "cmd"):
        hub.wait_for("started", aid, timeout=10)
    seen = len(hub.statuses)
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert time.monotonic() - stopped_at < 1.0 + 2.0 + 5.0  # the budget, the abort grace, the link's goodbye
    log = (tmp_path / "agent-0.log").read_text()
    assert "stopped (some jobs were interrupted)" in log

    offline = hub.wait_status("offline", since=seen)
    retained = decode(unsigned_part(read_retained(mosquitto.port, status_topic(AGENT_ID))))  # type: ignore[arg-type]
    assert retained.body.state == "offline"  # type: ignore[attr-defined]
    # The clean goodbye, stamped at stop, not the Will (stamped when the agent
    # started, before its online status) that the broker sends for a lost link.
    assert retained.id == offline.id and retained.hlc > online.hlc
    assert [e.body.state for e, _ in hub.statuses[seen:]] == ["offline"]  # type: ignore[attr-defined]

    spawn_agent()
    interrupted = hub.wait_for("result", "cmd", timeout=15)[0]
    assert interrupted.status == "failed" and interrupted.error.code == "interrupted"
    assert hub.wait_for("result", "rerun", timeout=15)[0].status == "success"
    assert hub.wait_for("result", "quick")[0].status == "success"  # finished in the budget
    assert {aid: len(hub.of("started", aid)) for aid in ("quick", "rerun", "cmd")} == {"quick": 1, "rerun": 2, "cmd": 1}


def test_sighup_applies_live_settings_warns_about_the_rest_and_survives_a_bad_file(spawn_agent, hub, tmp_path):
    proc = spawn_agent('concurrency = 1\n[labels]\nsite = "north"\n')
    assert hub.wait_status("online", timeout=15).body.labels == {"site": "north"}
    config = tmp_path / "agent.toml"
    text = config.read_text()
    seen = len(hub.statuses)
    changed = text.replace("concurrency = 1", "concurrency = 2").replace('site = "north"', 'site = "south"')
    changed = changed.replace(f'agent_id = "{AGENT_ID}"', 'agent_id = "someone-else"').replace("broker_port =", "broker_port = 1 #")
    config.write_text(changed)
    proc.send_signal(signal.SIGHUP)
    assert hub.wait_status("online", since=seen).body.labels == {"site": "south"}  # republished, retained
    log_path = tmp_path / "agent-0.log"
    wait_until(lambda: "configuration reload applied" in log_path.read_text(), 5, "the reload")
    log = log_path.read_text()
    assert "agent_id, broker_port changed but only take(s) effect after a restart" in log
    assert "configuration reload applied: labels, concurrency" in log

    hub.assign("a", params={"echo": 1, "sleep": 1.0})
    hub.assign("b", params={"echo": 2, "sleep": 1.0})
    hub.wait_for("started", "a")
    hub.wait_for("started", "b")
    assert not hub.of("result")  # both run at once: concurrency 2 is live

    config.write_text("this is = not [toml")
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reload failed" in log_path.read_text(), 5, "the failed reload")
    hub.wait_for("result", "b")
    beats = len(hub.of("heartbeat"))
    wait_until(lambda: len(hub.of("heartbeat")) > beats + 1, 5, "heartbeats after the bad reload")
    assert hub.of("heartbeat")[-1].counters.get("errors.reload") == 1
    assert proc.poll() is None  # still running, as the same agent
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
