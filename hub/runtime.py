"""One hub process: the parts it runs and their lifecycle.

``HubRuntime`` builds the DB, the MQTT link, the scheduler, the ingester,
the outbox publisher, the local executor and the HTTP server (API and
dashboard) from ``HubSettings``, and starts the ones a role needs:
``scheduler`` (scheduling, dispatch, ingestion, publishing), ``api`` (HTTP)
or both (``standalone``).
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from hub import events as ev
from hub.auth.keys import check_secret_key
from hub.config import HubSettings
from hub.dagprocessor import DagFileProcessor, SerializedDagBag, stop_parse_processes
from hub.db import make_engine, make_sessionmaker, upgrade
from hub import secretvars
from hub.dispatcher import Dispatcher
from hub.encryption import parse_keys
from hub.events import EventBus
from hub.executor import LocalExecutor
from hub.hubkeys import LiveRing
from hub.ingest import Ingester
from hub.masking import install_log_filter
from hub.outbox import OutboxPublisher
from hub.scheduler import Scheduler
from shared.clock import Clock, SystemClock, utcnow
from shared.hlc import HybridClock
from shared.mqtt import MqttLink, MqttSettings
from shared.topics import hub_probe_topic, hub_subscriptions

log = logging.getLogger(__name__)


@dataclass
class HubRuntime:
    settings: HubSettings
    clock: Clock = field(default_factory=SystemClock)
    run_scheduler: bool = True
    run_api: bool = True

    def __post_init__(self) -> None:
        s = self.settings
        # Before anything else: a hub that cannot encrypt secrets does not start (ConfigError).
        self.cipher = parse_keys(s.fernet_keys)
        self.events = EventBus()
        self.engine = make_engine(s.db_url, sqlite_synchronous=s.sqlite_synchronous)
        self.sessions = make_sessionmaker(self.engine)
        self.hlc = HybridClock("hub", lambda: int(self.clock.now() * 1000), max_ahead_ms=int(s.max_clock_skew * 1000))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.link = MqttLink(
            MqttSettings(
                host=s.broker_host, port=s.broker_port, client_id=s.mqtt_client_id, username=s.broker_username, password=s.broker_password,
                keepalive=s.mqtt_keepalive, probe_topic=hub_probe_topic(s.mqtt_client_id),
                tls=s.broker_tls, tls_ca=s.broker_tls_ca or None, tls_cert=s.broker_tls_cert or None, tls_key=s.broker_tls_key or None,
            ),
            subscriptions=[(t, 1) for t in hub_subscriptions()],
            on_connect=self._mqtt_connected,
        )
        # Made on first start; signs everything sent to devices.
        self.keyring = LiveRing(s.key_ring_dir)
        # DAG files are parsed in other processes; the hub keeps their serialized DAGs.
        processor = DagFileProcessor(timeout=s.dag_file_processor_timeout, parallelism=s.dag_parsing_processes, memory_mb=s.dag_file_processor_memory_mb)
        self.dagbag = SerializedDagBag(s.dags_folder, processor, min_file_process_interval=s.min_file_process_interval)
        self.executor = LocalExecutor(
            self.sessions, self.clock, self.events, workers=s.executor_workers, kill_grace=s.executor_kill_grace, sqlite_synchronous=s.sqlite_synchronous,
            fernet_keys=s.fernet_keys,
        )
        self.dispatcher = Dispatcher(self.hlc, s.max_message_bytes)
        self.scheduler = Scheduler(
            self.sessions, self.dagbag, self.dispatcher, self.clock, self.events, self.executor.submit,
            interval=s.scheduler_interval, redeliver_after=s.redeliver_after, agent_offline_after=s.agent_offline_after,
            dag_reparse_interval=s.dag_reparse_interval, parse_in_tick=False, max_map_length=s.max_map_length,
            default_pool_slots=s.default_pool_slots, default_offline_grace=s.default_offline_grace,
            task_log_retention_days=s.task_log_retention_days,
        )
        # Airflow's schedule_after_task_execution: a finished hub task's
        # downstream is decided and queued in the transaction that records it.
        self.executor.mini_scheduler = self.scheduler
        self.ingester = Ingester(
            self.sessions, self.link, self.clock, self.hlc, self.events, s.max_message_bytes, max_clock_skew=s.max_clock_skew,
            keyring=self.keyring, message_ttl=s.message_ttl,
        )
        self.publisher = OutboxPublisher(
            self.sessions, self.link, self.clock, keyring=self.keyring, message_ttl=s.message_ttl, max_message_bytes=s.max_message_bytes, hlc=self.hlc,
        )
        self.events.subscribe(ev.OUTBOX_WRITTEN, lambda _n, _d: self.publisher.wake())
        self.server: uvicorn.Server | None = None

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        # Refuse to run unprotected: a config error (exit 2), before anything starts.
        check_secret_key(self.settings.secret_key)
        upgrade(self.settings.db_url)
        # Agent-task params are rendered here ({{ var.value.X }}); what this
        # process logs and stores for humans is masked (hub.masking).
        secretvars.set_default_store(secretvars.open_store(self.sessions, self.cipher))
        install_log_filter()
        if self.run_scheduler:
            self.executor.start()
            adopted = self.executor.adopt_orphans()
            if adopted:
                log.info("adopted %d hub task(s) left running by a previous hub process", adopted)
            self.scheduler.parse_dags(self._now(), force=True)
            self.link.start()
            self._spawn("scheduler", self.scheduler.run_forever)
            self._spawn("dag-processor", self.scheduler.run_dag_processing)
            self._spawn("ingest", self.ingester.run_forever)
            self._spawn("outbox", self.publisher.run_forever)
        if self.run_api:
            self._start_http()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.should_exit = True
        for thread in self._threads:
            thread.join(10)
        if self.run_scheduler:
            self.executor.stop(wait=False)
            self.link.stop()
            stop_parse_processes()
        self.engine.dispose()

    def wait(self) -> None:
        """Block until :meth:`stop` (or a signal handler calling it)."""
        while not self._stop.wait(0.5):
            pass

    @property
    def api_url(self) -> str:
        port = self.settings.api_port
        if self.server is not None and self.server.servers:
            port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://{self.settings.api_host}:{port}"

    def readiness(self) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        if self.run_scheduler:
            checks["broker"] = self.link.connected.is_set()
        return checks

    # --- internals ---------------------------------------------------------

    def _mqtt_connected(self) -> None:
        # The broker may have lost the retained key announcement: publish it again.
        publisher = getattr(self, "publisher", None)
        if publisher is not None:
            publisher._announced = None
            publisher.wake()

    def _now(self) -> datetime:
        return utcnow(self.clock)

    def _spawn(self, name: str, target: Any) -> None:
        thread = threading.Thread(target=target, args=(self._stop,), name=f"hub-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_http(self) -> None:
        from hub.api.app import create_app
        from hub.web import views

        app = create_app(
            self.settings, self.sessions, self.events, self.clock, self.readiness,
            extra_routers=[views.router], mounts={views.STATIC_PATH: views.static_files()},
        )
        app.state.ingester = self.ingester  # HTTP sync batches go through the same ingester
        app.state.keyring = self.keyring  # and their answers are signed with the key the hub signs with
        # log_config=None: uvicorn's records go to the root handlers, which mask secrets (hub.masking).
        config = uvicorn.Config(app, host=self.settings.api_host, port=self.settings.api_port, log_level="warning", lifespan="off", log_config=None)
        self.server = uvicorn.Server(config)
        thread = threading.Thread(target=self.server.run, name="hub-http", daemon=True)
        thread.start()
        self._threads.append(thread)
        for _ in range(200):
            if self.server.started:
                return
            if not thread.is_alive():
                raise RuntimeError(f"the HTTP server could not start on {self.settings.api_host}:{self.settings.api_port} (port in use?)")
            self._stop.wait(0.05)
        raise RuntimeError("the HTTP server did not start within 10 s")
