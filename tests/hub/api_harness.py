"""Shared parts of the API, dashboard and CLI tests: a migrated database
(SQLite file or a throwaway PostgreSQL database), a realistic seed, the app,
and a real uvicorn server on a free loopback port.

Everything authenticates as an admin by default: ``Hub.client()`` sends an
admin API token (``client(role="viewer")`` another role, ``client(role=None)``
none), ``live_hub`` sets ``OUTPOST_TOKEN`` for the ``outpost`` CLI, and
``browser_login`` logs a Playwright page in through the real login form.
Tests that build their own app use ``hub_settings()`` and
``admin_headers(sessions)``.

Test modules import the fixtures they use from here by name.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import uvicorn
from cryptography.fernet import Fernet
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from hub.api.app import create_app
from hub.auth import tokens as auth_tokens
from hub.auth import users as auth_users
from hub.config import HubSettings
from hub.dag import DAG, AgentOperator, PythonOperator, every_agent, on_agent
from hub.db import make_engine, make_sessionmaker, transaction, upgrade
from hub.events import EventBus
from hub.encryption import parse_keys
from hub.models import Agent, Connection, Dag, DagImportError, DagRun, RejectedMessage, TaskInstance, Variable
from hub.web import views
from shared.clock import ManualClock, to_datetime

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z
XSS = "<img src=x onerror=alert(1)>"
#: The harness hub's key for variables and connections (a fresh one per test session).
FERNET_KEY = Fernet.generate_key().decode()
#: The value of the seeded sensitive variable; no API answer may contain it.
SEEDED_SECRET = "seeded-token-8f3a1c"
#: A secret key good enough for the hub's checks (tests only).
TEST_SECRET_KEY = "test-secret-key-" + "k3y" * 12
#: The users tests act as: name -> (role, password).
TEST_USERS = {
    "test-admin": ("admin", "admin-password-1"),
    "test-operator": ("operator", "operator-password-1"),
    "test-viewer": ("viewer", "viewer-password-1"),
}
ROLE_USER = {role: name for name, (role, _pw) in TEST_USERS.items()}


def hub_settings(**values: Any) -> HubSettings:
    """Hub settings for tests: a valid secret key and Fernet key, plus ``values``."""
    return HubSettings(**{"secret_key": TEST_SECRET_KEY, "fernet_keys": FERNET_KEY, **values})


def make_token(sessions: sessionmaker[Session], role: str = "admin", now: datetime | None = None) -> str:
    """An API token of the test user with ``role`` (created, with the user, if missing)."""
    name = ROLE_USER[role]
    when = now or datetime(2026, 1, 1, tzinfo=UTC)
    with transaction(sessions) as s:
        try:
            user = auth_users.get_user(s, name)
        except auth_users.UserNotFound:
            user = auth_users.create_user(s, name, TEST_USERS[name][1], role, when)
        secret, _row = auth_tokens.create_token(s, user, f"test {role}", when)
    return secret


def admin_headers(sessions: sessionmaker[Session], role: str = "admin") -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sessions, role)}"}


def browser_login(page: Any, url: str, name: str = "test-admin", password: str | None = None, next_path: str = "/") -> None:
    """Log a Playwright page in through the real login form."""
    page.goto(f"{url}/login?next={next_path}")
    page.fill("#username", name)
    page.fill("#password", password if password is not None else TEST_USERS[name][1])
    with page.expect_navigation():
        page.click("form.login-form button[type=submit]")


def _summarise(ti: Any) -> dict[str, Any]:
    return {}


def _structures() -> dict[str, dict[str, Any]]:
    """DAG structures made with the real authoring API."""
    with DAG("fleet_health", schedule="@hourly", description="Diagnostics from every device.") as fleet:
        collect = AgentOperator(task_id="collect", job_type="diagnostics.collect", target=every_agent(site="berlin"))
        collect >> PythonOperator(task_id="summarise", python_callable=_summarise)
    with DAG("reboot_one") as reboot:
        AgentOperator(task_id="reboot", job_type="command.run", params={"argv": ["reboot"]}, target=on_agent("edge-1"))
    with DAG("gone_dag") as gone:
        PythonOperator(task_id="only", python_callable=_summarise)
    return {d.dag_id: d.serialize() for d in (fleet, reboot, gone)}


@dataclass
class Hub:
    """One hub's parts over one database."""

    url: str
    engine: Engine
    sessions: sessionmaker[Session]
    clock: ManualClock
    events: EventBus = field(default_factory=EventBus)
    ready: dict[str, bool] = field(default_factory=dict)
    seeded: Seeded | None = None
    app: FastAPI = field(init=False)
    #: API token per role, made on first use.
    tokens: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.app = create_app(
            hub_settings(database_url=self.url),
            self.sessions,
            self.events,
            self.clock,
            lambda: dict(self.ready),
            extra_routers=[views.router],
            mounts={views.STATIC_PATH: views.static_files()},
        )

    def client(self, role: str | None = "admin", **kwargs: Any) -> TestClient:
        """A test client sending an API token of ``role`` (None: no credentials)."""
        headers = dict(kwargs.pop("headers", None) or {})
        if role is not None:
            headers.setdefault("Authorization", f"Bearer {self.token(role)}")
        return TestClient(self.app, headers=headers, **kwargs)

    def token(self, role: str = "admin") -> str:
        if role not in self.tokens:
            self.tokens[role] = make_token(self.sessions, role)
        return self.tokens[role]

    def recorded(self, name: str) -> list[dict[str, Any]]:
        """Start recording events called ``name``; returns the live list."""
        seen: list[dict[str, Any]] = []
        self.events.subscribe(name, lambda _n, data: seen.append(data))
        return seen


