"""End to end, real processes: a release is signed with an offline release
key and uploaded with the operator CLI; a DAG sends ``firmware.update`` to
real agents, which download the image from the hub's artifact store (signed
per-agent requests), verify it against the release key they trust (not the
hub's key), install it into the inactive slot, switch, health-check and
commit; the hub's registry then shows the new firmware version. A release
below the device's version is refused on the device, and one whose health
check fails rolls back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

DAG = '''
from hub.dag import DAG, AgentOperator, every_agent

for release in ("sensor-fw-2.0.0", "sensor-fw-1.5.0"):
    with DAG("install_" + release.replace("-", "_").replace(".", "_"), schedule=None):
        AgentOperator(task_id="update", job_type="firmware.update", target=every_agent(site="lab"),
                      params={"artifact_id": release, "health_timeout": 3})
'''


def _outpost(f: Any, *args: str) -> str:
    env = {**os.environ, "OUTPOST_HUB_URL": f.url, "OUTPOST_TOKEN": f.token}
    done = subprocess.run([sys.executable, "-m", "hub.ctl", *args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, f"outpost {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _release(f: Any, tmp: Path, key: Path, version: str, content: bytes) -> None:
    image = tmp / f"fw-{version}.bin"
    image.write_bytes(content)
    manifest = tmp / f"fw-{version}.manifest.json"
    _outpost(f, "release", "sign", "--key", str(key), "--image", str(image), "--name", "sensor-fw", "--version", version,
             "--security-version", "1", "--hardware", "sim-x1", "--out", str(manifest))
    _outpost(f, "artifacts", "upload", str(image), "--manifest", str(manifest))


def _device(f: Any, agent_id: str, health_ok: bool) -> Path:
    root = f.root / "agents" / agent_id / "device"
    (root / "hooks").mkdir(parents=True)
    (root / "device.json").write_text(json.dumps({"hardware_model": "sim-x1", "firmware_version": "1.0.0"}))
    hook = root / "hooks" / "health-check"
    hook.write_text("#!/bin/sh\nexit 0\n" if health_ok else "#!/bin/sh\necho 'sensor bus does not answer' >&2\nexit 1\n")
    hook.chmod(0o755)
    return root


def test_a_signed_release_reaches_real_devices_and_a_downgrade_is_refused(fleet: Any, tmp_path: Path) -> None:
    f = fleet({"firmware.py": DAG})
    f.start_hub()
    key = tmp_path / "release.key"
    public = _outpost(f, "release", "keygen", "--out", str(key)).split()[-1]
    assert public.startswith("ed25519:")
    _release(f, tmp_path, key, "2.0.0", os.urandom(300_000))
    _release(f, tmp_path, key, "1.5.0", os.urandom(200_000))
    assert {a["id"]: a["state"] for a in f.api("GET", "/artifacts")["items"]} == {"sensor-fw-2.0.0": "ready", "sensor-fw-1.5.0": "ready"}

    roots = {"dev-good": _device(f, "dev-good", True), "dev-sick": _device(f, "dev-sick", False)}
    for agent_id in roots:
        f.start_agent(agent_id, hub_url=f.url, extra={"release_public_keys": [public]}, site="lab")
    f.wait_agents_online(2)

    run = f.wait_run(f.trigger("install_sensor_fw_2_0_0"), timeout=120)
    tis = {ti["agent_id"]: ti for ti in f.api("GET", f"/runs/{run['id']}/tasks")["items"]}
    assert tis["dev-good"]["state"] == "success", tis["dev-good"]
    assert tis["dev-sick"]["state"] == "failed" and tis["dev-sick"]["error"]["code"] == "health_check_failed", tis["dev-sick"]
    # The registry learns the new version from the device's own report.
    f.wait(lambda: f.api("GET", "/agents/dev-good")["firmware_version"] == "2.0.0", 30, "dev-good reporting 2.0.0")
    # The sick device reported 2.0.0 during its trial boot; after the rollback it reports 1.0.0 again.
    f.wait(lambda: f.api("GET", "/agents/dev-sick")["firmware_version"] == "1.0.0", 30, "dev-sick reporting 1.0.0 after its rollback")
    good = json.loads((roots["dev-good"] / "ota" / "state.json").read_text())
    sick = json.loads((roots["dev-sick"] / "ota" / "state.json").read_text())
    assert good["slots"][good["active"]]["version"] == "2.0.0" and good["rollback_floor"] == 1
    assert (sick["slots"].get(sick["active"]) or {}).get("version", "1.0.0") == "1.0.0"  # rolled back to the old image

    # 1.5.0 is below 2.0.0 and its manifest does not allow a downgrade: refused
    # on the device that has 2.0.0; the sick device (still on 1.0.0) may take it,
    # and fails its health check again.
    run = f.wait_run(f.trigger("install_sensor_fw_1_5_0"), timeout=120)
    tis = {ti["agent_id"]: ti for ti in f.api("GET", f"/runs/{run['id']}/tasks")["items"]}
    assert tis["dev-good"]["error"]["code"] == "downgrade_refused", tis["dev-good"]
    assert f.api("GET", "/agents/dev-good")["firmware_version"] == "2.0.0"
    fetched = f.api("GET", "/artifacts/sensor-fw-2.0.0")
    assert fetched["downloads"] >= 2  # one signed download per device
