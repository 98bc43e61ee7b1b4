"""The agent's composition root and lifecycle.

:class:`Agent` builds the parts from :class:`AgentSettings` and wires them
with callables, so ``runner``, ``sync``, ``link`` and ``verify`` never import
each other::

    inbound ──► link ──admit──► verify
                 │ on_assign ──► inbox.put ──► PUBACK ──► accepted event ──► runner.wake
                 │ on_cancel ──► runner.cancel
                 │ on_ack    ──► sync.on_ack (its refused_ids: sync.on_refused, set aside)
    runner ──► outbox ──► sync ──► link.send_event(result, hlc at finish)
                           └──► HTTP bulk sync (large backlogs) ──► answer ──► on_ack

It also owns the heartbeat, the counters, pruning of finished queue items
after ``inbox_retention``, and start-up recovery: claims left by a process
that died return to ready before anything runs.

Durability (docs/concepts.md, "Agent durability"; the policies live in
:mod:`agent.durability`): the tick loop renews the leases of the claims the
runner and the sync loop hold and releases expired ones; it measures the
outbox against ``outbox_max_bytes``, and while it is over, new assignments
are refused (``agent_backpressure``) and heartbeats say ``accepting=False``.
:meth:`Agent.run_forever` turns SIGTERM/SIGINT into a graceful stop and
SIGHUP into a config reload, and speaks systemd's notify protocol
(:mod:`agent.sdnotify`): READY, STATUS, STOPPING, and watchdog pings sent by
the tick loop only while the runner, sync and link threads are alive.
"""

from __future__ import annotations

import contextlib
import logging
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType
from urllib.parse import urlsplit
from typing import Any, Protocol

