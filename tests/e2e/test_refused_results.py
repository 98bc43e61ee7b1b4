"""A result the hub can never apply, over MQTT, with real processes: the hub
records it and answers it in the ack's ``refused_ids``; the device sets it
aside (failed, kept, shown by ``queue ls``) and stops re-sending it."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from agent.cli import main as agent_cli
from agent.queues import Outbox
from shared.hlc import HLC
from shared.messages import Result

DAG = """
from hub.dag import DAG, AgentOperator, on_agent
with DAG("d") as dag:
    AgentOperator(task_id="t", job_type="noop", target=on_agent("agent-1"))
"""
AGENT = "agent-1"
STRAY = "f" * 32  # an assignment id this hub never issued


def rejections(db: str) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("SELECT code FROM rejected_messages WHERE agent_id = ? ORDER BY id", (AGENT,))]


def test_a_result_the_hub_never_issued_is_refused_over_mqtt_and_set_aside_on_the_device(fleet: Any, monkeypatch: Any, capsys: Any) -> None:
    monkeypatch.setenv("OUTPOST_AGENT_RESULT_RESEND_AFTER", "0.5")  # re-sends would show within the test
    f = fleet({"d.py": DAG})
    f.start_hub()
    agent_dir = f.root / "agents" / AGENT
    agent_dir.mkdir(parents=True)
    outbox = Outbox(agent_dir / "outbox.sqlite3", "NORMAL")
    outbox.put_result(Result(STRAY, 1, "success", {"n": 1}), HLC(int(time.time() * 1000), 0, AGENT))
    outbox.close()

    f.start_agent(AGENT)
    f.wait_agents_online(1)
    db = str(f.root / "hub" / "hub.db")

    def status() -> str | None:
        queue = Outbox(agent_dir / "outbox.sqlite3", "NORMAL")
        try:
            entry = queue.get(STRAY)
            return entry.status if entry is not None else None
        finally:
            queue.close()

    f.wait(lambda: status() == "failed", 20, "the refused result set aside on the device")
    assert rejections(db) == ["unknown_assignment"]
    time.sleep(2.0)  # four re-send periods: none comes
    assert rejections(db) == ["unknown_assignment"]

    assert agent_cli(["queue", "ls", "--config", str(agent_dir / "agent.toml"), "-o", "json"]) == 0
    items = json.loads(capsys.readouterr().out)["outbox"]["items"]
    assert [(i["assignment_id"], i["status"]) for i in items] == [(STRAY, "failed")]
    assert "refused 1 result(s) for good" in (agent_dir / "agent.log").read_text()
