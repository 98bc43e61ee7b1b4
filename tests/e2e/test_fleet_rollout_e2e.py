"""A firmware rollout at fleet scale, end to end: 200 simulated devices
(the real agent code in two ``outpost-agent simulate`` processes, each
device enrolled over HTTPS) trust an offline release key; one signed
release is uploaded to a real hub, and a DAG rolls ``firmware.update`` out
with a canary of 20 and batches of 20 %. The seed gives 10 devices (5 %) a
failing health check, two of them in the first batch after the canary: the
rollout must abort in that batch (threshold 3 %), notify nobody after it,
fail the run, and the API must tell which devices updated, which rolled
back and which were never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from agent import fleetsim
from tests.broker.pki import Pki
from tests.e2e.conftest import Fleet
from tests.tlsfront import TlsFront

if TYPE_CHECKING:  # the fixture's type; several conftest modules exist, so never import it at run time
    from tests.conftest import Broker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DEVICES, CANARY, BATCH = 200, 20, 40  # batch_size "20%" of 200
FAIL_RATE, FAIL_SEED, THRESHOLD = 0.05, 11, 0.03
DAG = f"""
from hub.dag import DAG, AgentOperator, Rollout, every_agent
with DAG("fw_fleet", schedule=None):
    AgentOperator(task_id="update", job_type="firmware.update", target=every_agent(fleet="sim"),
                  params={{"artifact_id": "sim-fw-2.0.0", "health_timeout": 2}}, execution_timeout=120,
                  rollout=Rollout(canary={CANARY}, batch_size="20%", failure_threshold={THRESHOLD}))
