"""Load DAG files from a folder and record them in the metadata DB.

Each ``*.py`` file is imported as its own module. A file that fails (syntax
error, exception on import, cycle, invalid DAG) is recorded in
``dag_import_errors`` with the file and the reason; every other file keeps
working. DAGs whose file disappeared are marked inactive, not deleted, so
their history stays readable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from croniter import croniter
from sqlalchemy import select
from sqlalchemy.orm import Session

from firmware_jobs import registry as job_registry
from hub.dag import DAG, AgentOperator
from hub.errors import InvalidDag
from hub.models import Dag, DagImportError
from shared.errors import InvalidParams, UnknownJobType

log = logging.getLogger(__name__)

CRON_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


def cron_expression(schedule: str) -> str:
    """The cron expression for a schedule string; raises ``InvalidDag``."""
    expr = CRON_PRESETS.get(schedule, schedule)
    if not croniter.is_valid(expr):
        raise InvalidDag(f"schedule {schedule!r} is not a cron expression or preset ({', '.join(CRON_PRESETS)})")
    return expr


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
        try:
            job.validate(task.params)
        except InvalidParams as exc:
            raise InvalidDag(f"DAG {dag.dag_id!r}, task {task.task_id!r} ({task.job_type}): {exc}") from None


@dataclass
class FileError:
    fileloc: str
    kind: str
    error: str


@dataclass
class DagBag:
    folder: Path
    dags: dict[str, DAG] = field(default_factory=dict)
    errors: dict[str, FileError] = field(default_factory=dict)
    _mtimes: dict[str, float] = field(default_factory=dict)

    def collect(self) -> bool:
        """(Re)load every file whose modification time changed. Returns True
        when anything was (re)loaded or removed."""
        files = {str(p): p.stat().st_mtime for p in sorted(self.folder.glob("*.py")) if not p.name.startswith("_")}
        changed = [f for f, m in files.items() if self._mtimes.get(f) != m]
        gone = [f for f in self._mtimes if f not in files]
        for fileloc in gone:
            self._forget(fileloc)
            del self._mtimes[fileloc]
        for fileloc in changed:
            # A file that now fails keeps its last good DAGs loaded, so a typo
            # does not stop a fleet's schedule; the error is still recorded.
            self.errors.pop(fileloc, None)
            loaded = self._load(Path(fileloc))
            if loaded is not None:
                self._forget(fileloc)
                for dag in loaded:
                    self.dags[dag.dag_id] = dag
            self._mtimes[fileloc] = files[fileloc]
        return bool(changed or gone)

    def _forget(self, fileloc: str) -> None:
        self.errors.pop(fileloc, None)
        for dag_id in [d for d, dag in self.dags.items() if dag.fileloc == fileloc]:
            del self.dags[dag_id]

    def _load(self, path: Path) -> list[DAG] | None:
        """Import one file; returns its valid DAGs, or None if the file failed."""
        fileloc = str(path)
        name = "outpost_dag_" + hashlib.sha1(fileloc.encode()).hexdigest()[:12]
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except SyntaxError as exc:
            return self._fail(fileloc, "syntax", f"{exc.msg} (line {exc.lineno}, column {exc.offset})")
        except InvalidDag as exc:
            return self._fail(fileloc, "invalid", str(exc))
        except Exception as exc:  # a DAG file may raise anything; it must not stop the others
            tb = traceback.format_exception(exc)
            return self._fail(fileloc, "import", "".join(tb[-3:]).strip())
        found = {id(v): v for v in vars(module).values() if isinstance(v, DAG)}
        if not found:
            return self._fail(fileloc, "no_dag", "the file defines no DAG object at module level")
        good: list[DAG] = []
        for dag in found.values():
            try:
                dag.validate()
                if dag.schedule:
                    cron_expression(dag.schedule)
                check_job_params(dag)
            except InvalidDag as exc:
                kind = "cycle" if "cycle" in str(exc) else "invalid"
                return self._fail(fileloc, kind, str(exc))
            if dag.dag_id in self.dags and self.dags[dag.dag_id].fileloc != fileloc:
                return self._fail(fileloc, "duplicate", f"dag_id {dag.dag_id!r} is already defined in {self.dags[dag.dag_id].fileloc}")
            dag.fileloc = fileloc
            good.append(dag)
        return good

    def _fail(self, fileloc: str, kind: str, error: str) -> None:
        log.warning("DAG file %s: %s: %s", fileloc, kind, error)
        self.errors[fileloc] = FileError(fileloc, kind, error)
        return None

    def sync_to_db(self, session: Session, now: datetime) -> None:
        """Upsert DAG rows and import errors to match this bag."""
        existing = {d.dag_id: d for d in session.scalars(select(Dag))}
        for dag_id, dag in self.dags.items():
            row = existing.get(dag_id)
            if row is None:
                row = Dag(dag_id=dag_id, is_paused=dag.is_paused_upon_creation)
                session.add(row)
            row.fileloc = dag.fileloc
            row.description = dag.description
            if row.schedule != dag.schedule:
                row.next_run_at = None  # recomputed by the scheduler
            row.schedule = dag.schedule
            row.tags = list(dag.tags)
            row.structure = dag.serialize()
            row.is_active = True
            row.last_parsed_at = now
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
