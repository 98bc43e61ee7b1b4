"""Fleet rollout benchmark: a real hub (scheduler and API processes), a
private Mosquitto, and N simulated devices (``outpost-agent simulate``: the
real agent code, each device enrolled for real over HTTPS with one
multi-use token), then one DAG whose task fans out to every device.

Prints, for this machine:
* wall time of each phase: enrol (all devices enrolled), connect (all
  online at the hub), rollout (trigger to run end, from the hub's stamps);
* hub CPU seconds per phase (utime + stime of the scheduler and API
  processes and their reaped children, from /proc/<pid>/stat);
* peak RSS of the hub, the broker and the simulator (with its shard
  processes, fork servers and job children), sampled from /proc every second;
* devices succeeded / failed.

The job is ``noop`` by default (a plain fan-out). ``--job firmware.update``
rolls out a firmware release instead, end to end: the benchmark makes a
release key (``outpost release keygen``), signs a random image of
``--image-kib`` KiB as ``bench-fw`` 2.0.0 for the simulator's hardware
(``outpost release sign``) and uploads it with its manifest to the fresh hub
(``outpost artifacts upload``); every simulated device trusts the release
key (``simulate --release-key``) and downloads from the TLS front (its URL
and CA become the devices' ``hub_url`` and ``hub_ca``); the DAG's task has a
``rollout=Rollout(canary, batch_size, growth, failure_threshold)`` policy.
``--fail-rate`` gives that fraction of devices a failing health check
(``--fail-seed`` picks them), so they roll back and count as failures. The
rollout's outcome is printed too: its state and reason, devices per state,
failure rate against the threshold, and the devices notified per batch.

TLS: devices enrol over HTTPS only, so a TLS front (tests/tlsfront.py, a
stand-in for the reverse proxy of a deployment) sits before the API; its
CPU is in this process, not counted as the hub's.

Usage: python bench/fleet_rollout.py [--devices 1000] [--processes 1] [--heartbeat-interval 30]
       python bench/fleet_rollout.py --job firmware.update [--image-kib 256] [--canary 1%] [--batch-size 10%]
           [--growth fixed] [--failure-threshold 0.05] [--fail-rate 0] [--fail-seed 0] [--health-timeout 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hub.auth import tokens as auth_tokens  # noqa: E402
from hub.auth import users as auth_users  # noqa: E402
from hub.db import make_engine, make_sessionmaker, transaction  # noqa: E402
from hub.standalone import PrivateBroker, free_port  # noqa: E402
from shared.clock import SystemClock, utcnow  # noqa: E402
from tests.broker.pki import Pki  # noqa: E402
from tests.tlsfront import TlsFront  # noqa: E402

DAG = """
from hub.dag import DAG, AgentOperator, Rollout, every_agent
with DAG("fleet_rollout_bench") as dag:
    AgentOperator(task_id="update", job_type={job!r}, params={params!r}, target=every_agent(fleet="bench"), execution_timeout={timeout}{rollout})
