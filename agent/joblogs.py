"""The log of one try: captured to a file while the job runs, then cut into
``LogChunk`` messages for the outbox.

Everything a job logs (``ctx.log`` lines and the raw stdout/stderr of its
process and of what it starts) goes, in arrival order, to
``<state_dir>/logs/<assignment>.log``, at most ``max_log_bytes``; what comes
after the cap is dropped and one truncation line says so. When the job is
over the file is read back and split into chunks of at most
:data:`CHUNK_BYTES` of JSON-encoded text (smaller when the agent's envelope
limit demands), which the runner stores in the outbox before the result.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

#: Largest ``LogChunk.data``, in bytes of its JSON encoding.
CHUNK_BYTES = 32 * 1024


def truncation_line(cap: int) -> bytes:
    return f"[outpost: log truncated: the try logged more than {cap} bytes; the rest was dropped]\n".encode()


class LogCapture:
    """One try's log file, written from several threads, capped at ``cap`` bytes."""

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.written = 0
        self.truncated = False
        self._lock = threading.Lock()
        self._file: BinaryIO | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "wb")  # noqa: SIM115 - closed by close(); a new try starts afresh
        except OSError as exc:
            # The job runs all the same, without a log: output is drained and dropped.
            log.warning("cannot write the job log %s (%s); this try's output is dropped", path, exc)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.truncated or self._file is None or self._file.closed:
                return
            room = self.cap - self.written
            try:
                if len(data) > room:
                    self._file.write(data[:room])
                    self._file.write(truncation_line(self.cap))
                    self.written = self.cap
                    self.truncated = True
                else:
                    self._file.write(data)
                    self.written += len(data)
                self._file.flush()
            except OSError as exc:  # a full disk must not stop the job, whose output must still be drained
                log.warning("writing the job log %s failed (%s); the rest of this try's output is dropped", self.path, exc)
                file, self._file = self._file, None
                try:
                    file.close()
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                try:
                    self._file.close()
                except OSError:
                    pass


def split(text: str, budget: int) -> list[str]:
    """``text`` cut into pieces whose JSON string encoding is at most
    ``budget`` bytes (characters are never split)."""
    if budget < 16:
        raise ValueError(f"a log chunk budget of {budget} bytes is too small")
    pieces: list[str] = []
    i = 0
    while i < len(text):
        n = min(budget, len(text) - i)
        while True:
            piece = text[i:i + n]
            if len(json.dumps(piece, ensure_ascii=False).encode()) <= budget:
                break
            # Escapes (control characters) or multi-byte characters made it
            # too big: shrink in proportion, at least by one character.
            size = len(json.dumps(piece, ensure_ascii=False).encode())
            n = max(1, min(n - 1, n * budget // size))
        pieces.append(piece)
        i += n
    return pieces
