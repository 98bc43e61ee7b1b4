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
* a claim is a litequeue lock with a lease: claims held by a process that
  died go back to ready with ``release_expired_claims(0)`` at start-up, and
  while running a claim whose lease ran out (not renewed with ``renew``: the
  worker that held it is gone) goes back with ``release_expired_claims(lease)``.

Lock times are written and compared with the agent's :class:`Clock`, not
litequeue's own ``time.time_ns()``, so a test's manual clock and the device's
clock are the same clock. Device clocks jump (no RTC, NTP syncing late), so a
lease is only a hint: a sweep never releases a claim its caller says it still
holds (``keep``), and a lock time more than a lease *ahead* of now (the clock
went back) counts as expired like one a lease behind.

Where litequeue has no call for what is needed (is this key new? mark done by
key, prune by age, list items), this module runs SQL on litequeue's ``Queue``
table through litequeue's own write connection and transaction, relying on its
documented columns: ``data``, ``message_id``, ``status``, ``done_time``
(Unix nanoseconds), ``idempotency_key``, ``claim_id``, ``lock_time``. One
private attribute is used too, litequeue 0.14's re-entrant
``_write_connection_lock``: a failed COMMIT is rolled back under it (``_tx``),
and one private constant, ``_READ_CONNECTION_POOL_SIZE``, which the fleet
simulator lowers (:func:`set_read_pool_size`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litequeue import LiteQueue, MessageStatus

from shared.clock import Clock, SystemClock
from shared.errors import InvalidMessage, OutpostError
from shared.hlc import HLC
from shared.messages import AgentEvent, Assign, LogChunk, Result

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


#: Set once any queue file is open: the read pool size may not change after.
_opened = False


def set_read_pool_size(size: int) -> None:
    """How many read-only SQLite connections litequeue opens per queue file
    (its default is 10: up to 20 file descriptors per queue). This module
    reads through the write connection everywhere but ``active_count``, so a
    process holding many agents (the fleet simulator) sets 1 before opening
    any queue. Process-wide, because litequeue reads the size from a module
    constant at open *and* at close: changing it with a queue open would
    make that queue's close wait forever or leak connections."""
    import litequeue

    if size < 1:
        raise ValueError("the read pool needs at least one connection")
    if _opened and size != litequeue._READ_CONNECTION_POOL_SIZE:
        raise QueueError("the read pool size can only change before the first queue file is opened")
    litequeue._READ_CONNECTION_POOL_SIZE = size


def _open(path: Path, synchronous: str) -> LiteQueue:
    global _opened
    _opened = True
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

    def __init__(self, path: str | Path, synchronous: str = "FULL", clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.clock: Clock = clock or SystemClock()
        self._q = _open(self.path, synchronous)

    def synchronous(self) -> str:
        """The ``PRAGMA synchronous`` mode commits use (NORMAL or FULL)."""
        with self._tx("reading a setting"):
            value = self._q.conn.execute("PRAGMA synchronous").fetchall()[0][0]
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[int(value)]

    def disk_usage(self) -> int:
        """Bytes this queue holds on disk: the pages in use in the main file
        plus the write-ahead log. Free pages are left out: SQLite reuses them
        but never gives them back, so counting them would keep a drained
        queue looking full forever."""
        # In a transaction only for litequeue's lock: the write connection is
        # shared by threads, and a statement of ours left open on it while
        # another thread commits fails that commit.
        with self._tx("measuring"):
            conn = self._q.conn
            page_size = conn.execute("PRAGMA page_size").fetchall()[0][0]
            used = conn.execute("PRAGMA page_count").fetchall()[0][0] - conn.execute("PRAGMA freelist_count").fetchall()[0][0]
        try:
            wal = self.path.with_name(self.path.name + "-wal").stat().st_size
        except FileNotFoundError:
            wal = 0
        return int(used * page_size + wal)

    def truncate_wal(self) -> None:
        """Checkpoint and empty the write-ahead log (it keeps its largest size
        otherwise). Best effort: a busy reader just leaves it as it is."""
        # Its own short connection: a checkpoint cannot run inside a
        # transaction, and litequeue's connection is only safe inside one.
        with _errors(self.path, "checkpointing"), contextlib.closing(sqlite3.connect(self.path, timeout=5.0)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def renew(self, claims: Iterable[Claimed | PendingResult]) -> int:
        """Restart the lease of claims this process still holds (lock time
        set to now); returns how many were renewed. A claim that is stale
        (released and taken again, or finished) is left alone."""
        rows = [(self._now_ns(), c.message_id, c.claim_id) for c in claims]
        if not rows:
            return 0
        with self._tx("renewing claims", "IMMEDIATE"):
            before = self._q.conn.total_changes
            self._q.conn.executemany(
                f'UPDATE "Queue" SET lock_time = ? WHERE message_id = ? AND claim_id = ? AND status = {MessageStatus.LOCKED.value}', rows
            )
            return self._q.conn.total_changes - before

    def _now_ns(self) -> int:
        return int(self.clock.now() * _NS)

    def _pop(self) -> tuple[str, str, int] | None:
        """Claim the oldest ready item: (message id, data, claim id). The
        same statement as litequeue's pop, but the lock time is the agent's
        clock (see the module docstring)."""
        with self._tx("claiming", "IMMEDIATE"):
            row = self._q.conn.execute(
                f"""UPDATE "Queue" SET status = {MessageStatus.LOCKED.value}, lock_time = ?, claim_id = claim_id + 1
                    WHERE rowid = (SELECT rowid FROM "Queue" WHERE status = {MessageStatus.READY.value} ORDER BY message_id LIMIT 1)
                    RETURNING message_id, data, claim_id""",
                (self._now_ns(),),
            ).fetchall()  # all: an UPDATE ... RETURNING not stepped to its end blocks the commit
        return None if not row else (row[0]["message_id"], row[0]["data"], row[0]["claim_id"])

    def close(self) -> None:
        self._q.close()

    @contextmanager
    def _tx(self, action: str, mode: str = "DEFERRED") -> Iterator[None]:
        """litequeue's transaction, errors as QueueError naming ``action``.
        A COMMIT that fails (a full disk) may leave SQLite's transaction
        open, and then every later BEGIN fails; it is rolled back here, under
        litequeue's (re-entrant) write lock, so the queue works again as soon
        as the cause is gone."""
        with self._q._write_connection_lock:
            try:
                with _errors(self.path, action), self._q.transaction(mode):
                    yield
            finally:
                if self._q.conn.in_transaction:
                    self._q.conn.rollback()

    def depth(self) -> int:
        """Items not finished yet: ready plus claimed."""
        with _errors(self.path, "counting"):
            return self._q.active_count()

    def release_expired_claims(self, lease_seconds: float, keep: Iterable[Claimed | PendingResult] = ()) -> int:
        """Return claims whose lease ran out to ready; returns how many.

        With 0 (at start-up) every claim becomes ready again: the process
        that held them is dead, whatever their lock times say. Otherwise a
        claim expires when its lock time is more than ``lease_seconds`` away
        from now on the agent's clock, behind or ahead; claims in ``keep``
        (those the caller still holds) never do."""
        with self._tx("releasing claims", "IMMEDIATE"):
            if lease_seconds <= 0:
                # Not retry_expired(0): it compares claim times with the wall
                # clock, and a device that boots with its clock behind (no RTC,
                # NTP not synced yet) would keep every claim locked.
                cursor = self._q.conn.execute(
                    'UPDATE "Queue" SET status = ?, lock_time = NULL WHERE status = ?', (MessageStatus.READY.value, MessageStatus.LOCKED.value)
                )
                return cursor.rowcount
            now, lease = self._now_ns(), int(lease_seconds * _NS)
            held = {(c.message_id, c.claim_id) for c in keep}
            expired = [
                (r["message_id"], r["claim_id"], r["idempotency_key"])
                for r in self._q.conn.execute(
                    'SELECT message_id, claim_id, idempotency_key FROM "Queue" WHERE status = ? AND (lock_time IS NULL OR lock_time < ? OR lock_time > ?)',
                    (MessageStatus.LOCKED.value, now - lease, now + lease),
                )
                if (r["message_id"], r["claim_id"]) not in held
            ]
            for message_id, claim_id, key in expired:
                log.warning("%s: the claim on %s outlived its %.0fs lease; it is ready again", self.path.name, key, lease_seconds)
                self._q.conn.execute(
                    'UPDATE "Queue" SET status = ?, lock_time = NULL WHERE message_id = ? AND claim_id = ? AND status = ?',
                    (MessageStatus.READY.value, message_id, claim_id, MessageStatus.LOCKED.value),
                )
            return len(expired)

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
        with self._tx("pruning", "IMMEDIATE"):
            cursor = self._q.conn.execute(
                'DELETE FROM "Queue" WHERE status IN (?, ?) AND done_time < ?',
                (MessageStatus.DONE.value, MessageStatus.FAILED.value, cutoff),
            )
            return cursor.rowcount

    def _select(self, clause: str, args: tuple[Any, ...]) -> list[Entry]:
        with self._tx("reading"):
            rows = self._q.conn.execute(f'SELECT idempotency_key, status, data, message_id FROM "Queue" {clause}', args).fetchall()
        return [Entry(r["idempotency_key"], _STATUS_NAMES[MessageStatus(r["status"])], json.loads(r["data"]), r["message_id"]) for r in rows]

    def _put(self, key: str, data: str) -> tuple[str, bool]:
        """Store ``data`` under ``key`` unless the key exists. Returns the
        message id and whether the key already existed. A key stored with
        different data is logged and treated as already there: the first
        version wins and nothing runs or is sent twice."""
        with self._tx("storing", "IMMEDIATE"):
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
            popped = self._pop()
            if popped is None:
                return None
            message_id, data, claim_id = popped
            try:
                assign = Assign.from_dict(json.loads(data))
            except (ValueError, InvalidMessage) as exc:
                # Only a build that stored a different Assign shape gets here;
                # park the item as failed rather than crash on it forever.
                log.error("inbox item %s is unreadable (%s); marked failed", message_id, exc)
                with _errors(self.path, "setting aside"):
                    self._q.mark_failed(message_id, claim_id=claim_id)
                continue
            return Claimed(assign, message_id, claim_id)

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


#: Outbox keys of log chunks: ``log/<assignment id>/<seq>``; the hub acknowledges
#: them as ``<assignment id>/<seq>`` (``Ack.log_ids``).
LOG_KEY_PREFIX = "log/"


def log_key(log_id: str) -> str:
    """The outbox key of the chunk the hub calls ``log_id`` (``<aid>/<seq>``)."""
    return LOG_KEY_PREFIX + log_id


def log_id(chunk: LogChunk) -> str:
    return f"{chunk.assignment_id}/{chunk.seq}"


@dataclass(frozen=True, slots=True)
class PendingResult:
    """A result, or an agent event, waiting in the outbox for the hub's
    acknowledgement. Both travel the same way: sent until acknowledged."""

    result: Result | AgentEvent | LogChunk
    hlc: HLC
    message_id: str
    claim_id: int

    @property
    def assignment_id(self) -> str:
        """The outbox key: the assignment id, or ``event/<id>`` for an event."""
        if isinstance(self.result, AgentEvent):
            return event_key(self.result.event_id)
        if isinstance(self.result, LogChunk):
            return log_key(log_id(self.result))
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

    def put_log(self, chunk: LogChunk, hlc: HLC) -> bool:
        """Durably store a log chunk (sent like a result until the hub
        acknowledges ``<aid>/<seq>``). False when that chunk is already stored."""
        data = canonical_json({"hlc": str(hlc), "log": chunk.to_dict()})
        return not self._put(log_key(log_id(chunk)), data)[1]

    def has(self, assignment_id: str) -> bool:
        """True when a result for this assignment is stored, acked or not."""
        return self.get(assignment_id) is not None

    def claim(self) -> PendingResult | None:
        """Claim the oldest result not yet in flight, or None."""
        while True:
            popped = self._pop()
            if popped is None:
                return None
            message_id, data, claim_id = popped
            try:
                return self._item(data, message_id, claim_id)
            except (ValueError, KeyError, TypeError, OutpostError) as exc:
                # Set aside (status failed, kept for inspection), never retried
                # forever in front of the results behind it.
                log.error("outbox item %s is unreadable and is set aside: %s", message_id, exc)
                with _errors(self.path, "setting aside"):
                    self._q.mark_failed(message_id, claim_id=claim_id)

    def drop_acked(self) -> int:
        """Forget every acknowledged item now, retention or not (to make room
        under the disk quota); returns how many. Unacknowledged and
        set-aside items stay."""
        with self._tx("pruning", "IMMEDIATE"):
            return self._q.conn.execute('DELETE FROM "Queue" WHERE status = ?', (MessageStatus.DONE.value,)).rowcount

    @staticmethod
    def _item(data: str, message_id: str, claim_id: int) -> PendingResult:
        """A stored item read back (every item kind is decoded here).
        Raises ValueError, KeyError, TypeError or OutpostError when unreadable."""
        doc = json.loads(data)
        body: Result | AgentEvent | LogChunk
        if "event" in doc:
            body = AgentEvent.from_dict(doc["event"])
        elif "log" in doc:
            body = LogChunk.from_dict(doc["log"])
        else:
            body = Result.from_dict(doc["result"])
        return PendingResult(body, HLC.parse(doc["hlc"]), message_id, claim_id)

    def ack(self, assignment_ids: Iterable[str], now: float) -> int:
        """Mark these results acknowledged (done), whether in flight or not;
        returns how many changed. Unknown or already acked ids are ignored."""
        ids = list(assignment_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with self._tx("acknowledging", "IMMEDIATE"):
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