def open_hub(url: str) -> Hub:
    upgrade(url)
    engine = make_engine(url)
    return Hub(url, engine, make_sessionmaker(engine), ManualClock(START))


@dataclass(frozen=True)
class Seeded:
    """Ids of the seeded rows."""

    run_success: int
    run_running: int
    run_failed: int
    #: API tokens of the seeded test users, per role.
    tokens: dict[str, str] = field(default_factory=dict)


def seed(hub: Hub) -> Seeded:
    """A small fleet: three DAGs (one paused, one gone from the folder), an
    import error, three runs (one with a three-device fan-out), two agents
    (one online in berlin, one offline with a hostile hostname) and
    rejected messages."""
    t0 = to_datetime(START)
    structures = _structures()
    with transaction(hub.sessions) as s:
        s.add(Dag(dag_id="fleet_health", fileloc="/dags/fleet_health.py", description="Diagnostics from every device.", schedule="@hourly",
                  tags=["fleet"], structure=structures["fleet_health"], next_run_at=t0 + timedelta(hours=1), last_parsed_at=t0))
        s.add(Dag(dag_id="reboot_one", fileloc="/dags/reboot.py", schedule=None, is_paused=True, structure=structures["reboot_one"], last_parsed_at=t0))
        s.add(Dag(dag_id="gone_dag", fileloc="/dags/gone.py", is_active=False, structure=structures["gone_dag"]))
        s.add(DagImportError(fileloc="/dags/broken.py", kind="syntax", error="SyntaxError: invalid syntax (broken.py, line 3)", recorded_at=t0))
        s.add(Agent(agent_id="edge-1", hostname="gw-berlin-1", agent_version="0.1.0", labels={"site": "berlin", "rack": "a"},
                    job_types=[{"name": "diagnostics.collect", "version": "1"}, {"name": "command.run", "version": "1"}], state="online",
                    first_seen=t0 - timedelta(days=2), last_seen=t0 - timedelta(seconds=5), last_heartbeat={"inbox": 0, "outbox": 1}, clock_skew=0.4))
        s.add(Agent(agent_id="edge-2", hostname=XSS, agent_version="0.1.0", labels={"site": "paris"}, job_types=[], state="offline",
                    first_seen=t0 - timedelta(days=1), last_seen=t0 - timedelta(hours=3), clock_skew=-612.0, clock_skew_flagged_at=t0 - timedelta(hours=4)))
        s.add(Agent(agent_id="edge-3", hostname="gw-berlin-2", agent_version="0.1.0", labels={"site": "berlin", "rack": "b"}, job_types=[],
                    state="online", first_seen=t0 - timedelta(days=1), last_seen=t0 - timedelta(seconds=20)))
        s.flush()
        ok = _run(s, "fleet_health", "scheduled", "success", t0 - timedelta(hours=2))
        running = _run(s, "fleet_health", "manual", "running", t0 - timedelta(minutes=5), conf={"reason": "audit"})
        failed = _run(s, "reboot_one", "manual", "failed", t0 - timedelta(hours=1))
        s.flush()
        for i, agent in enumerate(["edge-1", "edge-2", "edge-3"]):
            _ti(s, ok, "collect", "success", map_index=i, agent_id=agent, job_type="diagnostics.collect", output={"disk": {"free_bytes": 1000 + i}})
        _ti(s, ok, "summarise", "success", kind="hub", output={"devices": 3})
        _ti(s, running, "collect", "success", map_index=0, agent_id="edge-1", job_type="diagnostics.collect", output={"note": XSS})
        _ti(s, running, "collect", "running", map_index=1, agent_id="edge-3", job_type="diagnostics.collect")
        _ti(s, running, "summarise", "none", kind="hub")
        _ti(s, failed, "reboot", "failed", agent_id="edge-1", job_type="command.run", error={"code": "exit_status", "message": "exit status 1"})
        for i, code in enumerate(["bad_signature", "bad_signature", "decode_error"]):
            s.add(RejectedMessage(source="mqtt", topic="outpost/v1/agents/edge-2/events", agent_id="edge-2", code=code, detail=f"rejected #{i}",
                                  excerpt="", received_at=t0 - timedelta(minutes=10 - i)))
        # Secrets tasks read: one plain variable, one sensitive, one connection (stored encrypted).
        cipher = parse_keys(FERNET_KEY)
        s.add(Variable(key="region", value_encrypted=cipher.encrypt("eu-central-1"), description="Default region.", created_at=t0, updated_at=t0))
        s.add(Variable(key="fleet_api_token", value_encrypted=cipher.encrypt(SEEDED_SECRET), description="", created_at=t0, updated_at=t0))
        s.add(Connection(conn_id="warehouse", conn_type="postgres", description="Results warehouse.", host="db.example", login="etl", port=5432,
                         schema="fleet", password_encrypted=cipher.encrypt(SEEDED_SECRET + "-pw"),
                         extra_encrypted=cipher.encrypt('{"sslmode": "require", "client_secret": "cs-seeded-1"}'), created_at=t0, updated_at=t0))
        ids = (ok.id, running.id, failed.id)
    # The test users, hashed once per session in the template (Argon2 is slow on purpose).
    return Seeded(*ids, tokens={role: make_token(hub.sessions, role) for role in ("admin", "operator", "viewer")})


