"""The durable inbox and outbox, on real SQLite files."""

from __future__ import annotations

import sqlite3

import pytest

from agent.queues import Inbox, Outbox, QueueError
from shared.hlc import HLC
from shared.messages import Assign, JobError, Result

NOW = 1_767_225_600.0


def assign(aid="a-1", **fields):
    return Assign(aid, "dag", "run", "task", 1, fields.pop("job_type", "noop"), fields.pop("params", {"echo": 1, "sleep": 0}), **fields)


def result(aid="a-1", status="success"):
    error = JobError("boom", "it broke", False) if status == "failed" else None
    return Result(aid, 1, status, {"ok": True} if status == "success" else None, error, NOW, NOW + 1)


@pytest.fixture
def inbox(state_dir):
    queue = Inbox(state_dir / "inbox.sqlite3")
    yield queue
    queue.close()


@pytest.fixture
def outbox(state_dir):
    queue = Outbox(state_dir / "outbox.sqlite3")
    yield queue
    queue.close()


def test_same_assignment_stored_twice_is_a_duplicate(inbox):
    _, duplicate = inbox.put(assign())
    assert duplicate is False
    _, duplicate = inbox.put(assign())
    assert duplicate is True
    assert inbox.depth() == 1


def test_redelivery_with_params_in_another_order_is_the_same_assignment(inbox):
    inbox.put(assign(params={"echo": 1, "sleep": 0}))
    _, duplicate = inbox.put(assign(params={"sleep": 0, "echo": 1}))
    assert duplicate is True


def test_same_id_with_different_content_keeps_the_first_and_counts_as_duplicate(inbox, caplog):
    inbox.put(assign(params={"echo": "first"}))
    _, duplicate = inbox.put(assign(params={"echo": "second"}))
    assert duplicate is True
    claimed = inbox.claim()
    assert claimed is not None and claimed.assign.params == {"echo": "first"}
    assert "different content" in caplog.text


def test_finished_assignment_is_still_recognised_as_duplicate(inbox):
    inbox.put(assign())
    claimed = inbox.claim()
    assert claimed is not None and inbox.done(claimed)
    assert inbox.depth() == 0
    _, duplicate = inbox.put(assign())
    assert duplicate is True
    assert inbox.claim() is None  # never queued again


def test_claims_come_oldest_first_and_each_only_once(inbox):
    for aid in ("a-1", "a-2", "a-3"):
        inbox.put(assign(aid))
    first, second = inbox.claim(), inbox.claim()
    assert [first.assignment_id, second.assignment_id] == ["a-1", "a-2"]  # type: ignore[union-attr]
    assert inbox.depth() == 3  # claimed items are still pending
    assert inbox.assignment("a-1")[1] == "claimed"  # type: ignore[index]


def test_claims_of_a_dead_process_return_to_ready_at_startup(state_dir):
    first = Inbox(state_dir / "inbox.sqlite3")
    first.put(assign("a-1"))
    assert first.claim() is not None
    first.close()  # the process "dies" holding the claim
    second = Inbox(state_dir / "inbox.sqlite3")
    try:
        assert second.claim() is None
        assert second.release_expired_claims(0) == 1
        again = second.claim()
        assert again is not None and again.assignment_id == "a-1" and again.claim_id == 2
    finally:
        second.close()


def test_claims_return_at_startup_even_when_the_device_clock_went_back(state_dir):
    """A device without a real-time clock may boot with its clock behind the
    time it claimed work; the claims must come back all the same."""
    import sqlite3

    first = Inbox(state_dir / "inbox.sqlite3")
    first.put(assign("a-1"))
    assert first.claim() is not None
    first.close()
    with sqlite3.connect(state_dir / "inbox.sqlite3") as conn:  # claimed "in the future"
        conn.execute('UPDATE "Queue" SET lock_time = lock_time + 3600000000000 WHERE status = 1')
    second = Inbox(state_dir / "inbox.sqlite3")
    try:
        assert second.release_expired_claims(0) == 1
        assert second.claim() is not None
    finally:
        second.close()


def test_stale_claim_cannot_finish_an_item_claimed_again(inbox):
    inbox.put(assign())
    old = inbox.claim()
    inbox.release_expired_claims(0)
    new = inbox.claim()
    assert inbox.done(old) is False  # type: ignore[arg-type]
    assert inbox.done(new) is True  # type: ignore[arg-type]


def test_prune_forgets_only_items_finished_before_the_retention(inbox):
    inbox.put(assign("a-1"))
    inbox.put(assign("a-2"))
    claimed = inbox.claim()
    inbox.done(claimed)  # type: ignore[arg-type]
    done_ns = inbox._q.conn.execute('SELECT done_time FROM "Queue" WHERE idempotency_key = ?', ("a-1",)).fetchone()[0]
    finished_at = done_ns / 1e9
    assert inbox.prune_done(3600, now=finished_at + 10) == 0  # still within retention
    assert inbox.prune_done(3600, now=finished_at + 3601) == 1
    assert inbox.get("a-1") is None and inbox.get("a-2") is not None  # pending item untouched


def test_queue_files_are_wal_with_the_configured_synchronous_mode(state_dir):
    for mode, expected in (("FULL", 2), ("NORMAL", 1)):
        queue = Inbox(state_dir / f"inbox-{mode}.sqlite3", synchronous=mode)
        try:
            assert queue._q.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert queue._q.conn.execute("PRAGMA synchronous").fetchone()[0] == expected
        finally:
            queue.close()


def test_unusable_queue_file_is_a_queue_error(state_dir):
    path = state_dir / "inbox.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(QueueError) as info:
        Inbox(path)
    assert str(path) in str(info.value)


def test_foreign_database_is_refused(state_dir):
    path = state_dir / "inbox.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE other (x)")
    conn.close()
    with pytest.raises(QueueError):
        Inbox(path)


def test_outbox_keeps_one_result_per_assignment(outbox):
    assert outbox.put_result(result(), HLC(10, 0, "dev-1")) is True
    assert outbox.put_result(result(status="failed"), HLC(11, 0, "dev-1")) is False
    pending = outbox.claim()
    assert pending is not None and pending.result.status == "success" and pending.hlc == HLC(10, 0, "dev-1")
    assert outbox.has("a-1") and not outbox.has("a-2")


def test_outbox_item_is_done_only_when_acknowledged(outbox):
    outbox.put_result(result("a-1"), HLC(10, 0, "dev-1"))
    outbox.put_result(result("a-2"), HLC(11, 0, "dev-1"))
    assert outbox.claim().assignment_id == "a-1"  # type: ignore[union-attr]
    assert outbox.depth() == 2  # in flight still counts
    assert outbox.ack(["a-1", "unknown"], NOW) == 1
    assert outbox.depth() == 1
    # An ack for a result that is not in flight yet (e.g. after a restart) counts too.
    assert outbox.ack(["a-2"], NOW) == 1
    assert outbox.depth() == 0 and outbox.claim() is None
    assert outbox.ack(["a-2"], NOW) == 0  # repeated acks change nothing
    assert outbox.has("a-1")  # acked results are remembered until pruned


def test_outbox_survives_reopening_in_order(state_dir):
    first = Outbox(state_dir / "outbox.sqlite3")
    for i in range(5):
        first.put_result(result(f"a-{i}"), HLC(10 + i, 0, "dev-1"))
    first.claim()
    first.close()
    second = Outbox(state_dir / "outbox.sqlite3")
    try:
        second.release_expired_claims(0)
        order = [second.claim().assignment_id for _ in range(5)]  # type: ignore[union-attr]
        assert order == [f"a-{i}" for i in range(5)]
    finally:
        second.close()
