"""``outpost-agent simulate``: a fleet of simulated devices in one process or a few.

Every simulated device is the real agent (:class:`agent.daemon.Agent`) with
its own state folder and device root, enrolled for real: its Ed25519 key is
made here, only the public key goes to ``POST /api/v1/enroll`` (agent/enrol.py),
and from then on everything it sends is signed and everything it receives
verified, as on a device. Layout under ``--root``::

    <root>/failing.json            the devices with a failing health check
    <root>/<id>/                   the agent's state_dir (queues, identity/)
    <root>/<id>/device/            its device root (firmware_jobs/devroot.py;
                                   the device_root setting's default):
        device.json                {"hardware_model", "firmware_version", "serial"}
        hooks/health-check         only on failing devices: exits 1

A second run over the same root reuses the identities (no token needed for
devices already enrolled).

What one agent costs, measured on the 2-core bench machine: 8 threads (runner
claimer and workers, sync, link consumer, paho's network loop, the MQTT
watchdog, heartbeat), about 1.5 MB of memory, and file descriptors: with
litequeue's default pool of 10 read connections per queue file up to 50 (two
queue files with 11 connections each, their WAL files, the replay window, 3
sockets); with the pool cut to one (:func:`agent.queues.set_read_pool_size`,
the agent reads through its write connection anyway) 16. So a process raises
RLIMIT_NOFILE to its hard limit, cuts the pool, makes thread stacks smaller
(most of a thread's 8 MiB default is never touched, but it is address space),
and connects in waves so the broker and the hub are not hit by every
device at once. Jobs run through the one fork server per process
(agent/jobhost.py keeps it module-global): a thousand agents share it.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import ENROLMENT_FILE, AgentSettings, load_settings
from shared.errors import OutpostError

log = logging.getLogger(__name__)

HELP = "Run many simulated devices (the real agent, each with its own state folder and device root) in this process or a few, each enrolled for real."
EXAMPLE = """example:
  outpost-hub agents token create --uses 1000 --expires 2h     # on the hub: one token for the whole batch
  outpost-agent simulate --count 1000 --hub https://hub.example:8443 --ca-file ca.pem \\
      --broker 127.0.0.1:1883 --enrolment-token opte_... --root /tmp/fleet \\
      --label site=sim --hardware sim-v2 --firmware 1.0.0 --fail-rate 0.05 --fail-seed 7 --processes 2
