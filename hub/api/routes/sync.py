"""HTTP bulk sync: an agent with a large outbox backlog posts it in batches.

Each batch carries the very envelopes the agent would publish on its MQTT
events topic (results, agent events, any later outbox item type), oldest
first, with the outbox sequence range they cover. The hub decodes and checks
each one exactly as MQTT ingestion does (size limit, sender must be the
agent, types allowed on an events topic), applies the batch in order through
the same code (``Ingester.apply``), commits, and only then answers with the
acknowledgement: the agent treats the answer like an MQTT ``ack``.

Items that cannot be applied are recorded in ``rejected_messages`` (source
``http``) and listed as ``refused`` by position, so the agent sets them
aside instead of sending them forever. The sync cursor (the highest sequence
committed, per agent and outbox stream) commits in the same transaction as
the items, so it never claims more than the hub holds.

Every request is signed by the agent's device key (``Outpost-Signature``,
shared/requestsig.py, checked by hub/requestauth.py): an unsigned, stale,
replayed or wrongly signed request, or one from an unknown agent, gets 401; a
revoked agent gets 403.
Every envelope in a batch is a signed frame (``shared.frames``), verified
with the agent's registered key exactly as on MQTT; one that does not verify
is recorded as a security event (source ``http``) and listed in ``refused``.

Every 200 answer (the acknowledgement, the cursor) is signed with the hub's
current key, bound to the request it answers (``Outpost-Answer-Signature``,
shared/requestsig.py): the agent drops outbox items on the hub's word only,
never on that of someone in the path of a plain-HTTP ``hub_url``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from hub.api.deps import read_bounded
from hub.api.schemas import ErrorResponse
from hub.config import HubSettings
from hub.db import for_update
from hub import hubkeys, identity, requestauth, security
from hub.db import transaction
from hub.errors import BatchTooLarge, DatabaseUnavailable, InvalidRequest
from hub.ingest import Ingester
from hub.models import SyncCursor
from shared.clock import utcnow
from shared.hlc import HybridClock
from shared.mqtt import Inbound
from shared.requestsig import ANSWER_HEADER, HEADER, sign_answer
from shared.topics import check_agent_id, events_topic

log = logging.getLogger(__name__)

router = APIRouter(tags=["sync"])

#: Longest stream id and sequence accepted (UUID text is 36 characters).
_ID_MAX = 64


class SyncBatch(BaseModel):
    """One batch of an agent's outbox, oldest first."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stream: str = Field(min_length=1, max_length=_ID_MAX, description="The agent's outbox stream id; the cursor is kept per stream.")
    first_seq: str = Field(min_length=1, max_length=_ID_MAX, description="Outbox sequence (litequeue message id, time-ordered text) of the first item.")
    last_seq: str = Field(min_length=1, max_length=_ID_MAX, description="Sequence of the last item; the cursor moves here once the batch is committed.")
    envelopes: list[str] = Field(
        min_length=1,
        description="Each item as the exact envelope text the agent would publish on agents/{agent_id}/events (JSON, compact UTF-8), in outbox order.",
    )


class Refusal(BaseModel):
    index: int = Field(description="Position of the refused item in the batch's envelopes.")
    code: str = Field(description="Rejection code, as stored in rejected_messages (e.g. unknown_assignment, decode_error, sender_mismatch).")
    detail: str


class Cursor(BaseModel):
    agent_id: str
    stream: str | None = Field(description="The outbox stream the cursor belongs to; null before the first batch.")
    seq: str | None = Field(description="Highest outbox sequence the hub committed on that stream.")
    items: int = Field(description="Items committed over HTTP on that stream.")
    updated_at: datetime | None


class SyncAck(BaseModel):
    """An ``Ack`` message body (every id list it has) plus the HTTP extras."""

    assignment_ids: list[str] = Field(description="Results the hub committed (as in the MQTT ack).")
    event_ids: list[str] = Field(description="Agent events the hub committed (as in the MQTT ack).")
    refused: list[Refusal] = Field(description="Items the hub recorded as rejected and will never apply; the agent sets them aside.")
    cursor: Cursor


_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Not signed by the agent's registered key, a timestamp outside agent_request_window, a replayed signature, or an unknown agent (codes signature_missing, malformed_signature, bad_signature, signer_mismatch, stale_request, replayed_request, unknown_agent)."},
    403: {"model": ErrorResponse, "description": "The agent is revoked (code agent_revoked)."},
}


