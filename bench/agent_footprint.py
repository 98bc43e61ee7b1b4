"""Agent footprint benchmark: what one ``python -m agent run`` process costs
a device, idle and while it works.

A private Mosquitto (the standalone one) and this script, playing the hub
with a plain paho client, talk to one real agent process with its default
settings (heartbeat every 10 s, keepalive 30 s, queues with synchronous
FULL) apart from its state folder, broker port and command allow-list.

Prints:
* idle: RSS (MB) after start-up, then CPU over an idle window (``--idle``
  seconds, connected, heartbeating), as % of one core and as CPU-seconds
  per hour (extrapolated from the window);
* busy: ``--busy`` seconds with two jobs always running
  (``diagnostics.collect`` and ``command.run`` of ``sleep 0.3``, each
  result acknowledged as the hub would): jobs per second, peak RSS of the
  agent process, peak PSS of its process tree (the agent plus the programs
  ``command.run`` starts; PSS so a child's pages shared with the agent
  after fork are not counted twice), sampled every 20 ms, and CPU.

Usage: python bench/agent_footprint.py [--idle 30] [--busy 15]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hub.standalone import PrivateBroker  # noqa: E402
from shared.clock import SystemClock  # noqa: E402
from shared.envelope import Envelope, decode  # noqa: E402
from shared.frames import HUB_TO_AGENT, sign_envelope, unsigned_part  # noqa: E402
from shared.signing import SigningKey  # noqa: E402
from shared.hlc import HybridClock  # noqa: E402
from shared.messages import Ack, Assign, Result  # noqa: E402
from shared.topics import ack_topic, assign_topic, events_topic, status_topic  # noqa: E402

AGENT_ID = "bench-1"
#: The bench hub's signing key; the agent trusts it (hub_public_keys).
HUB_KEY = SigningKey.generate()
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (its reaped children not included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def vmhwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tree(pid: int) -> list[int]:
    """The process and all its descendants (by /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def pss_mb(pid: int) -> float:
    """Proportional set size: shared pages split between their sharers, so a
    forked child's copy-on-write pages are not counted twice as with RSS."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tree_pss_mb(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            total += pss_mb(p)
        except OSError:
            pass  # exited meanwhile
    return total


class Hub:
    """The hub's side of one agent's topics: assigns, collects results, acks them."""

    def __init__(self, port: int) -> None:
        self.hlc = HybridClock("hub", lambda: int(SystemClock().now() * 1000))
        self.results: dict[str, Result] = {}
        self.online = threading.Event()
        self.cond = threading.Condition()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-hub-{uuid.uuid4().hex[:6]}", protocol=paho.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(events_topic(AGENT_ID), 1), (status_topic(AGENT_ID), 1)])
        if not subscribed.wait(10):
            raise RuntimeError("could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        envelope = decode(unsigned_part(msg.payload))
        body = envelope.body
        if msg.topic.endswith("/status"):
            if getattr(body, "state", "") == "online":
                self.online.set()
            return
        if isinstance(body, Result):
            self._send(ack_topic(AGENT_ID), Ack((body.assignment_id,)))
            with self.cond:
                self.results[body.assignment_id] = body
                self.cond.notify_all()

    def _send(self, topic: str, body: Any) -> None:
        self.seq = getattr(self, "seq", 0) + 1
        envelope = Envelope(body, sender="hub", hlc=self.hlc.now(), recipient=AGENT_ID, seq=self.seq, issued_at=time.time())
        self.client.publish(topic, sign_envelope(envelope, HUB_KEY, HUB_TO_AGENT), qos=1)

    def assign(self, job_type: str, params: dict[str, Any]) -> str:
        aid = uuid.uuid4().hex
        self._send(assign_topic(AGENT_ID), Assign(aid, "bench", "run-1", "task", 1, job_type, params, timeout=60))
        return aid

    def wait(self, aid: str, timeout: float = 30) -> Result:
        end = time.monotonic() + timeout
        with self.cond:
            while aid not in self.results:
                if not self.cond.wait(max(0.0, end - time.monotonic())):
                    raise RuntimeError(f"no result for {aid} in {timeout}s")
            return self.results[aid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of the idle window")
    parser.add_argument("--busy", type=float, default=15.0, help="seconds of the busy window")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="outpost-footprint-") as tmp:
        root = Path(tmp)
        broker = PrivateBroker(root / "broker")
        broker.start()
        state = root / "agent"
        state.mkdir()
        config = state / "agent.toml"
        config.write_text(f'agent_id = "{AGENT_ID}"\nstate_dir = "{state}"\nbroker_port = {broker.port}\ncommand_allowlist = ["sleep"]\nhub_public_keys = ["{HUB_KEY.public.to_text()}"]\n')
        hub = Hub(broker.port)
        env = {k: v for k, v in os.environ.items() if not k.startswith("OUTPOST_AGENT_")}
        log = open(state / "agent.log", "wb")  # noqa: SIM115 - closed below
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            if not hub.online.wait(30):
                raise RuntimeError(f"the agent did not come online; see {state / 'agent.log'}")
            print(f"agent online {time.monotonic() - started:.2f}s after exec")
            time.sleep(5.0)  # let start-up work (imports, first heartbeat) settle
            rss0 = rss_mb(proc.pid)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.idle)
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            idle_cpu = cpu1 - cpu0
            print(f"idle:  RSS {rss0:.1f} MB (after {args.idle:.0f}s: {rss_mb(proc.pid):.1f} MB); "
                  f"CPU {idle_cpu:.2f} s in {t1 - t0:.0f} s = {100 * idle_cpu / (t1 - t0):.3f}% of a core, "
                  f"{idle_cpu / (t1 - t0) * 3600:.1f} CPU-s per hour")

            peak_tree = peak_agent = 0.0
            stop = threading.Event()

            def sample() -> None:
                nonlocal peak_tree, peak_agent
                while not stop.wait(0.02):
                    try:
                        peak_agent = max(peak_agent, rss_mb(proc.pid))
                        peak_tree = max(peak_tree, tree_pss_mb(proc.pid))
                    except OSError:
                        return

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            done = 0
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            while time.monotonic() - t0 < args.busy:
                pair = [hub.assign("diagnostics.collect", {}), hub.assign("command.run", {"argv": ["sleep", "0.3"]})]
                for aid in pair:
                    result = hub.wait(aid)
                    if result.status != "success":
                        raise RuntimeError(f"job failed: {result}")
                    done += 1
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            stop.set()
            sampler.join()
            print(f"busy:  {done} jobs in {t1 - t0:.1f}s ({done / (t1 - t0):.1f}/s, 2 at a time); "
                  f"peak RSS agent {peak_agent:.1f} MB, peak PSS agent + children {peak_tree:.1f} MB, VmHWM {vmhwm_mb(proc.pid):.1f} MB; "
                  f"CPU {100 * (cpu1 - cpu0) / (t1 - t0):.1f}% of a core")
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            hub.close()
            broker.stop()


if __name__ == "__main__":
    main()
