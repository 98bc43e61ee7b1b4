"""Load DAG files: import, validate, serialize. The parsing side of DAG
processing; nothing here touches the metadata DB.

The hub never runs this in its own process: ``hub.dagprocessor`` keeps a
``python -m hub.dagbag`` process, which forks one child per DAG file of a
parse round (so a file that hangs, exits or eats memory is killed or fails
alone, and the hub's modules are imported once, not per file or round)
and answers with JSON: each file's serialized DAGs or its error. Error
kinds: ``syntax`` (with the line), ``import`` (an exception, with the
traceback's tail), ``cycle`` (naming it), ``invalid``, ``no_dag``,
``timeout``, ``memory`` and ``crash`` (the file ended its process), plus
``duplicate`` (a dag_id defined in two files; decided by the hub, which
sees every file).

``DagBag`` loads files into this process; it is for code that needs the
Python objects (a hub task's callable), never for the scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import select
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_jobs import registry as job_registry
from hub.dag import DAG, AgentOperator, import_dag_file
from hub import templating, timetables
from hub.errors import InvalidDag
from shared.errors import InvalidParams, UnknownJobType
from shared.clock import SystemClock

log = logging.getLogger(__name__)


#: How much of a crashed file's own output an error keeps.
_OUTPUT_TAIL = 2000


def cron_expression(schedule: str) -> str:
    """The cron expression for a schedule string; raises ``InvalidDag``.
    Schedules are parsed by ``hub.timetables``; this stays for callers."""
    return timetables.check_cron(schedule)


def check_job_params(dag: DAG) -> None:
    """Agent tasks of job types this hub knows get their parameters checked
    against the job's schema now, not on a device at 3 a.m. A job type the
    hub does not know may still be installed on devices: it passes, and the
    device reports ``unknown_job_type`` if it is not."""
    for task in dag.tasks.values():
        if not isinstance(task, AgentOperator):
            continue
        try:
            job = job_registry.get(task.job_type)
        except UnknownJobType:
            continue
        for where, params in _agent_param_sets(task):
            try:
                job.validate(params)
            except InvalidParams as exc:
                raise InvalidDag(f"DAG {dag.dag_id!r}, task {task.task_id!r}{where} ({task.job_type}): {exc}") from None


def _agent_param_sets(task: AgentOperator) -> list[tuple[str, dict[str, Any]]]:
    """The parameter sets an agent task can send: its params, or for a mapped
    task each literal mapped value (values from an upstream's output are only
    known at run time, and the device checks those)."""
    if task.mapping is None:
        # Templated params (Jinja, XComArgs) are checked when the hub renders them at dispatch.
        return [("", task.params)] if task.params_are_literal() else []
    if task.mapping.group is not None:
        # A task of a mapped task group: keys taken from the group's values are only known per instance.
        group_params = any(k == "params" or k.startswith("params.") for k in task.mapping.group_args or {})
        return [] if group_params or not task.params_are_literal() else [("", task.params)]
    sources = [task.mapping.expand.get("params")]
    if task.mapping.expand_kwargs is not None:
        sources.append({"literal": [item.get("params", task.params) for item in task.mapping.expand_kwargs.get("literal", [])]})
    return [
        (f" (mapped params [{index}])", value)
        for source in sources if source is not None and "literal" in source
        # Values with templates are checked once rendered, at dispatch.
        for index, value in enumerate(source["literal"]) if isinstance(value, dict) and not templating.has_templates(value)
    ]


def validate_dag(dag: DAG) -> None:
    """Everything a DAG must pass before the scheduler sees it; raises ``InvalidDag``."""
    dag.validate()  # the schedule was checked when the DAG was built (hub.timetables)
    check_job_params(dag)


def dag_fields(dag: DAG) -> dict[str, Any]:
    """Columns of the ``dags`` row that come from the DAG file (beyond its
    structure). The hub copies them on every parse; ``is_paused_upon_creation``
    only when the row is created."""
    return {
        "description": dag.description,
        "schedule": timetables.describe(dag.schedule),
        "tags": list(dag.tags),
        "is_paused_upon_creation": bool(dag.is_paused_upon_creation),
    }


@dataclass
class FileError:
    fileloc: str
    kind: str
    error: str


def load_file(path: Path) -> tuple[list[DAG], FileError | None]:
    """Import one DAG file in this process and validate its DAGs. Returns its
    DAGs, or no DAG and the reason the whole file is refused: one bad DAG
    refuses its file, so a half-applied edit never reaches the scheduler."""
    fileloc = str(path)
    try:
        dags = import_dag_file(fileloc)
    except SyntaxError as exc:
        return [], FileError(fileloc, "syntax", f"{exc.msg} (line {exc.lineno}, column {exc.offset})")
    except InvalidDag as exc:
        return [], FileError(fileloc, "invalid", str(exc))
    except MemoryError:
        return [], FileError(fileloc, "memory", "MemoryError: the file ran out of memory while being imported (see dag_file_processor_memory_mb)")
    except (Exception, SystemExit) as exc:  # a DAG file may raise anything, even SystemExit; it must not stop the others
        return [], FileError(fileloc, "import", _traceback_tail(exc))
    found = {id(v): v for v in dags}
    if not found:
        return [], FileError(fileloc, "no_dag", "the file defines no DAG object at module level")
    seen: dict[str, DAG] = {}
    for dag in found.values():
        try:
            validate_dag(dag)
        except InvalidDag as exc:
            kind = "cycle" if "cycle" in str(exc) else "invalid"
            return [], FileError(fileloc, kind, str(exc))
        if dag.dag_id in seen:
            return [], FileError(fileloc, "duplicate", f"dag_id {dag.dag_id!r} is defined twice in this file")
        seen[dag.dag_id] = dag
        dag.fileloc = fileloc
    return list(seen.values()), None


def _traceback_tail(exc: BaseException, frames: int = 3) -> str:
    """The last frames of the DAG file's own code (not the import machinery
    nor this module) and the exception."""
    stack = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen") and f.filename != __file__]
    lines = traceback.format_list(stack[-frames:]) + traceback.format_exception_only(exc)
    return "".join(lines).strip()


def parse_file(fileloc: str) -> dict[str, Any]:
    """One file's parse result as JSON-ready data: ``{"fileloc", "dags":
    [{"dag_id", "structure", "fields"}], "error": {"kind", "error"} | None,
    "duration"}``."""
    started = time.perf_counter()
    dags, error = load_file(Path(fileloc))
    records: list[dict[str, Any]] = []
    if error is None:
        try:
            records = [{"dag_id": d.dag_id, "structure": d.serialize(), "fields": dag_fields(d)} for d in dags]
            json.dumps(records)
        except InvalidDag as exc:
            records, error = [], FileError(fileloc, "invalid", str(exc))
        except (TypeError, ValueError) as exc:
            records, error = [], FileError(fileloc, "invalid", f"the DAG does not serialize to JSON: {exc}")
    return {
        "fileloc": fileloc,
        "dags": records,
        "error": None if error is None else {"kind": error.kind, "error": error.error},
        "duration": time.perf_counter() - started,
    }


@dataclass
class DagBag:
    """DAG files loaded into this process, reloaded when their modification
    time changes. A file that now fails keeps its last good DAGs loaded; a
    dag_id already defined by another file refuses the newcomer."""

    folder: Path
    dags: dict[str, DAG] = field(default_factory=dict)
    errors: dict[str, FileError] = field(default_factory=dict)
    _mtimes: dict[str, float] = field(default_factory=dict)

    def collect(self) -> bool:
        """(Re)load every file whose modification time changed. Returns True
        when anything was (re)loaded or removed."""
        files = list_dag_files(self.folder)
        changed = [f for f, m in files.items() if self._mtimes.get(f) != m]
        gone = [f for f in self._mtimes if f not in files]
        for fileloc in gone:
            self._forget(fileloc)
            del self._mtimes[fileloc]
        for fileloc in changed:
            self._reload(fileloc)
            self._mtimes[fileloc] = files[fileloc]
        return bool(changed or gone)

    def get_dag(self, dag_id: str, fileloc: str) -> DAG | None:
        """``dag_id`` as defined now in ``fileloc``, loading only that file
        (when it changed), never the rest of the folder."""
        try:
            mtime = os.stat(fileloc).st_mtime
        except OSError:
            return None
        if self._mtimes.get(fileloc) != mtime:
            self._reload(fileloc)
            self._mtimes[fileloc] = mtime
        dag = self.dags.get(dag_id)
        return dag if dag is not None and dag.fileloc == fileloc else None

    def _reload(self, fileloc: str) -> None:
        # A file that now fails keeps its last good DAGs loaded, so a typo
        # does not stop a fleet's schedule; the error is still recorded.
        self.errors.pop(fileloc, None)
        loaded, error = load_file(Path(fileloc))
        if error is None:
            clash = next((d for d in loaded if d.dag_id in self.dags and self.dags[d.dag_id].fileloc != fileloc), None)
            if clash is not None:
                error = FileError(fileloc, "duplicate", f"dag_id {clash.dag_id!r} is already defined in {self.dags[clash.dag_id].fileloc}")
        if error is not None:
            log.warning("DAG file %s: %s: %s", fileloc, error.kind, error.error)
            self.errors[fileloc] = error
            return
        self._forget(fileloc)
        for dag in loaded:
            self.dags[dag.dag_id] = dag

    def _forget(self, fileloc: str) -> None:
        self.errors.pop(fileloc, None)
        for dag_id in [d for d, dag in self.dags.items() if dag.fileloc == fileloc]:
            del self.dags[dag_id]


def list_dag_files(folder: Path) -> dict[str, float]:
    """DAG files of ``folder`` by path, with their modification time. Files
    starting with ``_`` are helpers, not DAG files."""
    files: dict[str, float] = {}
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        try:
            files[str(path)] = path.stat().st_mtime
        except FileNotFoundError:
            continue  # removed while listing
    return files


# --- the parse round: runs in its own process (python -m hub.dagbag) ----------


@dataclass
class _Child:
    fileloc: str
    pid: int
    pipe: int
    output: Any  # the child's stdout and stderr, for a crash report
    deadline: float
    started: float
    data: bytearray = field(default_factory=bytearray)
    eof: bool = False


def run_round(files: list[str], timeout: float, parallelism: int, memory_mb: int, folder: str | None = None) -> list[dict[str, Any]]:
    """Parse ``files``, each in a forked child of this process, at most
    ``parallelism`` at once. A child past ``timeout`` seconds is killed with
    its process group and recorded as ``timeout``; one that ends without an
    answer (``os._exit``, a signal) as ``crash``."""
    pending = list(files)
    running: dict[int, _Child] = {}
    results: list[dict[str, Any]] = []
    while pending or running:
        while pending and len(running) < parallelism:
            child = _fork(pending.pop(0), timeout, memory_mb, folder)
            running[child.pid] = child
        now = time.monotonic()
        # A child that closed its pipe is about to exit: look again soon.
        wait = 0.002 if any(c.eof for c in running.values()) else max(0.0, min(c.deadline for c in running.values()) - now)
        readable, _, _ = select.select([c.pipe for c in running.values() if not c.eof], [], [], min(wait, 1.0))
        for child in running.values():
            if child.pipe in readable:
                chunk = os.read(child.pipe, 1 << 16)
                if chunk:
                    child.data += chunk
                else:
                    child.eof = True
        for pid, child in list(running.items()):
            status = _reap(child)
            if status is None and time.monotonic() >= child.deadline:
                _kill(child.pid)
                _reap(child, block=True)
                results.append(_failure(child, "timeout", f"parsing took longer than {timeout:g} s (dag_file_processor_timeout); the file was killed"))
            elif status is None:
                continue
            else:
                results.append(_answer(child, status))
            _kill(child.pid)  # whatever the file started in its process group goes too
            os.close(child.pipe)
            child.output.close()
            del running[pid]
    return results


def _fork(fileloc: str, timeout: float, memory_mb: int, folder: str | None) -> _Child:
    read_end, write_end = os.pipe()
    output = tempfile.TemporaryFile()
    started = time.monotonic()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its result is checked through the parent
        code = 1
        try:
            os.close(read_end)
            os.setpgid(0, 0)
            _die_with_parent(parent)
            # The file's prints go to a file of their own: stdout is the answer channel.
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            if memory_mb > 0:
                limit = memory_mb * 1024 * 1024
                resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
            if folder:
                # Airflow puts the DAG folder on sys.path, so DAG files import their helpers.
                sys.path.insert(0, folder)
            answer = json.dumps(parse_file(fileloc)).encode()
            view = memoryview(answer)
            while view:
                view = view[os.write(write_end, view):]
            code = 0
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(code)
    os.close(write_end)
    return _Child(fileloc, pid, read_end, output, started + timeout, started)


def _reap(child: _Child, block: bool = False) -> int | None:
    """The child's exit status once it ended (its answer read in full:
    everything it wrote is in the pipe by then), else None."""
    done, status = os.waitpid(child.pid, 0 if block else os.WNOHANG)
    if done == 0:
        return None
    _drain(child)
    return status


def _drain(child: _Child) -> None:
    while not child.eof and select.select([child.pipe], [], [], 0)[0]:
        chunk = os.read(child.pipe, 1 << 16)
        if not chunk:
            child.eof = True
        child.data += chunk


def _die_with_parent(parent: int | None) -> None:
    """Linux: end this process when its parent ends (a hub killed with -9
    must leave no parse behind, least of all one that never returns)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if parent is not None and os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def _kill(pgid: int) -> None:
    try:
        os.killpg(pgid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def _answer(child: _Child, status: int) -> dict[str, Any]:
    if os.waitstatus_to_exitcode(status) == 0 and child.data:
        try:
            result: dict[str, Any] = json.loads(child.data)
            return result
        except ValueError:
            pass
    code = os.waitstatus_to_exitcode(status)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if code < 0 and -code == 9:
        how += " (out of memory?)"
    tail = _tail(child.output)
    return _failure(child, "crash", f"the parsing process {how} while importing the file (os._exit or a crash in the file)" + (f"; its last output:\n{tail}" if tail else ""))


def _failure(child: _Child, kind: str, error: str) -> dict[str, Any]:
    return {"fileloc": child.fileloc, "dags": [], "error": {"kind": kind, "error": error}, "duration": time.monotonic() - child.started}


def _tail(output: Any) -> str:
    output.seek(0, os.SEEK_END)
    size = output.tell()
    output.seek(max(0, size - _OUTPUT_TAIL))
    return str(output.read().decode("utf-8", "replace").strip())


def _main() -> int:
    """The parse process: ``python -m hub.dagbag PARENT_PID``. Serves rounds
    until stdin closes: each request is one JSON line ``{"files", "timeout",
    "parallelism", "memory_mb", "folder"}``, each answer one JSON line
    ``{"results", "started_at"}`` (wall-clock time the round began, for the
    hub's view of the start-up cost). The hub's modules are imported once,
    here; each file is imported by a fresh fork, so nothing a DAG file does
    outlives its parse."""
    _die_with_parent(int(sys.argv[1]) if len(sys.argv) > 1 else None)
    # Job types load on first use; load them here once, not in every child.
    job_registry.catalog()
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        started_at = SystemClock().now()  # wall time: compared with the hub's, across processes
        results = run_round(
            list(request["files"]), float(request["timeout"]), int(request.get("parallelism", 1)), int(request.get("memory_mb", 0)), request.get("folder"),
        )
        sys.stdout.write(json.dumps({"results": results, "started_at": started_at}) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