"""
#: The release the firmware benchmark makes; the simulated devices start at 1.0.0.
RELEASE_NAME, RELEASE_VERSION, BASELINE, HARDWARE = "bench-fw", "2.0.0", "1.0.0", "sim-board"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def cpu_seconds(pid: int) -> float:
    """utime + stime + cutime + cstime of ``pid`` (its reaped children too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / CLK_TCK


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def descendants(root: int) -> list[int]:
    """``root`` and every process below it, from one scan of /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        kids = [p for p, pp in parent.items() if pp in frontier]
        found += kids
        frontier = kids
    return found


class Sampler:
    """Peak RSS of groups of processes (a group: a root and its descendants), every second."""

    def __init__(self, groups: dict[str, Callable[[], list[int]]]) -> None:
        self.groups = groups
        self.peak = {name: 0.0 for name in groups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            for name, pids in self.groups.items():
                roots = pids()
                total = sum(rss_mb(p) for root in roots for p in descendants(root))
                self.peak[name] = max(self.peak[name], total)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=1, help="simulator processes (default 1)")
    parser.add_argument("--job", default="noop", choices=("noop", "firmware.update"), help="job type every device runs (default noop)")
    parser.add_argument("--image-kib", type=int, default=256, help="firmware.update: size of the release image in KiB (default 256)")
    parser.add_argument("--canary", type=_size, default="1%", help="firmware.update: canary devices, a count or N%% (default 1%%)")
    parser.add_argument("--batch-size", type=_size, default="10%", help="firmware.update: devices per batch, a count or N%% (default 10%%)")
    parser.add_argument("--growth", choices=("fixed", "exponential"), default="fixed", help="firmware.update: batch growth (default fixed)")
    parser.add_argument("--failure-threshold", type=float, default=0.05, help="firmware.update: the rollout aborts above this failure rate (default 0.05)")
    parser.add_argument("--health-timeout", type=float, default=2.0, help="firmware.update: seconds a failing health check is retried (default 2)")
    parser.add_argument("--fail-rate", type=float, default=0.0, help="fraction of devices with a failing health check (default 0)")
    parser.add_argument("--fail-seed", type=int, default=0, help="seed choosing the failing devices (default 0)")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0, help="devices' heartbeat interval (default 30; the hub's agent_offline_after is set to 3.5x)")
    parser.add_argument("--timeout", type=float, default=900.0, help="longest wait for each phase, seconds (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    firmware = args.job == "firmware.update"
    params: dict[str, Any] = {}
    rollout = ""
    if firmware:
        params = {"artifact_id": f"{RELEASE_NAME}-{RELEASE_VERSION}", "health_timeout": args.health_timeout}
        rollout = f", rollout=Rollout(canary={args.canary!r}, batch_size={args.batch_size!r}, growth={args.growth!r}, failure_threshold={args.failure_threshold!r})"

    # Cleanup (the finally below) must run on SIGTERM too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    # The broker and the simulator inherit it: a thousand devices need files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="outpost-fleet-bench-"))
    dags = root / "dags"
    dags.mkdir()
    (dags / "rollout.py").write_text(DAG.format(job=args.job, params=params, timeout=600, rollout=rollout))
    broker = PrivateBroker(root / "broker")
    broker.start()
    api_port = free_port()
    config = root / "hub.toml"
    from cryptography.fernet import Fernet

    config.write_text(
        f'state_dir = "{root / "hub"}"\ndags_folder = "{dags}"\nbroker_port = {broker.port}\napi_port = {api_port}\n'
        f"agent_offline_after = {args.heartbeat_interval * 3.5}\nscheduler_interval = 0.5\n"
        f'fernet_keys = "{Fernet.generate_key().decode()}"\nsecret_key = "bench-secret-key-{os.urandom(16).hex()}"\n'
    )
    procs: dict[str, subprocess.Popen[bytes]] = {}
    sim: subprocess.Popen[bytes] | None = None
    sampler: Sampler | None = None
    try:
        subprocess.run([sys.executable, "-m", "hub", "db", "upgrade", "--config", str(config)], check=True, capture_output=True, timeout=120)
        admin = admin_token(f"sqlite:///{root / 'hub' / 'hub.db'}")
        for role in ("scheduler", "api"):
            log = open(root / f"hub-{role}.log", "ab")
            procs[role] = subprocess.Popen([sys.executable, "-m", "hub", "--log-level", "WARNING", role, "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
            log.close()
        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}/api/v1", timeout=60, headers={"Authorization": f"Bearer {admin}"})
        wait_for(lambda: _ok(api, "/healthz"), 60, "the hub API")
        token = api.post("/enrolment-tokens", json={"uses": args.devices, "expires": "6h"}).json()["token"]
        pki = Pki(root / "pki")
        sampler = Sampler({
            "hub": lambda: [p.pid for p in procs.values()],
            "broker": lambda: [broker.proc.pid] if broker.proc else [],
            "simulator": lambda: [sim.pid] if sim else [],
        })
        sampler.start()
        hub_cpu = lambda: sum(cpu_seconds(p.pid) for p in procs.values())  # noqa: E731
        release_args: list[str] = []
        if firmware:
            release_args = ["--release-key", release(root, f"http://127.0.0.1:{api_port}", admin, args.image_kib)]
        # Open for the whole run: the devices download the image through it.
        with TlsFront(api_port, pki.server_cert, pki.server_key) as front:
            cpu0, t0 = hub_cpu(), time.monotonic()
            sim_log = root / "simulate.log"
            with open(sim_log, "ab") as out:
                sim = subprocess.Popen(
                    [sys.executable, "-m", "agent", "simulate", "--count", str(args.devices), "--root", str(root / "fleet"), "--hub", front.url,
                     "--ca-file", str(pki.ca), "--enrolment-token", token, "--broker", f"127.0.0.1:{broker.port}", "--label", "fleet=bench",
                     "--fail-rate", str(args.fail_rate), "--fail-seed", str(args.fail_seed), "--hardware", HARDWARE, "--firmware", BASELINE,
                     *release_args, "--processes", str(args.processes), "--heartbeat-interval", str(args.heartbeat_interval)],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                )
            wait_for(lambda: _enrolled(sim_log, args.processes, sim), args.timeout, "enrolment")
            cpu1, t1 = hub_cpu(), time.monotonic()
            wait_for(lambda: _online(api) >= args.devices or sim.poll() is not None, args.timeout, "devices online", poll=1.0)
            if sim.poll() is not None:
                raise SystemExit(f"the simulator exited with {sim.returncode}; see {sim_log}")
            cpu2, t2 = hub_cpu(), time.monotonic()
            run_id = api.post("/dags/fleet_rollout_bench/runs", json={"conf": {}}).json()["id"]

            def done() -> bool:
                rows = api.get("/runs", params={"dag_id": "fleet_rollout_bench", "limit": 1}).json()["items"]
                return bool(rows) and rows[0]["id"] == run_id and rows[0]["state"] in ("success", "failed")

            wait_for(done, args.timeout, "the rollout run", poll=1.0)
        cpu3 = hub_cpu()
        body = api.get(f"/runs/{run_id}").json()
        states: dict[str, int] = {}
        for ti in body["task_instances"]:
            states[ti["state"]] = states.get(ti["state"], 0) + 1
        rollout_wall = ts(body["ended_at"]) - ts(body["created_at"])
        sampler.stop()
        print(f"fleet rollout of {args.job} to {args.devices} simulated devices ({args.processes} simulator process(es)), {os.cpu_count()} cores:")
        print(f"  enrol    {t1 - t0:7.1f} s wall, hub CPU {cpu1 - cpu0:7.1f} s")
        print(f"  connect  {t2 - t1:7.1f} s wall, hub CPU {cpu2 - cpu1:7.1f} s (all {args.devices} online at the hub)")
        print(f"  rollout  {rollout_wall:7.1f} s wall (trigger to run end), hub CPU {cpu3 - cpu2:7.1f} s")
        print(f"  devices: {states.get('success', 0)} succeeded, {sum(v for k, v in states.items() if k != 'success')} not ({states}); run {body['state']}")
        print(f"  peak RSS: hub {sampler.peak['hub']:.0f} MB (scheduler + API), broker {sampler.peak['broker']:.0f} MB, simulator {sampler.peak['simulator']:.0f} MB")
        if firmware:
            report_rollout(api, run_id, args, root)
        return 0 if body["state"] == "success" or args.fail_rate > 0 else 1
    finally:
        if sampler is not None:
            sampler.stop()
        if sim is not None and sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(sim.pid, signal.SIGKILL)  # shards, fork servers and jobs too
                sim.wait(10)
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
        if args.keep:
            print(f"  state kept in {root}")
        else:
            subprocess.run(["rm", "-rf", str(root)], check=False)


def _size(text: str) -> int | str:
    """A rollout size as Rollout takes it: a count, or "N%"."""
    return int(text) if text.isdigit() else text


def release(root: Path, api_url: str, admin: str, kib: int) -> str:
    """Make a release key, sign a random ``kib`` KiB image as RELEASE_NAME
    RELEASE_VERSION and upload it with its manifest, with the operator CLI;
    returns the release public key."""
    env = {**os.environ, "OUTPOST_HUB_URL": api_url, "OUTPOST_TOKEN": admin}

    def outpost(*argv: str) -> str:
        done = subprocess.run([sys.executable, "-m", "hub.ctl", *argv], capture_output=True, text=True, env=env, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"outpost {' '.join(argv)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    key, image, manifest = root / "release.key", root / "bench-fw.bin", root / "bench-fw.manifest.json"
    public = outpost("release", "keygen", "--out", str(key)).split()[-1]
    image.write_bytes(os.urandom(kib * 1024))
    outpost("release", "sign", "--key", str(key), "--image", str(image), "--name", RELEASE_NAME, "--version", RELEASE_VERSION,
            "--hardware", HARDWARE, "--out", str(manifest))
    outpost("artifacts", "upload", str(image), "--manifest", str(manifest))
    return public


def report_rollout(api: httpx.Client, run_id: int, args: argparse.Namespace, root: Path) -> None:
    """The rollout's outcome from the API, and whether the devices that
    failed are the ones the simulator gave a failing health check."""
    items = api.get("/rollouts", params={"dag_id": "fleet_rollout_bench"}).json()["items"]
    rollout = next((r for r in items if run_id in (r["run_pk"], r["run_id"])), None)
    if rollout is None:
        print("  rollout: none found")
        return
    detail = api.get(f"/rollouts/{rollout['id']}").json()
    counts = ", ".join(f"{k} {v}" for k, v in detail["counts"].items() if v)
    print(f"  rollout {detail['id']}: {detail['state']} ({detail.get('reason') or 'every batch passed'})")
    print(f"    devices: {counts}; failure rate {detail['failure_rate']:.1%} (threshold {detail['failure_threshold']:.1%})")
    batches = "; ".join(f"{b['batch']}: " + ", ".join(f"{k} {v}" for k, v in b["counts"].items() if v) for b in detail["batches"])
    print(f"    batches (canary {args.canary}, then {args.batch_size} {args.growth}): {batches}")
    failed: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = api.get(f"/rollouts/{detail['id']}/devices", params={"state": "failed", "limit": 100, "offset": offset}).json()
        failed += [d["agent_id"] for d in page["items"]]
        offset = offset + len(page["items"]) if page["items"] and len(failed) < page["total"] else None
    injected = set(json.loads((root / "fleet" / "failing.json").read_text())["devices"])
    print(f"    failed devices: {len(failed)}, all with an injected failing health check: {set(failed) <= injected} ({len(injected)} injected)")


def admin_token(db_url: str) -> str:
    engine = make_engine(db_url)
    try:
        with transaction(make_sessionmaker(engine)) as session:
            now = utcnow(SystemClock())
            user = auth_users.create_user(session, "bench-admin", os.urandom(16).hex(), "admin", now)
            secret, _row = auth_tokens.create_token(session, user, "bench", now)
        return secret
    finally:
        engine.dispose()


def _ok(api: httpx.Client, path: str) -> bool:
    try:
        return api.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _online(api: httpx.Client) -> int:
    try:
        return int(api.get("/agents", params={"state": "online", "limit": 1}).json().get("total", 0))
    except (httpx.HTTPError, ValueError):
        return 0


def _enrolled(log: Path, shards: int, sim: subprocess.Popen[bytes]) -> bool:
    if sim.poll() is not None:
        raise SystemExit(f"the simulator exited with {sim.returncode}; see {log}")
    text = log.read_text(errors="replace") if log.exists() else ""
    return text.count("devices ready") >= shards


if __name__ == "__main__":
    raise SystemExit(main())
