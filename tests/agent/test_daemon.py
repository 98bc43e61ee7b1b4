"""The agent as a whole: assignments in, results out, over a real broker."""

from __future__ import annotations


def test_assignment_runs_and_result_is_marked_done_only_on_ack(make_agent, hub):
    agent = make_agent()
    hub.assign("a-1", params={"echo": 42})
    hub.wait_for("accepted", "a-1")
    result = hub.wait_for("result", "a-1")[0]
    assert result.status == "success" and result.output == {"echo": 42}
    assert agent.outbox.depth() == 1  # sent, not yet acknowledged
    hub.ack("a-1")
    assert agent.drain(5)