from agent import __version__
from agent.config import AgentSettings
from agent.durability import BACKPRESSURE_CODE, Backpressure, merge_reload, renew_and_sweep
from agent.identity import device_key
from agent import identity, trust
from agent.inventory import Inventory, stable_part
from agent.link import AgentLink, Handlers
from agent.queues import Inbox, Outbox, PendingResult, event_key, log_key
from agent.replay import FRESH, SEEN, ReplayWindow
from agent.runner import Runner
from agent.sdnotify import Notifier
from agent.sync import HttpPath, HubSyncClient, Sync
from agent.verify import Rejection, admit, open_message, security
from firmware_jobs.base import Job
from shared.clock import Clock, SystemClock
from shared.envelope import Envelope
from shared.frames import AGENT_TO_HUB, sign_envelope
from shared.hlc import HybridClock
from shared.errors import PayloadTooLarge
from shared.messages import Accepted, Ack, Assign, Cancel, Heartbeat, JobTypeInfo, Rejected, Status
from shared.mqtt import Inbound
from shared.requestsig import HEADER, sign_request
from shared.signing import BadKey

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

    def __init__(
        self, settings: AgentSettings, *, clock: Clock | None = None, registry: JobRegistry | None = None, notifier: Notifier | None = None,
    ) -> None:
        if registry is None:
            from firmware_jobs import registry as builtin

            registry = builtin
        self.settings = settings
        self.clock = clock or SystemClock()
        self.registry = registry
        self.hlc = HybridClock(settings.agent_id, lambda: int(self.clock.now() * 1000))
        floor = identity.load_hlc_floor(settings)
        if floor is not None:
            # Never stamp below what this device already sent, even when its
            # clock came back from a restart behind (see agent/identity.py).
            self.hlc.update(floor)
        self.counters = Counters()
        self.inventory = Inventory(settings.device_root, __version__, registry.catalog())
        self._status_inventory: tuple[Any, ...] = ()
        self.notifier = notifier or Notifier()
        self.inbox = Inbox(settings.inbox_path, settings.sqlite_synchronous, self.clock)
        try:
            self.outbox = Outbox(settings.outbox_path, settings.sqlite_synchronous, self.clock)
        except BaseException:
            self.inbox.close()
            raise
        try:
            self.device_key = identity.device_key(settings)
            self.trust = trust.TrustStore(settings)
            self.replay = ReplayWindow(settings.state_dir / "replay.sqlite3", settings.replay_window, settings.sqlite_synchronous)
        except BaseException:
            self.inbox.close()
            self.outbox.close()
            raise
        if not self.trust.keys():
            log.warning("no trusted hub key (outpost-agent trust add KEY, or hub_public_keys): every message from the hub will be refused")
        count = self.counters.incr
        handlers = Handlers(self._admit, self._on_assign, self._on_cancel, self._on_ack, self._on_connect, count, self._open, self._on_keys)
        self.link = AgentLink(settings, self.hlc, handlers, self._online_status(), self.device_key, self.clock.now)
        self.sync = Sync(
            self.outbox, self._publish_result, lambda: self.link.connected, self.clock,
            resend_after=settings.result_resend_after, count=count, http=self._http_path(settings),
        )
        self.runner = Runner(
            self.inbox, self.outbox, registry, self.clock, self.hlc.now, settings.work_dir,
            {"agent_version": __version__, "command_allowlist": list(settings.command_allowlist), "state_dir": str(settings.state_dir),
             "device_root": str(settings.device_root),
             "hub_url": settings.hub_url, "hub_ca": settings.hub_ca, "release_keys": trust.release_keys(settings)},
            concurrency=settings.concurrency, max_message_bytes=settings.max_message_bytes,
            on_event=self.link.send_event, on_result=lambda aid: self.sync.wake(), count=count,
            job_type_concurrency=settings.job_type_concurrency, job_cpu_seconds=settings.job_cpu_seconds,
            job_memory_mb=settings.job_memory_mb, job_type_cpu_seconds=settings.job_type_cpu_seconds,
            job_type_memory_mb=settings.job_type_memory_mb, max_log_bytes=settings.max_log_bytes,
            sign_request=self._sign_for_job,
        )
        self.backpressure = Backpressure(self.outbox, settings.outbox_max_bytes)
        self._stopping = threading.Event()
        self._beat_now = threading.Event()
        self._ticker: threading.Thread | None = None
        self._unhealthy = ""

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        """Recover, then start running, syncing and connecting (in the
        background: the agent works offline until the broker answers)."""
        released = self.inbox.release_expired_claims(0)
        resent = self.outbox.release_expired_claims(0)
        if released or resent:
            log.info("recovered %d claimed assignment(s) and %d in-flight result(s) from the last run", released, resent)
        self._prune()
        self._guarded(self.backpressure.check, "quota")
        self._stopping.clear()
        self.runner.start()
        self.sync.start()
        self.link.start()
        self._ticker = threading.Thread(target=self._tick_loop, name="heartbeat", daemon=True)
        self._ticker.start()
        log.info("agent %s %s started (state in %s)", self.settings.agent_id, __version__, self.settings.state_dir)
        self.notifier.ready(self._status_line())

    def stop(self, timeout: float = 20.0) -> bool:
        """Graceful stop: no new jobs, running ones get up to ``timeout``
        seconds (then their abort flag; no result is recorded for them and they
        run again after restart), the offline status is published, the link
        closes. True when every running job finished in time."""
        self._stopping.set()
        self._beat_now.set()
        self.notifier.stopping(f"stopping: {len(self.runner.running())} job(s) get up to {timeout:.0f}s to finish")
        finished = self.runner.stop(timeout)
        self.sync.stop()
        if self._ticker is not None:
            self._ticker.join(5.0)
        self.link.stop()
        self.inbox.close()
        self.outbox.close()
        self.replay.close()
        log.info("agent %s stopped%s", self.settings.agent_id, "" if finished else " (some jobs were interrupted)")
        return finished

    def run_forever(self, stop_timeout: float | None = None, reload: Callable[[], AgentSettings] | None = None) -> None:
        """Run until SIGTERM or SIGINT, then stop gracefully, giving running
        jobs ``stop_timeout`` seconds (default: the ``stop_timeout``
        setting). On SIGHUP, ``reload()`` reads the configuration again and
        :meth:`reload` applies it; a reload that fails is logged and ignored."""
        received: list[int] = []
        # The C-level handler writes a byte to this socket for every signal,
        # so the main thread can sleep in select() until one arrives instead
        # of waking five times a second to look at flags.
        wakeup_r, wakeup_w = socket.socketpair()
        wakeup_r.setblocking(False)
        wakeup_w.setblocking(False)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            # Only record it here: the handler runs between bytecodes of the
            # main thread, which may hold a lock the real work needs (so no
            # Event.set, whose lock the interrupted code may be holding).
            received.append(signum)

        sigs = (signal.SIGTERM, signal.SIGINT) + ((signal.SIGHUP,) if reload is not None else ())
        previous = {sig: signal.signal(sig, on_signal) for sig in sigs}
        previous_fd = signal.set_wakeup_fd(wakeup_w.fileno())
        try:
            self.start()
            stop = False
            while not stop:
                if not received:
                    select.select([wakeup_r], [], [], 30.0)
                with contextlib.suppress(OSError):
                    wakeup_r.recv(4096)
                while received:
                    if received.pop(0) == signal.SIGHUP:
                        self._reload_from(reload)
                    else:
                        stop = True
            log.info("stop signal received, stopping")
            self.stop(self.settings.stop_timeout if stop_timeout is None else stop_timeout)
        finally:
            signal.set_wakeup_fd(previous_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wakeup_r.close()
            wakeup_w.close()

    def _reload_from(self, reload: Callable[[], AgentSettings] | None) -> None:
        log.info("SIGHUP: reloading the configuration")
        if reload is None:
            return
        try:
            loaded = reload()
        except Exception as exc:  # a bad file must never stop a running agent
            log.error("configuration reload failed, keeping the running configuration: %s", exc)
            self.counters.incr("errors.reload")
            return
        self._guarded(lambda: self.reload(loaded), "reload")

    def reload(self, loaded: AgentSettings) -> list[str]:
        """Apply the settings that can change live from ``loaded``; the rest
        (agent id, state dir, broker...) keep their running values with a
        warning naming them. Returns the names of the settings applied."""
        merged, live, restart = merge_reload(self.settings, loaded)
        # The trusted hub keys are read again on every reload: `outpost-agent
        # trust add` changes the file under a running agent.
        self.trust.settings = merged
        self._guarded(self.trust.reload, "trust")
        self._guarded(lambda: self.runner.job_settings.update(release_keys=trust.release_keys(merged)), "release keys")
        if restart:
            log.warning("configuration reload: %s changed but only take(s) effect after a restart; still using the running value(s)", ", ".join(restart))
        if not live:
            log.info("configuration reload: nothing to change")
            return live
        self.settings = merged
        if "labels" in live:
            self.link.set_online_status(self._online_status())
        if "concurrency" in live:
            self.runner.set_concurrency(merged.concurrency)
        if "command_allowlist" in live:
            self.runner.job_settings["command_allowlist"] = list(merged.command_allowlist)
        if "log_level" in live:
            logging.getLogger().setLevel(merged.log_level)
        if "max_message_bytes" in live:
            self.link.limit = self.runner.limit = merged.max_message_bytes
        self.sync.resend_after = merged.result_resend_after
        self.backpressure.max_bytes = merged.outbox_max_bytes
        # heartbeat_interval, inbox_retention, claim_lease and stop_timeout
        # are read from self.settings when used.
        log.info("configuration reload applied: %s", ", ".join(live))
        self.counters.incr("config.reloaded")
        self._beat_now.set()
        return live

    def _sign_for_job(self, method: str, path: str) -> dict[str, str]:
        """A job's signed request to the hub (firmware downloads): signed
        here, so the job's process never holds the device key. Only reads of
        the artifact store: a job cannot act as the agent anywhere else."""
        allowed = urlsplit(self.settings.hub_url or "").path.rstrip("/") + "/api/v1/artifacts/"
        if method != "GET" or not path.startswith(allowed) or "/../" in path or "?" in path:
            raise ValueError(f"jobs may only sign GET requests under {allowed}")
        return {HEADER: sign_request(self.device_key, self.settings.agent_id, method, path, b"", self.clock.now())}

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

    def _open(self, payload: bytes) -> Envelope | Rejection:
        return open_message(payload, self.trust.keys(), self.settings.agent_id, self.link.limit, self.clock.now())

    def _on_keys(self, payload: bytes) -> None:
        outcome = self.trust.apply_announcement(payload)
        self.counters.incr(f"keys.{outcome.status}")
        if outcome.status == "refused":
            self.counters.incr("security.bad_announcement")
            self.link.send_event(Rejected("security.bad_announcement", outcome.detail[:500]))

    def _admit(self, envelope: Envelope, topic_kind: str) -> Rejection | None:
        rejection = admit(envelope, topic_kind, self.clock.now())
        body = envelope.body
        held = isinstance(body, Assign | Cancel) and self.inbox.get(body.assignment_id) is not None
        if rejection is None and isinstance(body, Assign | Cancel):
            rejection = self._check_seq(envelope, held)
        if rejection is not None and rejection.code == "deadline_passed" and held:
            # A redelivery of an assignment we already hold is answered as a
            # duplicate (accepted again), not refused: its result exists or will.
            return None
        if rejection is None and isinstance(envelope.body, Assign) and self.backpressure.check():
            # Refused, PUBACKed and reported, not left unacknowledged: an
            # unacked message holds a slot of the broker's receive window, and
            # enough of them would stop the hub's acks, the only thing that
            # drains the outbox. The hub keeps the assignment "sent" and sends
            # it again later. One already stored is answered as a duplicate.
            if self.inbox.get(envelope.body.assignment_id) is None:
                self.counters.incr("assign.refused_backpressure")
                return Rejection(BACKPRESSURE_CODE, f"not accepting new work: {self.backpressure.reason}", envelope.body.assignment_id)
        return rejection

    def _check_seq(self, envelope: Envelope, held: bool) -> Rejection | None:
        """The replay check: each of the hub's sequence numbers is used once.
        A copy of something the inbox holds is a duplicate (a QoS 1
        redelivery or a replay alike can change nothing), answered as such."""
        if envelope.seq is None:
            return security("replayed", f"a {envelope.type} without a sequence number", message_id=envelope.id)
        state = self.replay.check(envelope.seq)
        if state == FRESH or held:
            return None
        why = "was already used" if state == SEEN else f"is behind the replay window (newest {self.replay.newest()}, window {self.replay.window})"
        return security("replayed", f"{envelope.type} sequence number {envelope.seq} {why}", message_id=envelope.id)

    def _on_assign(self, envelope: Envelope, inbound: Inbound) -> None:
        assign = envelope.body
        if not isinstance(assign, Assign):
            raise TypeError(f"on_assign got a {envelope.type!r} message")
        _, duplicate = self.inbox.put(assign)
        if envelope.seq is not None:
            self.replay.record(envelope.seq)
        inbound.ack()  # only now: the assignment is durable
        self.counters.incr("assign.duplicate" if duplicate else "assign.accepted")
        log.info("assignment %s (%s) %s", assign.assignment_id, assign.job_type, "is a duplicate" if duplicate else "accepted")
        self.link.send_event(Accepted(assign.assignment_id, duplicate=duplicate))
        if not duplicate:
            self.runner.wake()

    def _on_cancel(self, envelope: Envelope) -> None:
        cancel = envelope.body
        if not isinstance(cancel, Cancel):
            raise TypeError(f"on_cancel got a {envelope.type!r} message")
        outcome = self.runner.cancel(cancel.assignment_id, cancel.reason)
        if envelope.seq is not None:
            self.replay.record(envelope.seq)
        self.counters.incr(f"cancel.{outcome}")
        log.info("cancel of %s: %s", cancel.assignment_id, outcome)

    def _on_ack(self, ack: Ack) -> None:
        self.sync.on_ack([*ack.assignment_ids, *(event_key(e) for e in ack.event_ids), *(log_key(i) for i in ack.log_ids)])
        if ack.refused_ids:
            self.sync.on_refused(ack.refused_ids)

    def _on_connect(self) -> None:
        self.sync.resend_all()
        self._beat_now.set()

    def _publish_result(self, item: PendingResult) -> bool:
        try:
            return self.link.send_item(item.result, item.hlc)
        except PayloadTooLarge as exc:
            # Stored under a larger max_message_bytes (changed since, by a
            # reload or a restart): Sync sets it aside; the hub gets a record.
            detail = f"outbox item {item.assignment_id} cannot be sent and was set aside on the device: {exc}"
            self.link.send_event(Rejected(exc.code, detail[:500], None, getattr(item.result, "assignment_id", None)))
            raise

    def _http_path(self, settings: AgentSettings) -> HttpPath | None:
        """The HTTP bulk sync, when a hub URL is configured."""
        if not settings.hub_url:
            return None
        try:
            key = device_key(settings, create=False)
        except BadKey as exc:
            # The hub accepts only requests signed with a registered key.
            log.warning("HTTP sync off, outbox drains over MQTT only: no usable device key (%s); enrol the device (outpost-agent enroll)", exc)
            return None
        # Answers are checked with the trusted hub keys as they are at each
        # request: a rotation the device followed applies to HTTP at once.
        client = HubSyncClient(settings.hub_url, settings.agent_id, key, settings.http_sync_timeout, settings.hub_ca, hub_keys=self.trust.keys)

        def envelope(item: PendingResult) -> bytes:
            # Signed like what the MQTT path publishes for this item.
            stamped = Envelope(item.result, sender=settings.agent_id, hlc=item.hlc, issued_at=round(self.clock.now(), 3))
            return sign_envelope(stamped, self.device_key, AGENT_TO_HUB, self.link.limit)

        def bad_answer(detail: str) -> None:
            # As for a forged MQTT message: the hub records it as a security event.
            self.link.send_event(Rejected("security.bad_answer", detail[:500]))

        return HttpPath(client, envelope, self._on_ack, settings.state_dir / "outbox.stream", settings.http_sync_threshold, settings.http_sync_batch, bad_answer)

    # --- status and heartbeat ------------------------------------------------

    def _online_status(self, inventory: dict[str, Any] | None = None) -> Status:
        inventory = self.inventory.collect() if inventory is None else inventory
        self._status_inventory = stable_part(inventory)
        job_types = tuple(JobTypeInfo(name, version) for name, version in self.inventory.job_types.items())
        return Status("online", __version__, socket.gethostname(), dict(self.settings.labels), job_types, inventory)

    def heartbeat(self) -> Heartbeat:
        inventory = self.inventory.collect()
        if stable_part(inventory) != self._status_inventory:
            # New firmware (an OTA switched slots): the retained status is
            # what a hub that subscribes later reads, so it must say so too.
            self.link.set_online_status(self._online_status(inventory))
        return Heartbeat(
            agent_version=__version__,
            inbox_depth=self.inbox.depth(),
            outbox_depth=self.outbox.depth(),
            running=tuple(self.runner.running()),
            accepting=not self.not_accepting(),
            counters=self.counters.snapshot(),
            not_accepting=self.not_accepting(),
            clock=self.clock.now(),
            inventory=inventory,
        )

    def not_accepting(self) -> str:
        """Why the agent takes no new work now, or "" when it does."""
        return "stopping" if self._stopping.is_set() else self.backpressure.reason

    def healthy(self) -> str:
        """Empty while every thread the agent needs is alive; else names those that are not."""
        dead = [name for name, part in (("runner", self.runner), ("sync", self.sync), ("link consumer", self.link)) if not part.alive()]
        return f"{', '.join(dead)} thread(s) not running" if dead else ""

    def _status_line(self) -> str:
        reason = self.not_accepting()
        return (f"{len(self.runner.running())} running, inbox {self.inbox.depth()}, outbox {self.outbox.depth()}, "
                f"{'not accepting: ' + reason if reason else 'accepting'}, {'connected' if self.link.connected else 'offline'}")

    def _tick_loop(self) -> None:
        """Heartbeats, quota checks, lease renewal, pruning and watchdog
        pings. The pings come from this loop, so a stuck loop stops them."""
        now = time.monotonic()
        next_beat, next_prune, next_lease = now + self.settings.heartbeat_interval, now + PRUNE_EVERY, now
        dog = self.notifier.watchdog_interval
        next_dog = now if dog else float("inf")
        while not self._stopping.is_set():
            self._beat_now.wait(max(0.0, min(next_beat, next_lease, next_dog) - time.monotonic()))
            if self._stopping.is_set():
                return
            now = time.monotonic()
            if dog and now >= next_dog:
                next_dog = now + dog / 2
                self._watchdog()
            if now >= next_lease:
                next_lease = now + self.settings.claim_lease / 3
                self._guarded(self._renew_leases, "leases")
            if self._beat_now.is_set() or now >= next_beat:
                self._beat_now.clear()
                next_beat = now + self.settings.heartbeat_interval
                self._guarded(self.backpressure.check, "quota")
                self._guarded(lambda: self.link.send_event(self.heartbeat()), "heartbeat")
                self._guarded(lambda: self.notifier.status(self._status_line()), "status")
            if now >= next_prune:
                next_prune = now + PRUNE_EVERY
                self._guarded(self._prune, "pruning")

    def _watchdog(self) -> None:
        problem = self.healthy()
        if problem != self._unhealthy:
            if problem:
                log.error("watchdog: %s; no more pings, systemd will restart the agent", problem)
            self._unhealthy = problem
        if not problem:
            self.notifier.watchdog()

    def _renew_leases(self) -> None:
        _renewed, released = renew_and_sweep(self.inbox, self.outbox, self.runner.claims(), self.sync.claims(), self.settings.claim_lease)
        if released:
            log.warning("released %d claim(s) whose lease ran out (a worker died?); they are ready again", released)
            self.counters.incr("claims.expired")
            self.runner.wake()
            self.sync.wake()

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