def _run(s: Session, dag_id: str, run_type: str, state: str, when: datetime, conf: dict[str, Any] | None = None) -> DagRun:
    run = DagRun(dag_id=dag_id, run_id=f"{run_type}__{when.isoformat()}", run_type=run_type, state=state, logical_date=when, conf=conf or {},
                 created_at=when, started_at=when, ended_at=None if state == "running" else when + timedelta(seconds=42))
    s.add(run)
    s.flush()
    return run


def _ti(s: Session, run: DagRun, task_id: str, state: str, *, kind: str = "agent", map_index: int = -1, **extra: Any) -> None:
    finished = state in ("success", "failed")
    s.add(TaskInstance(run_pk=run.id, dag_id=run.dag_id, run_id=run.run_id, task_id=task_id, map_index=map_index, kind=kind, state=state,
                       try_number=1 if state != "none" else 0, max_tries=1, started_at=run.started_at if state != "none" else None,
                       ended_at=run.started_at + timedelta(seconds=3) if finished and run.started_at else None, **extra))


# --- databases ----------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A throwaway PostgreSQL database for this test session; dropped after.
    No server is a failure: the PostgreSQL tests never skip."""
    from tests.hub.conftest import fresh_pg_database

    with fresh_pg_database() as url:
        yield url


@pytest.fixture(scope="session")
def seeded_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Seeded]:
    """A migrated and seeded SQLite file, made once and copied per test."""
    path = tmp_path_factory.mktemp("template") / "hub.db"
    h = open_hub(f"sqlite:///{path}")
    ids = seed(h)
    h.engine.dispose()  # the last connection closing checkpoints the WAL into the file
    return path, ids


@pytest.fixture
def hub(tmp_path: Path, seeded_sqlite_template: tuple[Path, Seeded]) -> Iterator[Hub]:
    """A fresh, seeded hub over its own SQLite file."""
    template, ids = seeded_sqlite_template
    path = tmp_path / "hub.db"
    shutil.copyfile(template, path)
    h = open_hub(f"sqlite:///{path}")
    h.seeded = ids
    h.tokens.update(ids.tokens)
    yield h
    h.engine.dispose()


# --- a real HTTP server -------------------------------------------------------


class LiveServer:
    """``app`` served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def live_hub(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Hub, str]]:
    """The seeded hub behind a real uvicorn server: ``(hub, base_url)``.
    The ``outpost`` CLI (in-process or a child) finds an admin token in
    ``OUTPOST_TOKEN``."""
    monkeypatch.setenv("OUTPOST_TOKEN", hub.token("admin"))
    with LiveServer(hub.app) as server:
        yield hub, server.url


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)
