"""A full disk during a queue write fails cleanly and recovers.

The queues live on a real 2 MiB tmpfs mounted for the test (``mount -t
tmpfs``, which needs root; the test is skipped with the reason when mounting
is not permitted) and filled to the last byte with a filler file. Writes
then fail with ``QueueError``, never a crash; an assignment that could not be
stored is not acknowledged; a computed result is retried until it fits; and
once the filler is deleted everything proceeds, nothing lost and nothing
doubled.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.queues import Inbox, Outbox, QueueError
from shared.hlc import HLC
from shared.messages import Assign, Result

from .conftest import wait_until

BIG = "x" * 100_000


class SmallDisk:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.filler = root / "filler"

    def fill(self) -> int:
        """Take every free byte; returns how many were taken."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        taken = 0
        try:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        taken += os.write(fd, b"\0" * size)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)
        return taken

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    root = tmp_path / "small"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(root)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield SmallDisk(root)
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)


def assign(aid: str, echo: str = "x") -> Assign:
    return Assign(aid, "dag", "run", "task", 1, "noop", {"echo": echo})


def test_queue_writes_on_a_full_disk_raise_queue_error_and_work_again_once_freed(small_disk):
    inbox = Inbox(small_disk.root / "inbox.sqlite3", "FULL")
    outbox = Outbox(small_disk.root / "outbox.sqlite3", "FULL")
    try:
        inbox.put(assign("before"))
        assert small_disk.fill() > 0
        with pytest.raises(QueueError, match="disk is full"):
            inbox.put(assign("during", BIG))
        with pytest.raises(QueueError):  # SQLite says "disk is full" or "disk I/O error", depending on where it ran out
            outbox.put_result(Result("before", 1, "success", {"echo": BIG}, None, 1.0, 2.0), HLC(1, 0, "dev"))
        assert [e.key for e in inbox.items()] == ["before"]  # reads still work, nothing half-written
        small_disk.free()
        assert inbox.put(assign("during", BIG))[1] is False  # stored now, as new
        assert inbox.put(assign("during", BIG))[1] is True
        assert outbox.put_result(Result("before", 1, "success", {"echo": BIG}, None, 1.0, 2.0), HLC(1, 0, "dev")) is True
        assert [e.key for e in inbox.items()] == ["before", "during"] and [e.key for e in outbox.items()] == ["before"]
    finally:
        inbox.close()
        outbox.close()


def test_agent_on_a_full_disk_refuses_nothing_silently_and_recovers_everything(make_agent, hub, small_disk):
    state = small_disk.root / "state"
    agent = make_agent(state_dir=state)
    hub.assign("slow", params={"echo": BIG, "sleep": 1.0})
    hub.wait_for("started", "slow")
    small_disk.fill()

    hub.assign("big", params={"echo": BIG})  # cannot be stored: not acknowledged, not accepted
    wait_until(lambda: agent.counters.snapshot().get("errors.inbound"), 10, "the failed store")
    assert not hub.of("accepted", "big") and agent.inbox.get("big") is None
    # "slow" finished meanwhile; its result does not fit and is retried, not dropped.
    wait_until(lambda: agent.counters.snapshot().get("errors.outbox_write", 0) >= 2, 10, "the result retried")
    assert not hub.of("result", "slow") and agent.inbox.get("slow").status == "claimed"
    assert agent.link.wait_connected(1)  # the agent itself is fine: still connected, still beating
    beats = len(hub.of("heartbeat"))
    wait_until(lambda: len(hub.of("heartbeat")) > beats, 5, "a heartbeat on a full disk")

    small_disk.free()
    result = hub.wait_for("result", "slow", timeout=15)[0]
    assert result.status == "success" and result.output == {"echo": BIG}
    hub.ack("slow")
    wait_until(lambda: agent.outbox.depth() == 0 and agent.inbox.depth() == 0, 5, "slow finished and acknowledged")
    agent.stop(timeout=2)

    # The broker still holds "big" unacknowledged and redelivers it to the next session.
    again = make_agent(state_dir=state)
    assert hub.wait_for("result", "big", timeout=15)[0].output == {"echo": BIG}
    hub.ack("big")
    wait_until(lambda: again.outbox.depth() == 0, 5, "big acknowledged")
    assert {aid: len(hub.of("started", aid)) for aid in ("slow", "big")} == {"slow": 1, "big": 1}
    assert len({e.hlc for e in hub.envelopes("result") if e.body.assignment_id == "slow"}) == 1  # one result, maybe sent twice
    assert [(e.key, e.status) for e in again.outbox.items()] == [("slow", "done"), ("big", "done")]
    assert [(e.key, e.status) for e in again.inbox.items()] == [("slow", "done"), ("big", "done")]
