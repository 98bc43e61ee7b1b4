"""DAG processing for the hub: parse DAG files in another process, keep the
serialized DAGs, record them and their versions in the metadata DB.

The hub process never imports a DAG file (Airflow's model): user code
cannot crash, block or bloat the scheduler. ``DagFileProcessor`` sends each
parse round to a long-lived ``python -m hub.dagbag`` process, which forks a
child per changed file with a timeout and a memory limit, and answers with
each file's serialized DAGs or its error (see ``hub.dagbag``).
``SerializedDagBag`` keeps what the files define: a file that now fails
keeps its last good DAGs, a removed file's DAGs go inactive, a dag_id
defined by two files refuses the second. ``sync_to_db`` writes DAG rows,
import errors and, when a DAG's structure changed, a new ``DagVersion``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from select import select as wait_readable
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub import timetables
from hub.dagbag import FileError, list_dag_files
from hub.db import for_update
from hub.models import Dag, DagImportError, DagVersion
from hub.scheduling_options import DEFAULT_MAX_ACTIVE_RUNS, DEFAULT_MAX_ACTIVE_TASKS
from shared.clock import SystemClock

log = logging.getLogger(__name__)


class DagProcessorError(RuntimeError):
    """The parse round itself failed (not a DAG file): nothing was applied."""


def structure_hash(structure: dict[str, Any]) -> str:
    """sha256 of the structure's canonical JSON: equal structures, equal hashes."""
    canonical = json.dumps(structure, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class SerializedDag:
    dag_id: str
    fileloc: str
    structure: dict[str, Any]
    #: Columns of the dags row from the file (see ``hub.dagbag.dag_fields``).
    fields: dict[str, Any]


@dataclass
class RoundStats:
    files: int = 0
    #: Wall time of the whole round, as the hub waited for it.
    seconds: float = 0.0
    #: From sending the round to the parse process starting it: its start-up
    #: (about a second) when it had to be started, next to nothing after.
    startup: float = 0.0
    #: Each file's own parse time (its child's import, validation, serialization).
    per_file: dict[str, float] = field(default_factory=dict)


@dataclass
class DagFileProcessor:
    """Runs parse rounds in the parse process (see ``ParseProcess``): one
    forked child per file, ``parallelism`` at once, each killed at ``timeout``."""

    timeout: float = 30.0
    parallelism: int = 2
    memory_mb: int = 2048
    executable: str = field(default_factory=lambda: sys.executable)
    last_round: RoundStats = field(default_factory=RoundStats)

    def process(self, files: list[str], folder: Path | None = None) -> dict[str, dict[str, Any]]:
        """Parse ``files``; returns each file's result (see ``hub.dagbag.parse_file``).
        Raises ``DagProcessorError`` if the parse process itself failed."""
        if not files:
            return {}
        request = {"files": files, "timeout": self.timeout, "parallelism": self.parallelism, "memory_mb": self.memory_mb, "folder": str(folder) if folder else None}
        # Each child is killed at its own deadline; this bounds the parse
        # process itself, should it ever hang.
        guard = self.timeout * math.ceil(len(files) / self.parallelism) + 60
        started_wall, started = SystemClock().now(), time.perf_counter()
        answer = ParseProcess.shared(self.executable).round(request, guard)
        try:
            results = {r["fileloc"]: r for r in answer["results"]}
        except (KeyError, TypeError) as exc:
            raise DagProcessorError(f"the DAG parse process answered something unreadable: {exc!r}") from None
        self.last_round = RoundStats(
            files=len(files), seconds=time.perf_counter() - started, startup=max(0.0, float(answer.get("started_at", started_wall)) - started_wall),
            per_file={f: float(r.get("duration", 0.0)) for f, r in results.items()},
        )
        log.debug("parsed %d DAG file(s) in %.3f s (waiting for the parse process: %.3f s)", len(files), self.last_round.seconds, self.last_round.startup)
        return results


class ParseProcess:
    """The long-lived ``python -m hub.dagbag`` process: it imports the hub's
    modules once (about a second: hub.dag brings Jinja and jsonschema) and
    forks a fresh child per DAG file, so a round costs each file's own import
    and no interpreter start. One per hub process and Python executable,
    shared by every ``DagFileProcessor``; started on first use and again
    after it died (a DAG file may kill its parent)."""

    _shared: dict[str, ParseProcess] = {}
    _shared_lock = threading.Lock()

    def __init__(self, executable: str) -> None:
        self.executable = executable
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._lock = threading.Lock()

    @classmethod
    def shared(cls, executable: str) -> ParseProcess:
        with cls._shared_lock:
            found = cls._shared.get(executable)
            if found is None:
                found = cls._shared[executable] = cls(executable)
            return found

    @classmethod
    def stop_all(cls) -> None:
        with cls._shared_lock:
            for process in cls._shared.values():
                process.stop()

    def round(self, request: dict[str, Any], guard: float) -> dict[str, Any]:
        with self._lock:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                proc.stdin.flush()
                line = self._read_line(proc.stdout.fileno(), guard)
            except (OSError, DagProcessorError) as exc:
                reason = self._failure(proc, exc)
                raise DagProcessorError(reason) from None
        try:
            answer: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            self.stop()
            raise DagProcessorError(f"the DAG parse process answered something unreadable: {exc}") from None
        return answer

    def stop(self) -> None:
        """Close the process's stdin (it exits when it sees the end) and reap it."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, self._stderr):
            if stream is not None:
                stream.close()
        self._stderr = None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        self.stop()
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [self.executable, "-m", "hub.dagbag", str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            env=_child_env(), close_fds=True,
        )
        return self._proc

    @staticmethod
    def _read_line(fd: int, guard: float) -> bytes:
        deadline = time.monotonic() + guard
        data = bytearray()
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable([fd], [], [], left)[0]:
                raise DagProcessorError(f"the DAG parse process did not answer within {guard:g} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise DagProcessorError("the DAG parse process ended without answering")
            data += chunk
        return bytes(data)

    def _failure(self, proc: subprocess.Popen[bytes], exc: BaseException) -> str:
        """Why the process failed, after ending it for good."""
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            tail = self._stderr.read()[-2000:].decode("utf-8", "replace").strip()
        self.stop()
        how = f"exited with code {code}" if code is not None else "failed"
        return f"the DAG parse process {how} ({exc})" + (f": {tail}" if tail else "")


def _child_env() -> dict[str, str]:
    """The hub's environment, with the hub's own code importable in the
    parse process wherever the hub was started from."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def stop_parse_processes() -> None:
    """End the parse processes of this hub process (at shutdown)."""
    ParseProcess.stop_all()


@dataclass
class SerializedDagBag:
    """The DAGs the folder's files define, as serialized structures. The
    scheduler's view of the DAG folder; it never holds Python DAG objects."""

    folder: Path
    processor: DagFileProcessor = field(default_factory=DagFileProcessor)
    #: Seconds after which an unchanged file is parsed again (Airflow's
    #: ``min_file_process_interval``): a DAG built from data the file reads
    #: (a YAML next to it, an inventory) follows that data. 0: only on change.
    min_file_process_interval: float = 0.0
    #: Seconds for ``min_file_process_interval`` (tests inject their own).
    monotonic: Callable[[], float] = time.monotonic
    errors: dict[str, FileError] = field(default_factory=dict)
    _by_file: dict[str, list[SerializedDag]] = field(default_factory=dict)
    _mtimes: dict[str, float] = field(default_factory=dict)
    _parsed_at: dict[str, float] = field(default_factory=dict)
    #: Answers refused as duplicates, applied again once the other file lets go.
    _refused: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def dags(self) -> dict[str, SerializedDag]:
        return {d.dag_id: d for dags in self._by_file.values() for d in dags}

    def collect(self) -> bool:
        """Parse, in another process, every file whose modification time
        changed and every file last parsed ``min_file_process_interval`` ago.
        Returns True when a file was new, changed or removed, or a periodic
        parse gave a different answer."""
        files = list_dag_files(self.folder)
        changed = [f for f, m in files.items() if self._mtimes.get(f) != m]
        now = self.monotonic()
        due = [] if self.min_file_process_interval <= 0 else [
            f for f in files if f not in changed and now - self._parsed_at.get(f, now) >= self.min_file_process_interval
        ]
        gone = [f for f in self._mtimes if f not in files]
        before = {f: (self._by_file.get(f), self.errors.get(f)) for f in due}
        results, unsettled = self._process(changed + due)
        for fileloc in gone:
            self._by_file.pop(fileloc, None)
            self.errors.pop(fileloc, None)
            self._refused.pop(fileloc, None)
            self._parsed_at.pop(fileloc, None)
            del self._mtimes[fileloc]
        for fileloc in changed + due:
            self._refused.pop(fileloc, None)
            result = results.get(fileloc) or {"error": {"kind": "crash", "error": "the parse round gave no answer for this file"}}
            self._apply(fileloc, result)
            self._parsed_at[fileloc] = now
            if fileloc not in unsettled:
                self._mtimes[fileloc] = files[fileloc]
        different = [f for f in due if (self._by_file.get(f), self.errors.get(f)) != before[f]]
        if changed or gone or different:
            # A dag_id may have been freed by a file parsed after the one it refused.
            for fileloc, result in sorted(self._refused.items()):
                self._apply(fileloc, result)
        return bool(changed or gone or different)

    def _process(self, files: list[str]) -> tuple[dict[str, dict[str, Any]], set[str]]:
        """Each file's result, and the files whose round failed as a whole.
        A failed round is tried again one file per round, so a file that
        takes its round's process down (it may kill its parent) fails alone;
        files whose own round failed are parsed again at the next check."""
        try:
            return self.processor.process(files, self.folder), set()
        except DagProcessorError as exc:
            if len(files) == 1:
                return {files[0]: {"error": {"kind": "crash", "error": str(exc)}}}, set(files)
            log.warning("%s; parsing the %d file(s) one by one", exc, len(files))
        results: dict[str, dict[str, Any]] = {}
        unsettled: set[str] = set()
        for fileloc in files:
            one, failed = self._process([fileloc])
            results.update(one)
            unsettled |= failed
        return results, unsettled

    def _apply(self, fileloc: str, result: dict[str, Any]) -> None:
        # A file that now fails keeps its last good DAGs, so a typo does not
        # stop a fleet's schedule; the error is still recorded.
        error = result.get("error")
        if error:
            self._fail(FileError(fileloc, error["kind"], error["error"]))
            return
        dags = [SerializedDag(d["dag_id"], fileloc, d["structure"], d.get("fields") or {}) for d in result.get("dags", [])]
        owners = {d.dag_id: d.fileloc for f, ds in self._by_file.items() if f != fileloc for d in ds}
        clash = next((d for d in dags if d.dag_id in owners), None)
        if clash is not None:
            self._fail(FileError(fileloc, "duplicate", f"dag_id {clash.dag_id!r} is already defined in {owners[clash.dag_id]}"))
            self._refused[fileloc] = result
            return
        self._refused.pop(fileloc, None)
        self.errors.pop(fileloc, None)
        self._by_file[fileloc] = dags

    def _fail(self, error: FileError) -> None:
        if self.errors.get(error.fileloc) != error:  # said once, not at every periodic parse
            log.warning("DAG file %s: %s: %s", error.fileloc, error.kind, error.error)
        self.errors[error.fileloc] = error

    def sync_to_db(self, session: Session, now: datetime) -> None:
        """Upsert DAG rows, versions and import errors to match this bag."""
        existing = {d.dag_id: d for d in session.scalars(for_update(select(Dag).order_by(Dag.dag_id), session))}
        for dag_id, dag in self.dags.items():
            row = existing.get(dag_id)
            if row is None:
                row = Dag(dag_id=dag_id, is_paused=bool(dag.fields.get("is_paused_upon_creation", False)))
                session.add(row)
            row.fileloc = dag.fileloc
            row.description = dag.fields.get("description")
            schedule = dag.fields.get("schedule")
            if row.schedule != schedule or timetables.schedule_changed(row.structure, dag.structure):
                row.next_run_at = None  # recomputed by the scheduler (a new start date, time zone or catchup too)
            row.schedule = schedule
            row.tags = list(dag.fields.get("tags") or [])
            row.structure = dag.structure
            # The DAG-wide limits as columns too, for queries and the API.
            row.max_active_runs = int(dag.structure.get("max_active_runs") or DEFAULT_MAX_ACTIVE_RUNS)
            row.max_active_tasks = int(dag.structure.get("max_active_tasks") or DEFAULT_MAX_ACTIVE_TASKS)
            row.is_active = True
            row.last_parsed_at = now
            session.flush()  # a new row before its first version (foreign key)
            record_version(session, row, dag.structure, dag.fileloc, now)
        broken_files = set(self.errors)
        for dag_id, row in existing.items():
            # A DAG whose file now fails to import keeps its last good
            # version active: a typo must not stop a fleet's schedule.
            if dag_id not in self.dags and row.fileloc not in broken_files:
                row.is_active = False
        recorded = {e.fileloc: e for e in session.scalars(select(DagImportError))}
        for fileloc, err in self.errors.items():
            row_err = recorded.pop(fileloc, None) or DagImportError(fileloc=fileloc)
            row_err.kind, row_err.error, row_err.recorded_at = err.kind, err.error, now
            session.add(row_err)
        for stale in recorded.values():
            session.delete(stale)


def record_version(session: Session, row: Dag, structure: dict[str, Any], fileloc: str, now: datetime) -> DagVersion | None:
    """Point ``row`` at a new version when ``structure`` differs from its
    latest one; returns the new version, or None when nothing changed.
    Versions are immutable: a run keeps following the one it started with."""
    digest = structure_hash(structure)
    latest = session.get(DagVersion, row.latest_version_id) if row.latest_version_id is not None else None
    if latest is not None and latest.structure_hash == digest:
        return None
    number = (session.scalar(select(func.max(DagVersion.version_number)).where(DagVersion.dag_id == row.dag_id)) or 0) + 1
    version = DagVersion(dag_id=row.dag_id, version_number=number, structure=structure, structure_hash=digest, fileloc=fileloc, created_at=now)
    session.add(version)
    session.flush()
    row.latest_version_id = version.id
    log.info("DAG %s: version %d (structure %s)", row.dag_id, number, digest[:12])
    return version
