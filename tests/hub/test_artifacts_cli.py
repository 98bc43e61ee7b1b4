"""``outpost release keygen|sign|verify`` and ``outpost artifacts
upload|list|show|delete`` against a live hub (uvicorn on a free port):
the release flow of docs/fleet.md, end to end."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.api.app import create_app
from hub.ctl import main
from hub.ctl.errors import ExitCode
from shared.release import load
from tests.hub.api_harness import Hub, LiveServer, hub, hub_settings, seeded_sqlite_template  # noqa: F401  (fixtures)


class Cli:
    """``outpost --hub URL ...`` in-process; returns (exit code, stdout, stderr)."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url, self.capsys = url, capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--hub", self.url, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def served(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Hub, str, Path]]:
    """The hub behind uvicorn, its artifact store in the test's folder; the CLI acts as admin."""
    app = create_app(hub_settings(database_url=hub.url, state_dir=tmp_path / "state"), hub.sessions, hub.events, hub.clock)
    monkeypatch.setenv("OUTPOST_TOKEN", hub.token("admin"))
    with LiveServer(app) as server:
        yield hub, server.url, tmp_path / "state" / "artifacts"


@pytest.fixture
def cli(served: tuple[Hub, str, Path], capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(served[1], capsys)


def release(cli: Cli, tmp_path: Path, size: int = 700_000) -> tuple[str, Path, Path, bytes]:
    """keygen + sign: (public key, image, manifest, image bytes)."""
    data = os.urandom(size)
    (tmp_path / "fw.bin").write_bytes(data)
    code, out, err = cli("release", "keygen", "--out", str(tmp_path / "release.key"))
    assert code == 0, err
    pub = out.strip()
    code, out, err = cli("release", "sign", "--key", str(tmp_path / "release.key"), "--image", str(tmp_path / "fw.bin"), "--name", "sensor-fw",
                         "--version", "2.1.0", "--security-version", "3", "--hardware", "rpi4", "cm4", "--notes", "fixes", "--out", str(tmp_path / "fw.manifest.json"))
    assert code == 0, err
    return pub, tmp_path / "fw.bin", tmp_path / "fw.manifest.json", data


def test_keygen_writes_a_private_key_file_and_refuses_to_overwrite_it(cli: Cli, tmp_path: Path) -> None:
    key = tmp_path / "release.key"
    code, out, _ = cli("release", "keygen", "--out", str(key))
    assert code == 0 and out.startswith("ed25519:")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = key.read_bytes()
    code, _, err = cli("release", "keygen", "--out", str(key))
    assert code == ExitCode.USAGE and "never overwritten" in err
    assert key.read_bytes() == before


def test_sign_then_verify_with_the_public_key_and_the_image(cli: Cli, tmp_path: Path) -> None:
    pub, image, manifest, data = release(cli, tmp_path)
    signed = load(manifest.read_bytes()).manifest
    assert (signed.size, signed.sha256, signed.security_version, signed.hardware, signed.notes) == (len(data), hashlib.sha256(data).hexdigest(), 3, ("rpi4", "cm4"), "fixes")
    code, out, err = cli("release", "verify", "--pubkey", pub, "--image", str(image), str(manifest))
    assert code == 0, err
    assert json.loads(out)["verified"] is True and json.loads(out)["artifact_id"] == "sensor-fw-2.1.0"
    # Another key, an altered manifest, another image: not verified, exit 1.
    other = cli("release", "keygen", "--out", str(tmp_path / "other.key"))[1].strip()
    code, out, _ = cli("release", "verify", "--pubkey", other, str(manifest))
    assert code == 1 and "NOT VERIFIED" in out and "unknown_release_key" in out
    doc = json.loads(manifest.read_text())
    doc["manifest"]["security_version"] = 9
    (tmp_path / "altered.json").write_text(json.dumps(doc))
    code, out, _ = cli("release", "verify", "--pubkey", pub, str(tmp_path / "altered.json"))
    assert code == 1 and "bad_signature" in out
    (tmp_path / "other.bin").write_bytes(b"x" * len(data))
    code, out, _ = cli("release", "verify", "--pubkey", pub, "--image", str(tmp_path / "other.bin"), str(manifest))
    assert code == 1 and "NOT VERIFIED" in out


def test_sign_refuses_a_bad_version_and_a_missing_key(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "fw.bin").write_bytes(b"firmware")
    cli("release", "keygen", "--out", str(tmp_path / "k"))
    code, _, err = cli("release", "sign", "--key", str(tmp_path / "k"), "--image", str(tmp_path / "fw.bin"), "--name", "x", "--version", "two", "--out", str(tmp_path / "m.json"))
    assert code == ExitCode.USAGE and "dotted version" in err
    code, _, err = cli("release", "sign", "--key", str(tmp_path / "nokey"), "--image", str(tmp_path / "fw.bin"), "--name", "x", "--version", "1.0", "--out", str(tmp_path / "m.json"))
    assert code == ExitCode.USAGE and "cannot read key file" in err


def test_upload_list_show_delete(cli: Cli, tmp_path: Path, served: tuple[Hub, str, Path]) -> None:
    _pub, image, manifest, data = release(cli, tmp_path)
    code, out, err = cli("artifacts", "upload", str(image), "--manifest", str(manifest))
    assert code == 0, err
    assert "state:" in out and "ready" in out
    assert (served[2] / "sensor-fw-2.1.0.img").read_bytes() == data
    code, out, err = cli("artifacts", "upload", str(image), "--manifest", str(manifest))  # again: harmless
    assert code == 0 and "already on the hub" in err
    code, out, _ = cli("artifacts", "list")
    assert "sensor-fw-2.1.0" in out and "rpi4,cm4" in out
    code, out, _ = cli("artifacts", "list", "--name", "other", "-o", "json")
    assert json.loads(out)["total"] == 0
    code, out, _ = cli("artifacts", "show", "sensor-fw-2.1.0", "-o", "json")
    assert json.loads(out)["sha256"] == hashlib.sha256(data).hexdigest()
    code, out, _ = cli("artifacts", "delete", "sensor-fw-2.1.0")
    assert code == 0
    code, _, err = cli("artifacts", "show", "sensor-fw-2.1.0")
    assert code == ExitCode.NOT_FOUND and "artifact_not_found" in err


def test_upload_refuses_an_image_that_is_not_the_manifests(cli: Cli, tmp_path: Path) -> None:
    _pub, image, manifest, data = release(cli, tmp_path)
    (tmp_path / "short.bin").write_bytes(data[:-1])
    code, _, err = cli("artifacts", "upload", str(tmp_path / "short.bin"), "--manifest", str(manifest))
    assert code == ExitCode.USAGE and "the manifest says" in err
    (tmp_path / "swapped.bin").write_bytes(bytes(reversed(data)))
    code, _, err = cli("artifacts", "upload", str(tmp_path / "swapped.bin"), "--manifest", str(manifest))
    assert code == ExitCode.API_ERROR and "artifact_mismatch" in err
    code, out, _ = cli("artifacts", "show", "sensor-fw-2.1.0")
    assert "pending" in out


def test_upload_as_a_child_process_on_a_tty_less_stderr(served: tuple[Hub, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The installed entry point, as an operator runs it (no progress line off a terminal)."""
    cli = Cli(served[1], capsys)
    _pub, image, manifest, _data = release(cli, tmp_path, size=3_000_000)
    out = subprocess.run([sys.executable, "-m", "hub.ctl", "--hub", served[1], "artifacts", "upload", str(image), "--manifest", str(manifest), "-o", "json"],
                         capture_output=True, text=True, timeout=60, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["state"] == "ready" and "uploading" not in out.stderr


def test_the_progress_line_counts_up_to_the_whole_image(capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from hub.ctl.artifacts import _progress

    data = os.urandom(600_000)
    assert b"".join(_progress(io.BytesIO(data), len(data), True)) == data
    err = capsys.readouterr().err
    assert err.startswith("\ruploading") and "100%" in err.splitlines()[-1] and err.endswith("\n")
