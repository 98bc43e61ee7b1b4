"""Hub tasks in real worker processes (forkserver) read variables and
connections with the keys the executor hands them, and what leaves the
worker for humans (errors, log lines) is masked there."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from hub import events as ev
from hub import vault
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.encryption import parse_keys
from hub.events import EventBus
from hub.executor import LocalExecutor
from hub.models import Dag, DagRun, TaskInstance
from shared.clock import SystemClock, utcnow

SECRET = "worker-secret-4e1d"

DAG_FILE = '''
import logging
from hub.sdk import DAG, Connection, PythonOperator, Variable

def reader():
    return {"password": Variable.get("db_password"), "conn": Connection.get("api").password}

def leaky():
    raise RuntimeError("login with " + Variable.get("db_password") + " refused")

def logged():
    # What the worker's own log handler would print for a line with the secret.
    root = logging.getLogger()
    record = logging.LogRecord("task", logging.WARNING, __file__, 1, "token is %s", (Variable.get("db_password"),), None)
    for handler in root.handlers:
        for f in handler.filters:
            f.filter(record)
    return record.getMessage()

with DAG("secrets_worker") as dag:
    for fn in (reader, leaky, logged):
        PythonOperator(task_id=fn.__name__, python_callable=fn, retries=0)
'''


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Any, EventBus, int, str]]:
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "secrets_worker.py").write_text(DAG_FILE)
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    key = Fernet.generate_key().decode()
    cipher = parse_keys(key)
    now = utcnow(SystemClock())
    vault.set_variable(sessions, cipher, "db_password", SECRET, now)
    vault.save_connection(sessions, cipher, "api", {"password": SECRET + "-conn"}, now, create=True)
    with transaction(sessions) as session:
        session.add(Dag(dag_id="secrets_worker", fileloc=str(tmp_path / "dags" / "secrets_worker.py"), structure={}, is_active=True, is_paused=False))
        run = DagRun(dag_id="secrets_worker", run_id="manual__1", run_type="manual", state="running", logical_date=now, conf={}, created_at=now, started_at=now)
        session.add(run)
        session.flush()
        run_pk = run.id
    yield sessions, EventBus(), run_pk, key
    engine.dispose()


def test_worker_processes_read_secrets_and_mask_what_they_report(setup: tuple[Any, EventBus, int, str]) -> None:
    sessions, events, run_pk, key = setup
    done: set[int] = set()
    cond = threading.Condition()

    def finished(_name: str, data: dict[str, Any]) -> None:
        with cond:
            done.add(data["ti_id"])
            cond.notify_all()

    events.subscribe(ev.HUB_TASK_FINISHED, finished)
    with transaction(sessions) as session:
        tis = [TaskInstance(run_pk=run_pk, dag_id="secrets_worker", run_id="manual__1", task_id=t, map_index=-1, kind="hub", state="queued",
                            try_number=1, max_tries=1, retry_delay=0.0) for t in ("reader", "leaky", "logged")]
        session.add_all(tis)
        session.flush()
        ids = {ti.task_id: ti.id for ti in tis}
    executor = LocalExecutor(sessions, SystemClock(), events, workers=1, kill_grace=1.0, fernet_keys=key)
    executor.start()
    try:
        for ti_id in ids.values():
            executor.submit(ti_id)
        with cond:
            assert cond.wait_for(lambda: set(ids.values()) <= done, 60), f"not finished: {set(ids.values()) - done}"
    finally:
        executor.stop()
    with sessions() as session:
        got = {t: session.get(TaskInstance, i) for t, i in ids.items()}
    assert got["reader"].state == "success", got["reader"].error
    assert got["reader"].output == {"password": SECRET, "conn": SECRET + "-conn"}
    assert got["leaky"].state == "failed"
    assert got["leaky"].error["message"] == "RuntimeError: login with *** refused"
    assert SECRET not in got["leaky"].error.get("traceback", "")
    assert got["logged"].output == "token is ***"