async def _authenticate(request: Request, agent_id: str) -> requestauth.SignedRequest:
    """The header's checks, before the body is read."""
    settings: HubSettings = request.app.state.settings
    try:
        check_agent_id(agent_id)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    now = utcnow(request.app.state.clock)
    return await run_in_threadpool(
        requestauth.check_header, request.app.state.sessions, now, settings.agent_request_window, agent_id, request.headers.get(HEADER),
    )


async def _verify(request: Request, signed: requestauth.SignedRequest, body: bytes) -> None:
    settings: HubSettings = request.app.state.settings
    now = utcnow(request.app.state.clock)
    await run_in_threadpool(signed.verify, request.app.state.sessions, now, settings.agent_request_window, request.method, request.url.path, body)


def _keyring(request: Request) -> hubkeys.LiveRing:
    """The hub process's ring when it runs one, else this app's own on the
    same folder (every hub process of an installation shares the ring)."""
    state = request.app.state
    ring = getattr(state, "keyring", None)
    if ring is None:
        settings: HubSettings = state.settings
        ring = state.keyring = hubkeys.LiveRing(settings.key_ring_dir)
    return ring


async def _signed_answer(request: Request, signed: requestauth.SignedRequest, doc: dict[str, Any]) -> Response:
    """``doc`` as JSON, signed by the hub's current key for this very request."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    key = (await run_in_threadpool(_keyring, request)).current
    header = sign_answer(key, signed.agent_id, signed.signature, 200, body)
    return Response(body, media_type="application/json", headers={ANSWER_HEADER: header})


def _ingester(request: Request) -> Ingester:
    """The hub process's ingester when it runs one (standalone), else one
    of this app's own: applying needs no MQTT link."""
    state = request.app.state
    ingester = getattr(state, "ingester", None)
    if ingester is None:
        settings: HubSettings = state.settings
        clock = state.clock
        hlc = HybridClock("hub", lambda: int(clock.now() * 1000), max_ahead_ms=int(settings.max_clock_skew * 1000))
        ingester = Ingester(state.sessions, None, clock, hlc, state.events, settings.max_message_bytes)  # type: ignore[arg-type]
        state.ingester = ingester
    return ingester


def _too_large(limit: int) -> Callable[[str | None], BatchTooLarge]:
    def refuse(declared: str | None) -> BatchTooLarge:
        if declared is not None:
            return BatchTooLarge(f"sync batch of {declared} bytes is over sync_max_batch_bytes ({limit}); send smaller batches")
        return BatchTooLarge(f"sync batch is over sync_max_batch_bytes ({limit} bytes); send smaller batches")
    return refuse


def _parse(raw: bytes, settings: HubSettings) -> SyncBatch:
    try:
        batch = SyncBatch.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])
        raise InvalidRequest(f"not a sync batch: {problems}") from None
    if len(batch.envelopes) > settings.sync_max_batch_items:
        raise BatchTooLarge(f"sync batch of {len(batch.envelopes)} items is over sync_max_batch_items ({settings.sync_max_batch_items}); send smaller batches")
    if batch.first_seq > batch.last_seq:
        raise InvalidRequest(f"first_seq {batch.first_seq!r} is after last_seq {batch.last_seq!r}")
    return batch


def _cursor_of(row: SyncCursor | None, agent_id: str) -> dict[str, Any]:
    if row is None:
        return {"agent_id": agent_id, "stream": None, "seq": None, "items": 0, "updated_at": None}
    return {"agent_id": agent_id, "stream": row.stream, "seq": row.seq, "items": row.items, "updated_at": row.updated_at.isoformat()}