"""


def _outpost(hub: Fleet, *args: str) -> str:
    env = {**os.environ, "OUTPOST_HUB_URL": hub.url, "OUTPOST_TOKEN": hub.token}
    done = subprocess.run([sys.executable, "-m", "hub.ctl", *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"outpost {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def test_a_firmware_rollout_to_200_devices_aborts_in_the_batch_that_crosses_the_failure_threshold(tmp_path: Path, mosquitto: Broker) -> None:
    ids = fleetsim.device_ids("sim", DEVICES)
    failing = fleetsim.failing_devices(ids, FAIL_RATE, FAIL_SEED)
    # The seed's pick, in rollout order (by id): none in the canary, two in batch 1.
    in_batch = Counter(0 if ids.index(d) < CANARY else 1 + (ids.index(d) - CANARY) // BATCH for d in failing)
    print(f"failing devices: {failing}; per batch: {dict(in_batch)}")
    assert len(failing) == 10 and in_batch[0] == 0 and in_batch[1] == 2

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "fw.py").write_text(DAG)
    hub = Fleet(tmp_path, mosquitto, dags)
    pki = Pki(tmp_path / "pki")
    proc = None
    try:
        hub.start_hub()
        key = tmp_path / "release.key"
        public = _outpost(hub, "release", "keygen", "--out", str(key)).split()[-1]
        image, manifest = tmp_path / "fw.bin", tmp_path / "fw.manifest.json"
        image.write_bytes(os.urandom(256 * 1024))
        _outpost(hub, "release", "sign", "--key", str(key), "--image", str(image), "--name", "sim-fw", "--version", "2.0.0",
                 "--hardware", "sim-v2", "--out", str(manifest))
        _outpost(hub, "artifacts", "upload", str(image), "--manifest", str(manifest))
        token = hub.api("POST", "/enrolment-tokens", json={"uses": DEVICES, "expires": "1h"})["token"]
        log = open(tmp_path / "simulate.log", "ab")
        with log, TlsFront(hub.api_port, pki.server_cert, pki.server_key) as front:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "simulate", "--root", str(tmp_path / "fleet"), "--count", str(DEVICES),
                 "--hub", front.url, "--ca-file", str(pki.ca), "--enrolment-token", token, "--broker", f"127.0.0.1:{mosquitto.port}",
                 "--label", "fleet=sim", "--hardware", "sim-v2", "--firmware", "1.0.0", "--release-key", public,
                 "--fail-rate", str(FAIL_RATE), "--fail-seed", str(FAIL_SEED), "--processes", "2", "--wave", "50",
                 "--heartbeat-interval", "3", "--duration", "280"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            hub.wait(lambda: hub.api("GET", "/agents", params={"state": "online", "limit": 1})["total"] == DEVICES, 90, "200 devices online")
            run = hub.wait_run(hub.trigger("fw_fleet"), timeout=120)
            assert run["state"] == "failed", run

            rollouts = hub.api("GET", "/rollouts", params={"dag_id": "fw_fleet"})["items"]
            assert len(rollouts) == 1
            rollout = hub.api("GET", f"/rollouts/{rollouts[0]['id']}")
            devices = hub.api("GET", f"/rollouts/{rollout['id']}/devices", params={"limit": 1000})["items"]
            assert len(devices) == DEVICES and sorted(d["agent_id"] for d in devices) == ids
            assert rollout["state"] == "aborted" and "exceeds the threshold" in rollout["reason"], rollout

            # When the failure rate first crossed the threshold (devices finishing
            # in one scheduler pass share a stamp), and the batch open then.
            finished = sorted((d for d in devices if d["state"] in ("succeeded", "failed")), key=lambda d: _at(d["finished_at"]))
            crossed_at, done = None, Counter[str]()
            for stamp in sorted({_at(d["finished_at"]) for d in finished}):
                done.update(d["state"] for d in finished if _at(d["finished_at"]) == stamp)
                if done["failed"] / (done["failed"] + done["succeeded"]) > THRESHOLD:
                    crossed_at = stamp
                    break
            assert crossed_at is not None
            notified = [d for d in devices if d["notified_at"] is not None]
            crossing_batch = max(d["batch"] for d in notified if _at(d["notified_at"]) <= crossed_at)
            # Nobody was notified after the crossing, nor in a later batch.
            assert [d["agent_id"] for d in notified if _at(d["notified_at"]) > crossed_at] == []
            per_batch = Counter(d["batch"] for d in notified)
            print(f"crossed the threshold at {crossed_at} in batch {crossing_batch}; notified per batch: {dict(sorted(per_batch.items()))}")
            assert max(per_batch) == crossing_batch == 1
            assert per_batch == {0: CANARY, 1: BATCH}

            by_state: dict[str, list[dict[str, Any]]] = {}
            for d in devices:
                by_state.setdefault(d["state"], []).append(d)
            updated = sorted(d["agent_id"] for d in by_state["succeeded"])
            rolled_back = sorted(d["agent_id"] for d in by_state["failed"])
            untouched = sorted(d["agent_id"] for d in by_state["skipped"])
            assert set(by_state) == {"succeeded", "failed", "skipped"}
            assert rolled_back == [d for d in failing if ids.index(d) < CANARY + BATCH]
            assert updated == sorted(set(ids[:CANARY + BATCH]) - set(rolled_back))
            assert untouched == ids[CANARY + BATCH:]
            assert all(d["error"] == "health_check_failed" for d in by_state["failed"]), by_state["failed"]
            assert all(d["error"] == "rollout_aborted" and d["ti_state"] == "skipped" and d["batch"] is None for d in by_state["skipped"])
            assert rollout["counts"] == {"pending": 0, "notified": 0, "succeeded": len(updated), "failed": 2, "timed_out": 0, "skipped": len(untouched)}

            # The registry, from the devices' own reports: 2.0.0 where the
            # update committed, 1.0.0 after a rollback and where it never came.
            want = {**{i: "1.0.0" for i in ids}, **{i: "2.0.0" for i in updated}}

            def versions() -> dict[str, str]:
                return {a["agent_id"]: a["firmware_version"] for a in hub.api("GET", "/agents", params={"limit": 1000})["items"]}

            hub.wait(lambda: versions() == want, 30, "the registry to show 2.0.0 on the updated devices and 1.0.0 elsewhere")
            assert hub.api("GET", "/artifacts/sim-fw-2.0.0")["downloads"] >= CANARY + BATCH

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            proc = None
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        hub.stop()
