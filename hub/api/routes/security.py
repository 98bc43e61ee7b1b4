"""Security events (signed messages that did not verify) and Prometheus metrics.

``GET /api/v1/security-events`` lists ``security_events`` (hub.security)
newest first with filters and counts per code. ``GET /api/v1/metrics`` is
Prometheus text: security events per code and source, rejected messages per
code, agents per state (and revoked), and outbox rows waiting to be
published. Every number comes from the database, so any hub process (the
API apart from ingestion) answers the same and a restart loses nothing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from hub import security
from hub.api.deps import CurrentUser, PageParams, ReadSession
from hub.auth import scope
from hub.api.schemas import Page
from hub.models import Agent, OutboxMessage, RejectedMessage

router = APIRouter(tags=["security"])


class SecurityEventOut(BaseModel):
    id: int
    at: datetime
    agent_id: str | None = Field(description="The agent the message was attributed to (by its topic or URL), or that reported it.")
    source: str = Field(description="mqtt or http: the hub refused a device message; agent: a device refused a hub message and reported it.")
    code: str = Field(description="unknown_agent, revoked_agent, unknown_key, bad_signature, sender_mismatch (hub side); unknown_key, bad_signature, wrong_device, expired, replayed, bad_announcement (device side).")
    detail: str
    excerpt: str = Field(description="The start of the refused message (untrusted text), or the refused envelope's id for device reports.")


class SecurityEventPage(Page[SecurityEventOut]):
    counts: dict[str, int] = Field(description="Events per code, over all events matching the filters.")


@router.get("/security-events", response_model=SecurityEventPage)
def list_security_events(
    session: ReadSession,
    page: PageParams,
    who: CurrentUser,
    code: Annotated[str | None, Query(max_length=50, description="Only events with this code.")] = None,
    agent_id: Annotated[str | None, Query(max_length=128, description="Only events of this agent.")] = None,
    source: Annotated[Literal["mqtt", "http", "agent"] | None, Query(description="Only events from this source.")] = None,
    since: Annotated[datetime | None, Query(description="Only events at or after this time (ISO 8601).")] = None,
    until: Annotated[datetime | None, Query(description="Only events before this time (ISO 8601).")] = None,
) -> dict[str, Any]:
    """Messages that did not verify (hub side) or that devices refused as forged, foreign, expired or replayed, newest first
    (a user limited to device groups sees only events naming an agent in their groups)."""
    rows, total, counts = security.query(
        session, agent_id=agent_id, code=code, source=source, since=since, until=until, limit=page.limit, offset=page.offset,
        agent_ids=scope.visible_agent_ids(session, who),
    )
    items = [
        {"id": r.id, "at": r.at, "agent_id": r.agent_id, "source": r.source, "code": r.code, "detail": r.detail, "excerpt": r.excerpt}
        for r in rows
    ]
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset, "counts": counts}


def _label(value: str) -> str:
    # Prometheus label values: backslash, double quote and newline escaped.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text exposition format 0.0.4."}},
)
def metrics(session: ReadSession) -> PlainTextResponse:
    """Counters and gauges in the Prometheus text format."""
    lines = [
        "# HELP outpost_security_events_total Signed messages that did not verify, or that devices refused (security_events), by code and source.",
        "# TYPE outpost_security_events_total counter",
    ]
    for (source, code), n in sorted(security.counts_by_code(session).items()):
        lines.append(f'outpost_security_events_total{{code="{_label(code)}",source="{_label(source)}"}} {n}')
    lines += [
        "# HELP outpost_rejected_messages_total Wire messages the hub refused for other reasons (rejected_messages), by code.",
        "# TYPE outpost_rejected_messages_total counter",
    ]
    for code, n in sorted(session.execute(select(RejectedMessage.code, func.count()).group_by(RejectedMessage.code)).all()):
        lines.append(f'outpost_rejected_messages_total{{code="{_label(str(code))}"}} {int(n)}')
    lines += ["# HELP outpost_agents Agents by state.", "# TYPE outpost_agents gauge"]
    states = dict(session.execute(select(Agent.state, func.count()).group_by(Agent.state)).all())
    for state in sorted({"online", "offline", *states}):
        lines.append(f'outpost_agents{{state="{_label(str(state))}"}} {int(states.get(state, 0))}')
    revoked = session.scalar(select(func.count()).select_from(Agent).where(Agent.revoked_at.is_not(None))) or 0
    unregistered = session.scalar(select(func.count()).select_from(Agent).where(Agent.public_key.is_(None))) or 0
    lines += [
        "# HELP outpost_agents_revoked Agents whose identity was revoked.", "# TYPE outpost_agents_revoked gauge", f"outpost_agents_revoked {int(revoked)}",
        "# HELP outpost_agents_unregistered Agents the hub knows with no public key (nothing they send is applied).",
        "# TYPE outpost_agents_unregistered gauge", f"outpost_agents_unregistered {int(unregistered)}",
    ]
    waiting = session.scalar(select(func.count()).select_from(OutboxMessage).where(OutboxMessage.published_at.is_(None))) or 0
    lines += ["# HELP outpost_outbox_unpublished Messages to devices not yet confirmed by the broker.", "# TYPE outpost_outbox_unpublished gauge", f"outpost_outbox_unpublished {int(waiting)}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")
