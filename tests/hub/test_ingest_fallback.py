"""A batch whose fast-path apply fails is redone message by message: nothing
of the failed attempt survives, and the batch's rejections are recorded once."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from hub.models import RejectedMessage
from shared.messages import Result
from shared.mqtt import Inbound
from shared.envelope import Envelope
from shared.topics import events_topic
from tests.hub.test_ingest import setup

def test_a_failed_batch_is_redone_one_message_at_a_time(make_hub: Any) -> None:
    hub, run_pk, assign = setup(make_hub)
    real = hub.ingester._apply_all
    calls: list[int] = []
    def flaky(session: Any, items: Any, now: Any, out: Any) -> None:
        calls.append(len(items))
        if len(calls) == 1:
            real(session, items, now, out)
            raise RuntimeError("boom")
        real(session, items, now, out)
    hub.ingester._apply_all = flaky  # type: ignore[method-assign]
    good = hub.sign(Envelope(Result(assign.assignment_id, 1, "success", "ok"), "a1", hub.agent_clocks["a1"].now()))
    hub.ingester.process([Inbound(events_topic("a1"), hub.sign_raw("a1", b"{bad"), 1, False, 1), Inbound(events_topic("a1"), good, 1, False, 2)])
    assert calls == [1, 1]
    with hub.sessions() as s:
        rows = list(s.scalars(select(RejectedMessage)))
    assert [r.code for r in rows] == ["decode_error"]
    assert hub.tis(run_pk)[0].state == "success"