"""
FAILING_FILE = "failing.json"
#: Thread stack size for simulated devices: far above what the agent's
#: threads use, far below the 8 MiB default (address space, times ~8000).
STACK_SIZE = 1024 * 1024
#: The GIL switch interval for simulated fleets (CPython's default: 5 ms).
#: Every thread waiting for the GIL wakes once per interval; when a thousand
#: assignments arrive together, a thousand waiters waking every 5 ms keep the
#: kernel busy switching instead of running them.
SWITCH_INTERVAL = 0.05
_FAILING_HOOK = "#!/bin/sh\necho 'simulated health check failure' >&2\nexit 1\n"


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"broker {text!r} is not HOST:PORT")
    return host, int(port)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not key=value")
    return key, value


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"fail rate {text} is not between 0 and 1")
    return value


def _shard(text: str) -> tuple[int, int]:
    index, sep, total = text.partition("/")
    if not sep or not index.isdigit() or not total.isdigit() or not 0 <= int(index) < int(total):
        raise argparse.ArgumentTypeError(f"shard {text!r} is not I/N with 0 <= I < N")
    return int(index), int(total)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``simulate`` command's flags (agent/cli.py builds the command)."""
    add = parser.add_argument
    add("--count", type=int, required=True, metavar="N", help="how many devices")
    add("--root", type=Path, required=True, metavar="DIR", help="folder for the devices' state and device roots (kept: a second run reuses the identities)")
    add("--hub", metavar="URL", help="the hub's base URL, https://... (needed while some device is not enrolled)")
    add("--enrolment-token", metavar="TOKEN", help="an enrolment token good for the devices not enrolled yet (outpost-hub agents token create --uses N)")
    add("--ca-file", metavar="FILE", help="CA certificate the hub's HTTPS certificate chains to (default: the system CA store)")
    add("--broker", type=_broker, metavar="HOST:PORT", help="MQTT broker (default: what the enrolment answered)")
    add("--prefix", default="sim", help="device ids are PREFIX-00001... (default sim)")
    add("--label", "--labels", type=_label, action="append", default=[], metavar="KEY=VALUE", help="a label every device reports (repeatable)")
    add("--hardware", default="sim-board", metavar="MODEL", help="hardware_model in each device.json (default sim-board)")
    add("--firmware", default="1.0.0", metavar="VERSION", help="baseline firmware_version in each device.json (default 1.0.0)")
    add("--fail-rate", type=_rate, default=0.0, metavar="FRACTION", help="this fraction of devices gets a failing hooks/health-check (exit 1), so firmware.update rolls back there (default 0)")
    add("--release-key", action="append", default=[], metavar="ed25519:...", help="a release public key every device trusts for firmware.update (release_public_keys; repeatable; outpost release keygen prints it)")
    add("--fail-seed", type=int, default=0, metavar="SEED", help="seed choosing the failing devices; the same seed always picks the same ones (default 0)")
    add("--processes", type=int, default=1, metavar="P", help="split the devices over P processes (default 1; about 1,000 devices per process work)")
    add("--wave", type=int, default=100, metavar="N", help="start N devices, wait until they are connected (or --wave-timeout), then the next N (default 100)")
    add("--wave-timeout", type=float, default=30.0, metavar="SECONDS", help="longest wait for one wave to connect (default 30)")
    add("--max-jobs", type=int, default=200, metavar="N", help="jobs running at once per process, over all its devices (default 200; each holds about 8 open files)")
    add("--enrol-workers", type=int, default=8, metavar="N", help="enrolments in flight at once per process (default 8)")
    add("--heartbeat-interval", type=float, default=10.0, metavar="SECONDS", help="heartbeat_interval of every device (default 10, the agent's default; keep the hub's agent_offline_after above 3x it)")
    add("--keepalive", type=int, default=60, metavar="SECONDS", help="MQTT keepalive of every device (default 60)")
    add("--duration", type=float, metavar="SECONDS", help="stop by itself after this long (default: run until SIGTERM or SIGINT)")
    add("--log-level", default="WARNING", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level of the agents (default WARNING: a thousand agents say a lot)")
    add("--shard", type=_shard, help=argparse.SUPPRESS)


# --- the plan: ids and failing devices -------------------------------------------


def device_ids(prefix: str, count: int) -> list[str]:
    width = max(5, len(str(count)))
    return [f"{prefix}-{i:0{width}d}" for i in range(1, count + 1)]


def failing_devices(ids: Sequence[str], rate: float, seed: int) -> list[str]:
    """The devices whose health check fails: ``round(len(ids) * rate)`` of
    them, drawn by a generator seeded with ``seed`` alone, so the same
    arguments always give the same devices (sorted)."""
    count = round(len(ids) * rate)
    return sorted(random.Random(seed).sample(sorted(ids), count))


def prepare_device(state_dir: Path, agent_id: str, hardware: str, firmware: str, failing: bool) -> Path:
    """Lay out one device root (``<state_dir>/device``); returns it. The
    baseline version sits in device.json: ota/state.json, once firmware.update
    wrote it, wins (firmware_jobs/devroot.py)."""
    device = state_dir / "device"
    (device / "hooks").mkdir(parents=True, exist_ok=True)
    identity = {"hardware_model": hardware, "firmware_version": firmware, "serial": agent_id}
    (device / "device.json").write_text(json.dumps(identity, indent=2) + "\n")
    hook = device / "hooks" / "health-check"
    if failing:
        hook.write_text(_FAILING_HOOK)
        hook.chmod(0o755)
    else:
        hook.unlink(missing_ok=True)
    return device


# --- process limits --------------------------------------------------------------


def raise_file_limit() -> int:
    """RLIMIT_NOFILE up to its hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open file limit from %d: %s", soft, exc)
    return soft


# --- one process's share ---------------------------------------------------------


@dataclass
class Simulator:
    """The devices of one process: prepare, enrol, start in waves, stop."""

    args: argparse.Namespace
    ids: list[str]
    failing: set[str]
    agents: list[Any] = field(default_factory=list)

    def folder(self, agent_id: str) -> Path:
        return Path(self.args.root) / agent_id

    def prepare(self) -> None:
        for agent_id in self.ids:
            self.folder(agent_id).mkdir(parents=True, exist_ok=True)
            prepare_device(self.folder(agent_id), agent_id, self.args.hardware, self.args.firmware, agent_id in self.failing)

    def enrol_all(self) -> tuple[int, list[str]]:
        """Enrol every device not enrolled yet; returns (newly enrolled, errors)."""
        todo = [i for i in self.ids if not (self.folder(i) / ENROLMENT_FILE).exists()]
        if todo and (not self.args.hub or not self.args.enrolment_token):
            return 0, [f"{len(todo)} device(s) are not enrolled yet: --hub and --enrolment-token are needed"]
        with ThreadPoolExecutor(max(1, self.args.enrol_workers)) as pool:
            errors = [e for e in pool.map(self._enrol_one, todo) if e]
        return len(todo) - len(errors), errors

    def _enrol_one(self, agent_id: str) -> str:
        from agent.enrol import EnrolmentFailed, enrol

        settings = load_settings(None, env={}, overrides={"agent_id": agent_id, "state_dir": self.folder(agent_id)}, enrolment=False)
        for attempt in range(4):
            try:
                enrol(settings, self.args.hub, self.args.enrolment_token, agent_id, self.args.ca_file)
                return ""
            except EnrolmentFailed as exc:
                # A refusal (401, 409, 422) stays a refusal; a busy or
                # unreachable hub is worth another try.
                final = any(f"({code} " in str(exc) for code in (400, 401, 403, 409, 422)) or attempt == 3
                if final:
                    return f"{agent_id}: {exc}"
                time.sleep(0.5 * 2 ** attempt)
        return f"{agent_id}: not enrolled"

    def settings(self, agent_id: str) -> AgentSettings:
        overrides: dict[str, Any] = {
            "agent_id": agent_id, "state_dir": self.folder(agent_id), "labels": dict(self.args.label),
            "heartbeat_interval": self.args.heartbeat_interval, "keepalive": self.args.keepalive, "concurrency": 1,
            # A thousand devices fsyncing every commit on one disk would
            # measure the disk: crash-safe (NORMAL), not power-loss-safe.
            "sqlite_synchronous": "NORMAL", "log_level": self.args.log_level,
        }
        if self.args.broker:
            overrides["broker_host"], overrides["broker_port"] = self.args.broker
        # The URL the devices enrolled at is where firmware.update downloads from.
        if self.args.hub:
            overrides["hub_url"] = self.args.hub
        if self.args.ca_file:
            overrides["hub_ca"] = self.args.ca_file
        if self.args.release_key:
            overrides["release_public_keys"] = list(self.args.release_key)
        # env={}: OUTPOST_AGENT_* meant for a real agent must not leak into a thousand.
        return load_settings(None, env={}, overrides=overrides)

    def start(self, stopping: threading.Event) -> int:
        """Start the agents in waves; returns how many were connected at the end."""
        from agent.daemon import Agent

        wave = max(1, self.args.wave)
        for first in range(0, len(self.ids), wave):
            if stopping.is_set():
                break
            batch = [Agent(self.settings(agent_id)) for agent_id in self.ids[first:first + wave]]
            for agent in batch:
                agent.start()
                self.agents.append(agent)
            deadline = time.monotonic() + self.args.wave_timeout
            while not all(a.link.connected for a in batch) and time.monotonic() < deadline and not stopping.is_set():
                time.sleep(0.05)
            _say(f"{self._connected()}/{len(self.ids)} devices connected")
        return self._connected()

    def _connected(self) -> int:
        return sum(1 for a in self.agents if a.link.connected)

    def stop(self) -> None:
        if not self.agents:
            return
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(lambda a: a.stop(5.0), self.agents))
        self.agents.clear()


def _say(text: str) -> None:
    print(f"simulate: {text}", flush=True)


def _install_signals(stopping: threading.Event) -> None:
    received: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        # Only record it: the handler runs between bytecodes of the main
        # thread, which may hold the lock Event.set needs (see Agent.run_forever).
        received.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)

    def watch() -> None:
        # Turns the recorded signal into the event, outside the handler.
        while not received:
            time.sleep(0.2)
        stopping.set()

    threading.Thread(target=watch, name="simulate-signals", daemon=True).start()


def run_shard(args: argparse.Namespace, ids: list[str], failing: set[str]) -> int:
    from agent import jobhost, queues

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    files = raise_file_limit()
    queues.set_read_pool_size(1)
    threading.stack_size(STACK_SIZE)
    sys.setswitchinterval(SWITCH_INTERVAL)
    # Dump every thread's stack on SIGUSR1: the way to see where a thousand agents are.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    jobhost.limit_jobs(max(1, args.max_jobs))
    jobhost.start_fork_server()
    stopping = threading.Event()
    _install_signals(stopping)
    sim = Simulator(args, ids, failing)
    started = time.monotonic()
    sim.prepare()
    enrolled, errors = sim.enrol_all()
    for error in errors[:10]:
        _say(f"enrolment failed: {error}")
    if errors:
        _say(f"{len(errors)} enrolment(s) failed; stopping")
        return 1
    _say(f"{len(ids)} devices ready ({enrolled} enrolled now) in {time.monotonic() - started:.1f}s; open files allowed: {files}")
    try:
        connected = sim.start(stopping)
        _say(f"running: {connected}/{len(ids)} connected after {time.monotonic() - started:.1f}s (SIGTERM or Ctrl-C stops)")
        stopping.wait(args.duration)
    finally:
        sim.stop()
    _say(f"stopped {len(ids)} devices")
    return 0


def main(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the fleet: the whole of it, or with --processes, one child per
    shard, each started with ``argv`` (this command line) and its shard."""
    if args.count < 1 or args.processes < 1 or args.processes > args.count:
        print("outpost-agent simulate: --count must be at least 1 and --processes between 1 and --count", file=sys.stderr)
        return 2
    ids = device_ids(args.prefix, args.count)
    failing = failing_devices(ids, args.fail_rate, args.fail_seed)
    if args.shard is not None:
        index, total = args.shard
        return _guarded(args, ids[index::total], set(failing))
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    (root / FAILING_FILE).write_text(json.dumps({"seed": args.fail_seed, "rate": args.fail_rate, "devices": failing}, indent=2) + "\n")
    _say(f"{len(failing)} of {args.count} devices will fail their health check ({root / FAILING_FILE})" + (f": {', '.join(failing[:20])}" + (" ..." if len(failing) > 20 else "") if failing else ""))
    if args.processes == 1:
        return _guarded(args, ids, set(failing))
    return _run_children(args, argv)


def _guarded(args: argparse.Namespace, ids: list[str], failing: set[str]) -> int:
    try:
        return run_shard(args, ids, failing)
    except (OutpostError, OSError) as exc:  # ConfigError, QueueError, EnrolmentFailed...
        print(f"outpost-agent simulate: {exc}", file=sys.stderr)
        return 1


def _run_children(args: argparse.Namespace, argv: list[str]) -> int:
    """One child process per shard, started with the same arguments; SIGTERM
    and SIGINT are passed on, and the exit status is the worst child's."""
    # setpriv --pdeathsig: a shard gets SIGTERM when this process dies, even by kill -9.
    setpriv = shutil.which("setpriv")
    prefix = [setpriv, "--pdeathsig", "TERM"] if setpriv and sys.platform.startswith("linux") else []
    children = [subprocess.Popen([*prefix, sys.executable, "-m", "agent", *argv, "--shard", f"{i}/{args.processes}"]) for i in range(args.processes)]

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes = [child.wait() for child in children]
    return max(codes, key=abs)
