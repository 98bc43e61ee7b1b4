"""The agent's composition root and lifecycle.

:class:`Agent` builds the parts from :class:`AgentSettings` and wires them
with callables, so ``runner``, ``sync``, ``link`` and ``verify`` never import
each other::

    inbound ──► link ──admit──► verify
                 │ on_assign ──► inbox.put ──► PUBACK ──► accepted event ──► runner.wake
                 │ on_cancel ──► runner.cancel
                 │ on_ack    ──► sync.on_ack
    runner ──► outbox ──► sync ──► link.send_event(result, hlc at finish)
                           └──► HTTP bulk sync (large backlogs) ──► answer ──► on_ack

It also owns the heartbeat, the counters, pruning of finished queue items
after ``inbox_retention``, and start-up recovery: claims left by a process
that died return to ready before anything runs.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol

from agent import __version__
from agent.config import AgentSettings
from agent.link import AgentLink, Handlers
from agent.queues import Inbox, Outbox, PendingResult, event_key
from agent.runner import Runner
from agent.sync import HttpPath, HubSyncClient, Sync
from agent.verify import Rejection, admit
from firmware_jobs.base import Job
from shared.clock import Clock, SystemClock
from shared.envelope import Envelope, encode
from shared.hlc import HybridClock
from shared.messages import Accepted, Ack, Assign, Cancel, Heartbeat, JobTypeInfo, Status
from shared.mqtt import Inbound

log = logging.getLogger(__name__)

#: How often finished queue items older than the retention are deleted.
PRUNE_EVERY = 3600.0


class JobRegistry(Protocol):
    def get(self, name: str) -> Job: ...
    def catalog(self) -> list[dict[str, Any]]: ...


class Counters:
    """Monotonic event counters since start (sent in every heartbeat)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def incr(self, name: str) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class Agent:
    """One agent: queues, MQTT link, runner, sync loop and heartbeat."""

    def __init__(self, settings: AgentSettings, *, clock: Clock | None = None, registry: JobRegistry | None = None) -> None:
        if registry is None:
            from firmware_jobs import registry as builtin

            registry = builtin
        self.settings = settings
        self.clock = clock or SystemClock()
        self.registry = registry
        self.hlc = HybridClock(settings.agent_id, lambda: int(self.clock.now() * 1000))
        self.counters = Counters()
        self.inbox = Inbox(settings.inbox_path, settings.sqlite_synchronous)
        try:
            self.outbox = Outbox(settings.outbox_path, settings.sqlite_synchronous)
        except BaseException:
            self.inbox.close()
            raise
        count = self.counters.incr
        handlers = Handlers(self._admit, self._on_assign, self._on_cancel, self._on_ack, self._on_connect, count)
        self.link = AgentLink(settings, self.hlc, handlers, self._online_status())
        self.sync = Sync(
            self.outbox, self._publish_result, lambda: self.link.connected, self.clock,
            resend_after=settings.result_resend_after, count=count, http=self._http_path(settings),
        )
        self.runner = Runner(
            self.inbox, self.outbox, registry, self.clock, self.hlc.now, settings.work_dir,
            {"agent_version": __version__, "command_allowlist": list(settings.command_allowlist), "state_dir": str(settings.state_dir)},
            concurrency=settings.concurrency, max_message_bytes=settings.max_message_bytes,
            on_event=self.link.send_event, on_result=lambda aid: self.sync.wake(), count=count,
        )
        self._stopping = threading.Event()
        self._beat_now = threading.Event()
        self._ticker: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Recover, then start running, syncing and connecting (in the
        background: the agent works offline until the broker answers)."""
        released = self.inbox.release_expired_claims(0)
        resent = self.outbox.release_expired_claims(0)
        if released or resent:
            log.info("recovered %d claimed assignment(s) and %d in-flight result(s) from the last run", released, resent)
        self._prune()
        self._stopping.clear()
        self.runner.start()
        self.sync.start()
        self.link.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="heartbeat", daemon=True)
        self._ticker.start()
        log.info("agent %s %s started (state in %s)", self.settings.agent_id, __version__, self.settings.state_dir)

    def stop(self, timeout: float = 20.0) -> bool:
        """Graceful stop: no new jobs, running ones get up to ``timeout``
        seconds (then their abort flag; no result is recorded for them and they
        run again after restart), the offline status is published, the link
        closes. True when every running job finished in time."""
        self._stopping.set()
        self._beat_now.set()
        finished = self.runner.stop(timeout)
        self.sync.stop()
        if self._ticker is not None:
            self._ticker.join(5.0)
        self.link.stop()
        self.inbox.close()
        self.outbox.close()
        log.info("agent %s stopped%s", self.settings.agent_id, "" if finished else " (some jobs were interrupted)")
        return finished

    def run_forever(self, stop_timeout: float = 20.0) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully."""
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not stop.wait(0.2):
                pass
            self.stop(stop_timeout)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def drain(self, timeout: float) -> bool:
        """Wait until the inbox is empty, nothing runs and every result was
        acknowledged. True when that happened within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.inbox.depth() == 0 and not self.runner.running() and self.outbox.depth() == 0:
                return True
            time.sleep(0.05)
        return False

    # --- link handlers -------------------------------------------------------

    def _admit(self, envelope: Envelope, topic_kind: str) -> Rejection | None:
        rejection = admit(envelope, topic_kind, self.clock.now())
        if rejection is not None and rejection.code == "deadline_passed" and rejection.assignment_id is not None:
            # A redelivery of an assignment we already hold is answered as a
            # duplicate (accepted again), not refused: its result exists or will.
            if self.inbox.get(rejection.assignment_id) is not None:
                return None
        return rejection

    def _on_assign(self, envelope: Envelope, inbound: Inbound) -> None:
        assign = envelope.body
        if not isinstance(assign, Assign):
            raise TypeError(f"on_assign got a {envelope.type!r} message")
        _, duplicate = self.inbox.put(assign)
        inbound.ack()  # only now: the assignment is durable
        self.counters.incr("assign.duplicate" if duplicate else "assign.accepted")
        log.info("assignment %s (%s) %s", assign.assignment_id, assign.job_type, "is a duplicate" if duplicate else "accepted")
        self.link.send_event(Accepted(assign.assignment_id, duplicate=duplicate))
        if not duplicate:
            self.runner.wake()

    def _on_cancel(self, cancel: Cancel) -> None:
        outcome = self.runner.cancel(cancel.assignment_id, cancel.reason)
        self.counters.incr(f"cancel.{outcome}")
        log.info("cancel of %s: %s", cancel.assignment_id, outcome)

    def _on_ack(self, ack: Ack) -> None:
        self.sync.on_ack([*ack.assignment_ids, *(event_key(e) for e in ack.event_ids)])

    def _on_connect(self) -> None:
        self.sync.resend_all()
        self._beat_now.set()

    def _publish_result(self, item: PendingResult) -> bool:
        return self.link.send_event(item.result, hlc=item.hlc)

    def _http_path(self, settings: AgentSettings) -> HttpPath | None:
        """The HTTP bulk sync, when a hub URL is configured."""
        if not settings.hub_url:
            return None
        client = HubSyncClient(settings.hub_url, settings.agent_id, settings.sync_token, settings.http_sync_timeout)

        def envelope(item: PendingResult) -> bytes:
            # Byte for byte what the MQTT path publishes for this item.
            return encode(Envelope(item.result, sender=settings.agent_id, hlc=item.hlc), settings.max_message_bytes)

        return HttpPath(client, envelope, self._on_ack, settings.state_dir / "outbox.stream", settings.http_sync_threshold, settings.http_sync_batch)

    # --- status and heartbeat ------------------------------------------------

    def _online_status(self) -> Status:
        job_types = tuple(JobTypeInfo(entry["name"], entry["version"]) for entry in self.registry.catalog())
        return Status("online", __version__, socket.gethostname(), dict(self.settings.labels), job_types)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            agent_version=__version__,
            inbox_depth=self.inbox.depth(),
            outbox_depth=self.outbox.depth(),
            running=tuple(self.runner.running()),
            accepting=not self._stopping.is_set(),
            counters=self.counters.snapshot(),
        )

    def _tick_loop(self) -> None:
        next_prune = time.monotonic() + PRUNE_EVERY
        while not self._stopping.is_set():
            self._beat_now.wait(self.settings.heartbeat_interval)
            self._beat_now.clear()
            if self._stopping.is_set():
                return
            self._guarded(lambda: self.link.send_event(self.heartbeat()), "heartbeat")
            if time.monotonic() >= next_prune:
                next_prune = time.monotonic() + PRUNE_EVERY
                self._guarded(self._prune, "pruning")

    def _prune(self) -> None:
        now = self.clock.now()
        removed = self.inbox.prune_done(self.settings.inbox_retention, now) + self.outbox.prune_done(self.settings.inbox_retention, now)
        if removed:
            log.info("pruned %d finished queue item(s) older than %.0fs", removed, self.settings.inbox_retention)

    def _guarded(self, action: Callable[[], object], what: str) -> None:
        try:
            action()
        except Exception:
            log.exception("%s failed", what)
            self.counters.incr(f"errors.{what}")
