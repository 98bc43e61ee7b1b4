"""Atomic writes: readers, and a writer killed at any moment, leave the old
content or the new one, never a mix."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared import files
from shared.files import atomic_write

ROOT = Path(__file__).resolve().parents[2]


def test_write_creates_parents_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "key"
    atomic_write(target, b"secret", mode=0o600)
    assert target.read_bytes() == b"secret"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_write_replaces_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_failed_write_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")

    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


WRITER = textwrap.dedent(
    """
    import sys
    from shared.files import atomic_write
    target, old, new = sys.argv[1], b"A" * 200_000, b"B" * 300_000
    print("ready", flush=True)
    while True:
        atomic_write(target, new)
        atomic_write(target, old)
    """
)


def test_readers_and_a_killed_writer_see_old_or_new_never_a_mix(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    old, new = b"A" * 200_000, b"B" * 300_000
    atomic_write(target, old)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"ready\n"
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            content = target.read_bytes()
            assert content in (old, new), f"torn read: {len(content)} bytes"
            seen.add(content[:1])
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(10)
        if writer.stdout is not None:
            writer.stdout.close()
    assert seen == {b"A", b"B"}, "the writer never got to replace the file"
    assert target.read_bytes() in (old, new)
    # A kill leaves at most the temporary file of the write in progress.
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert all(name.startswith(".state.bin.") and name.endswith(".tmp") for name in leftovers)
    assert len(leftovers) <= 1
