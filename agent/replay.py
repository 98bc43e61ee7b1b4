"""The replay window: which of the hub's sequence numbers this device has used.

The hub numbers every assign and cancel it sends to a device (``seq``, one
counter per device in the hub's database). A signed message is accepted once:
its ``seq`` must be newer than ``newest - window`` and not seen before. The
window (not "strictly increasing") is there because hub processes commit
messages slightly out of order and re-publish unconfirmed ones.

Kept in ``<state_dir>/replay.sqlite3`` so a restart does not reopen the
window. A sequence is recorded once the message it came with was handled
(the assignment is in the inbox): a crash before that leaves it unrecorded,
and the broker's redelivery is accepted normally.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

FRESH, SEEN, TOO_OLD = "fresh", "seen", "too_old"


class ReplayWindow:
    def __init__(self, path: Path, window: int, synchronous: str = "FULL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.window = window
        self._lock = threading.Lock()
        # Used from the link's consumer thread; every use holds the lock.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY)")
        self._db.execute("CREATE TABLE IF NOT EXISTS newest (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL)")

    def newest(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT seq FROM newest WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def check(self, seq: int) -> str:
        """``fresh``, ``seen`` or ``too_old`` (at or behind ``newest - window``)."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM newest WHERE id = 1").fetchone()
            newest = int(row[0]) if row else 0
            if newest and seq <= newest - self.window:
                return TOO_OLD
            if self._db.execute("SELECT 1 FROM seen WHERE seq = ?", (seq,)).fetchone():
                return SEEN
        return FRESH

    def record(self, seq: int) -> None:
        """Mark ``seq`` used; forget what fell out of the window."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR IGNORE INTO seen (seq) VALUES (?)", (seq,))
                self._db.execute(
                    "INSERT INTO newest (id, seq) VALUES (1, ?) ON CONFLICT (id) DO UPDATE SET seq = max(seq, excluded.seq)", (seq,)
                )
                newest = self._db.execute("SELECT seq FROM newest WHERE id = 1").fetchone()[0]
                self._db.execute("DELETE FROM seen WHERE seq <= ?", (newest - self.window,))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        with self._lock:
            self._db.close()
