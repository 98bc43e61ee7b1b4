"""The agent's durable queues: the inbox of assignments and the outbox of results.

Both are litequeue 0.14 queues, one SQLite file each (litequeue allows one
``Queue`` table per file), in WAL mode with ``PRAGMA synchronous`` from the
settings (litequeue itself sets NORMAL; FULL is the default here because a
device can lose power). This is the only module that imports litequeue.

The delivery contract (ARCHITECTURE.md, "Delivery contract") rests on three
facts enforced here:

* the inbox is keyed by assignment id, so a redelivered assignment is found
  rather than queued again, and finished entries are kept for a retention
  period (``prune_done``) so a late redelivery is still recognised;
* the outbox is keyed by assignment id too, so one assignment has at most one
  result, and an item leaves it only when the hub acknowledges it (``ack``);
* a claim is a litequeue lock; claims held by a process that died go back to
  ready with ``release_expired_claims(0)`` at start-up.

Where litequeue has no call for what is needed (is this key new? mark done by
key, prune by age, list items), this module runs SQL on litequeue's ``Queue``
table through litequeue's own write connection and transaction, relying on its
documented columns: ``data``, ``message_id``, ``status``, ``done_time``
(Unix nanoseconds), ``idempotency_key``, ``claim_id``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litequeue import LiteQueue, MessageStatus

from shared.errors import InvalidMessage, OutpostError
from shared.hlc import HLC
from shared.messages import AgentEvent, Assign, Result

log = logging.getLogger(__name__)

_NS = 1_000_000_000
_STATUS_NAMES = {
    MessageStatus.READY: "ready",
    MessageStatus.LOCKED: "claimed",
    MessageStatus.DONE: "done",
    MessageStatus.FAILED: "failed",
}


class QueueError(OutpostError):
    """A queue file cannot be opened or written."""

    code = "queue_error"


@contextmanager
def _errors(path: Path, action: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise QueueError(f"{action} failed on {path}: {exc}; check the disk and the file's permissions") from exc


def _open(path: Path, synchronous: str) -> LiteQueue:
    if synchronous not in ("NORMAL", "FULL"):
        raise QueueError(f"sqlite synchronous mode {synchronous!r} is not NORMAL or FULL")
    path.parent.mkdir(parents=True, exist_ok=True)
    with _errors(path, "opening the queue"):
        try:
            queue = LiteQueue(path, timeout=30.0)
        except ValueError as exc:
            raise QueueError(f"{path} is not a queue file: {exc}") from exc
        mode = queue.conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            queue.close()
            raise QueueError(f"{path} is in journal mode {mode!r}, not WAL; is it on a file system without shared memory?")
        # Only the write connection commits, so only it needs the setting.
        queue.conn.execute(f"PRAGMA synchronous = {synchronous}")
    return queue


def canonical_json(value: Any) -> str:
    """Stable JSON: the same value always gives the same text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored queue item, for listings and look-ups."""

    key: str
    status: str
    data: dict[str, Any]
    message_id: str


class _KeyedQueue:
    """What the inbox and the outbox share: a litequeue keyed by assignment id."""

    def __init__(self, path: str | Path, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self._q = _open(self.path, synchronous)

    def close(self) -> None:
        self._q.close()

    def depth(self) -> int:
        """Items not finished yet: ready plus claimed."""
        with _errors(self.path, "counting"):
            return self._q.active_count()

    def release_expired_claims(self, lease_seconds: float) -> int:
        """Return claims older than ``lease_seconds`` to ready. With 0 at
        start-up, every claim a dead process held becomes ready again."""
        with _errors(self.path, "releasing claims"):
            if lease_seconds <= 0:
                # Not retry_expired(0): it compares claim times with the wall
                # clock, and a device that boots with its clock behind (no RTC,
                # NTP not synced yet) would keep every claim locked.
                with self._q.transaction("IMMEDIATE"):
                    cursor = self._q.conn.execute(
                        'UPDATE "Queue" SET status = ?, lock_time = NULL WHERE status = ?', (MessageStatus.READY.value, MessageStatus.LOCKED.value)
                    )
                return cursor.rowcount
            return self._q.retry_expired(lease_seconds)

    def get(self, key: str) -> Entry | None:
        rows = self._select("WHERE idempotency_key = ?", (key,))
        return rows[0] if rows else None

    def items(self, limit: int = 1000) -> list[Entry]:
        """Every stored item, oldest first (finished ones included)."""
        return self._select("ORDER BY message_id LIMIT ?", (limit,))

    def prune_done(self, older_than: float, now: float) -> int:
        """Forget items finished more than ``older_than`` seconds before ``now``
        (epoch seconds; litequeue stamps ``done_time`` with wall time)."""
        cutoff = int((now - older_than) * _NS)
        with _errors(self.path, "pruning"), self._q.transaction("IMMEDIATE"):
            cursor = self._q.conn.execute(
                'DELETE FROM "Queue" WHERE status IN (?, ?) AND done_time < ?',
                (MessageStatus.DONE.value, MessageStatus.FAILED.value, cutoff),
            )
            return cursor.rowcount

    def _select(self, clause: str, args: tuple[Any, ...]) -> list[Entry]:
        with _errors(self.path, "reading"), self._q.transaction():
            rows = self._q.conn.execute(f'SELECT idempotency_key, status, data, message_id FROM "Queue" {clause}', args).fetchall()
        return [Entry(r["idempotency_key"], _STATUS_NAMES[MessageStatus(r["status"])], json.loads(r["data"]), r["message_id"]) for r in rows]

    def _put(self, key: str, data: str) -> tuple[str, bool]:
        """Store ``data`` under ``key`` unless the key exists. Returns the
        message id and whether the key already existed. A key stored with
        different data is logged and treated as already there: the first
        version wins and nothing runs or is sent twice."""
        with _errors(self.path, "storing"), self._q.transaction("IMMEDIATE"):
            # litequeue's put() returns the stored message on a replay but does
            # not say it was one; this look-up in the same transaction does.
            row = self._q.conn.execute('SELECT message_id FROM "Queue" WHERE idempotency_key = ?', (key,)).fetchone()
            if row is not None:
                stored = self._q.conn.execute('SELECT data FROM "Queue" WHERE message_id = ?', (row[0],)).fetchone()
                if stored[0] != data:
                    log.warning("%s: %s is already stored with different content; keeping the first", self.path.name, key)
                return row[0], True
            # Inside this transaction the key is known to be new, so litequeue's
            # IdempotencyConflict (same key, other data) cannot happen here.
            return self._q.put(data, idempotency_key=key).message_id, False


@dataclass(frozen=True, slots=True)
class Claimed:
    """An assignment claimed from the inbox; give it back with ``Inbox.done``."""

    assign: Assign
    message_id: str
    claim_id: int

    @property
    def assignment_id(self) -> str:
        return self.assign.assignment_id


class Inbox(_KeyedQueue):
    """Assignments this agent accepted, keyed by assignment id.

    The stored data is the canonical JSON of the Assign body, so the same
    assignment redelivered in a new envelope is the same data.
    """

    def put(self, assign: Assign) -> tuple[str, bool]:
        """Durably store ``assign``; returns (message id, duplicate). When this
        returns, the assignment survives a crash and may be acknowledged."""
        return self._put(assign.assignment_id, canonical_json(assign.to_dict()))

    def claim(self) -> Claimed | None:
        """Claim the oldest ready assignment, or None when none is ready."""
        while True:
            with _errors(self.path, "claiming"):
                message = self._q.pop()
            if message is None:
                return None
            try:
                assign = Assign.from_dict(json.loads(message.data))
            except (ValueError, InvalidMessage) as exc:
                # Only a build that stored a different Assign shape gets here;
                # park the item as failed rather than crash on it forever.
                log.error("inbox item %s is unreadable (%s); marked failed", message.message_id, exc)
                self._q.mark_failed(message.message_id, claim_id=message.claim_id)
                continue
            return Claimed(assign, message.message_id, message.claim_id)

    def done(self, claimed: Claimed) -> bool:
        """Mark a claimed assignment finished. False when the claim is stale
        (its lock was released and taken again meanwhile)."""
        with _errors(self.path, "finishing"):
            return self._q.done(claimed.message_id, claim_id=claimed.claim_id)

    def assignment(self, assignment_id: str) -> tuple[Assign, str] | None:
        """The stored assignment and its status (ready, claimed, done), or None."""
        entry = self.get(assignment_id)
        return None if entry is None else (Assign.from_dict(entry.data), entry.status)


#: Outbox keys of agent events: ``event/<event id>`` (assignment ids never contain "/").
EVENT_KEY_PREFIX = "event/"


def event_key(event_id: str) -> str:
    return EVENT_KEY_PREFIX + event_id


@dataclass(frozen=True, slots=True)
class PendingResult:
    """A result, or an agent event, waiting in the outbox for the hub's
    acknowledgement. Both travel the same way: sent until acknowledged."""

    result: Result | AgentEvent
    hlc: HLC
    message_id: str
    claim_id: int

    @property
    def assignment_id(self) -> str:
        """The outbox key: the assignment id, or ``event/<id>`` for an event."""
        if isinstance(self.result, AgentEvent):
            return event_key(self.result.event_id)
        return self.result.assignment_id


class Outbox(_KeyedQueue):
    """Results waiting for the hub, keyed by assignment id, and agent
    events, keyed ``event/<event id>``.

    An item is claimed while it is in flight (sent, not acknowledged) and
    becomes done only through :meth:`ack`. The HLC stamp taken when the job
    finished is stored with the result and sent with every (re)send.
    """

    def put_result(self, result: Result, hlc: HLC) -> bool:
        """Durably store a result. Returns False when this assignment already
        has one (the first stays: an assignment has one outcome)."""
        data = canonical_json({"hlc": str(hlc), "result": result.to_dict()})
        return not self._put(result.assignment_id, data)[1]

    def put_event(self, event: AgentEvent, hlc: HLC) -> bool:
        """Durably store an agent event (it is sent like a result, until the
        hub acknowledges its id). False when that event id is already stored."""
        data = canonical_json({"hlc": str(hlc), "event": event.to_dict()})
        return not self._put(event_key(event.event_id), data)[1]

    def has(self, assignment_id: str) -> bool:
        """True when a result for this assignment is stored, acked or not."""
        return self.get(assignment_id) is not None

    def claim(self) -> PendingResult | None:
        """Claim the oldest result not yet in flight, or None."""
        while True:
            with _errors(self.path, "claiming"):
                message = self._q.pop()
            if message is None:
                return None
            try:
                return self._item(message.data, message.message_id, message.claim_id)
            except (ValueError, KeyError, TypeError, OutpostError) as exc:
                # Set aside (status failed, kept for inspection), never retried
                # forever in front of the results behind it.
                log.error("outbox item %s is unreadable and is set aside: %s", message.message_id, exc)
                with _errors(self.path, "setting aside"):
                    self._q.mark_failed(message.message_id, claim_id=message.claim_id)

    @staticmethod
    def _item(data: str, message_id: str, claim_id: int) -> PendingResult:
        """A stored item read back (every item kind is decoded here).
        Raises ValueError, KeyError, TypeError or OutpostError when unreadable."""
        doc = json.loads(data)
        body: Result | AgentEvent = AgentEvent.from_dict(doc["event"]) if "event" in doc else Result.from_dict(doc["result"])
        return PendingResult(body, HLC.parse(doc["hlc"]), message_id, claim_id)

    def ack(self, assignment_ids: Iterable[str], now: float) -> int:
        """Mark these results acknowledged (done), whether in flight or not;
        returns how many changed. Unknown or already acked ids are ignored."""
        ids = list(assignment_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with _errors(self.path, "acknowledging"), self._q.transaction("IMMEDIATE"):
            cursor = self._q.conn.execute(
                f'UPDATE "Queue" SET status = ?, done_time = ? WHERE status IN (?, ?) AND idempotency_key IN ({marks})',
                (MessageStatus.DONE.value, int(now * _NS), MessageStatus.READY.value, MessageStatus.LOCKED.value, *ids),
            )
            return cursor.rowcount

    # --- HTTP bulk sync (agent.sync) -----------------------------------------
    # Outbox order is litequeue's message id order: UUIDv7 text, which sorts
    # by creation time and, within one process, strictly increases.

    def oldest(self, limit: int) -> list[PendingResult]:
        """Up to ``limit`` pending items (ready or in flight), oldest first,
        without claiming them: one read instead of a commit per item. An
        unreadable item is set aside, as ``claim`` does."""
        with _errors(self.path, "reading"), self._q.transaction():
            # One query per status, each an ordered walk of the (status,
            # message_id) index, rather than sorting every pending row.
            rows = [
                row
                for status in (MessageStatus.LOCKED, MessageStatus.READY)
                for row in self._q.conn.execute(
                    'SELECT data, message_id, claim_id FROM "Queue" WHERE status = ? ORDER BY message_id LIMIT ?', (status.value, limit)
                ).fetchall()
            ]
        rows = sorted(rows, key=lambda r: r["message_id"])[:limit]
        items = []
        for row in rows:
            try:
                items.append(self._item(row["data"], row["message_id"], row["claim_id"]))
            except (ValueError, KeyError, TypeError, OutpostError) as exc:
                log.error("outbox item %s is unreadable and is set aside: %s", row["message_id"], exc)
                with _errors(self.path, "setting aside"), self._q.transaction("IMMEDIATE"):
                    self._q.conn.execute('UPDATE "Queue" SET status = ? WHERE message_id = ?', (MessageStatus.FAILED.value, row["message_id"]))
        return items

    def newest_message_id(self) -> str | None:
        """The highest message id stored (any status), or None when empty."""
        with _errors(self.path, "reading"), self._q.transaction():
            row = self._q.conn.execute('SELECT MAX(message_id) FROM "Queue"').fetchone()
        return row[0] if row else None

    def ack_through(self, message_id: str, now: float) -> list[str]:
        """Mark done every pending item up to and including ``message_id``
        (the hub's sync cursor); returns their keys."""
        with _errors(self.path, "acknowledging"), self._q.transaction("IMMEDIATE"):
            rows = self._q.conn.execute(
                'UPDATE "Queue" SET status = ?, done_time = ? WHERE status IN (?, ?) AND message_id <= ? RETURNING idempotency_key',
                (MessageStatus.DONE.value, int(now * _NS), MessageStatus.READY.value, MessageStatus.LOCKED.value, message_id),
            ).fetchall()
        return [r[0] for r in rows]

    def set_aside(self, keys: Iterable[str], now: float) -> int:
        """Park pending items as failed (kept for inspection, never sent
        again): the hub refused them for good. Returns how many changed."""
        ids = list(keys)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with _errors(self.path, "setting aside"), self._q.transaction("IMMEDIATE"):
            cursor = self._q.conn.execute(
                f'UPDATE "Queue" SET status = ?, done_time = ? WHERE status IN (?, ?) AND idempotency_key IN ({marks})',
                (MessageStatus.FAILED.value, int(now * _NS), MessageStatus.READY.value, MessageStatus.LOCKED.value, *ids),
            )
            return cursor.rowcount