@router.post(
    "/agents/{agent_id}/sync",
    response_model=None,
    responses={
        200: {"model": SyncAck, "description": "The batch is committed; the body is the acknowledgement, signed by the hub (header Outpost-Answer-Signature)."},
        **_AUTH_RESPONSES,
        413: {"model": ErrorResponse, "description": "More items than sync_max_batch_items or more bytes than sync_max_batch_bytes (code batch_too_large)."},
        503: {"model": ErrorResponse, "description": "The database is unreachable or busy; nothing was applied, send the batch again later."},
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": SyncBatch.model_json_schema()}}}},
)
async def post_sync_batch(request: Request, agent_id: Annotated[str, Path(description="The sending agent; every envelope's sender must be it.")]) -> Response:
    """Apply a batch of an agent's outbox, in order, and acknowledge it.

    Answers only after the commit. Re-sending a batch is harmless: results
    are unique per assignment and agent events per id, so a repeat is
    acknowledged again and applied nothing twice. Items that cannot be
    applied are recorded as rejections and listed in ``refused``.
    Signed by the agent (``Outpost-Signature``, see the module docstring)."""
    settings: HubSettings = request.app.state.settings
    signed = await _authenticate(request, agent_id)
    raw = await read_bounded(request, settings.sync_max_batch_bytes, _too_large(settings.sync_max_batch_bytes))
    await _verify(request, signed, raw)
    batch = _parse(raw, settings)
    ingester = _ingester(request)
    await run_in_threadpool(_check_standing, request, ingester, agent_id, batch.envelopes[0])
    topic = events_topic(agent_id)
    # The same input ingestion gets from the broker: the agent's events topic
    # and the envelope bytes, so every check is the MQTT path's.
    messages = [Inbound(topic, text.encode(), 0, False, 0) for text in batch.envelopes]
    clock = request.app.state.clock
    cursor: dict[str, Any] = {}

    def advance(session: Session) -> None:
        row = session.scalars(for_update(select(SyncCursor).where(SyncCursor.agent_id == agent_id), session)).first()
        now = utcnow(clock)
        if row is None:
            row = SyncCursor(agent_id=agent_id, stream=batch.stream, seq=batch.last_seq, items=len(messages), updated_at=now)
            session.add(row)
        elif row.stream != batch.stream:
            row.stream, row.seq, row.items, row.updated_at = batch.stream, batch.last_seq, len(messages), now
        else:
            row.seq, row.items, row.updated_at = max(row.seq, batch.last_seq), row.items + len(messages), now
        session.flush()
        cursor.update(_cursor_of(row, agent_id))

    try:
        out = await run_in_threadpool(ingester.apply, messages, source="http", in_transaction=advance)
    except OperationalError as exc:
        log.warning("sync batch from %s not applied, database unavailable: %s", agent_id, exc)
        raise DatabaseUnavailable("the hub's database is unavailable; nothing was applied, send the batch again later") from None
    await run_in_threadpool(ingester.announce, out)  # subscribers may block; not on the event loop
    positions = {id(msg): i for i, msg in enumerate(messages)}
    refused = [{"index": positions[id(msg)], "code": record.code, "detail": record.detail} for msg, record in out.refused]
    body = {**ingester.ack_of(out, agent_id).to_dict(), "refused": refused, "cursor": cursor}
    return await _signed_answer(request, signed, body)


def _check_standing(request: Request, ingester: Ingester, agent_id: str, first: str) -> None:
    """403 for an agent whose messages can never verify (no key, revoked), recorded once."""
    sessions = request.app.state.sessions
    with sessions() as session:
        standing = identity.device_key(session, agent_id).standing
    if standing == "ok":
        return
    code = "revoked_agent" if standing == "revoked" else "unknown_agent"
    ingester.counters[f"security.{code}"] += 1
    if ingester.security_throttle.allow(agent_id, "http", code):
        with transaction(sessions) as session:
            session.add(security.event(utcnow(request.app.state.clock), agent_id, "http", code, f"HTTP sync batch from agent {agent_id!r}, which is {'revoked' if code == 'revoked_agent' else 'not registered'}", first.encode()))
    raise AgentNotTrusted(f"agent {agent_id!r} is {'revoked' if code == 'revoked_agent' else 'not registered (no public key)'}; nothing it sends is applied")


@router.get(
    "/agents/{agent_id}/sync", response_model=None,
    responses={200: {"model": Cursor, "description": "The cursor, signed by the hub (header Outpost-Answer-Signature)."}, **_AUTH_RESPONSES},
)
async def get_sync_cursor(request: Request, agent_id: Annotated[str, Path(description="The agent.")]) -> Response:
    """The agent's sync cursor: the highest outbox sequence the hub committed
    over HTTP, on which outbox stream. A restarted agent skips the items of
    that stream up to it instead of sending them again. Authenticated like
    the POST; the answer is signed like the POST's."""
    signed = await _authenticate(request, agent_id)
    await _verify(request, signed, b"")

    def read() -> dict[str, Any]:
        with request.app.state.sessions() as session:
            return _cursor_of(session.get(SyncCursor, agent_id), agent_id)

    return await _signed_answer(request, signed, await run_in_threadpool(read))

