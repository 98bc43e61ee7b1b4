"""A real artifact server, a device root and a job context for firmware.update tests.

``ArtifactServer`` is a small threaded HTTP server serving
``/api/v1/artifacts/<id>/manifest`` and ``/image`` (with ``Range``), which
refuses any request whose ``Outpost-Signature`` does not verify with the
agent's public key, records every request, and can misbehave on purpose:
drop the connection after some bytes, send more bytes than the manifest
says, or stall until released. ``main`` is the ``python -c`` driver the
kill -9 tests run the job in.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_jobs.devroot import DeviceRoot
from firmware_jobs.ota import slots
from shared import release
from shared.clock import Clock, SystemClock
from shared.files import atomic_write
from shared.requestsig import HEADER, PURPOSE, canonical, parse_header, sign_request
from shared.signing import PublicKey, SigningKey

AGENT_ID = "dev-1"
MODEL = "sensor-v2"
OLD = b"old firmware image 1.0.0\n" * 100


@dataclass
class Seen:
    path: str
    range: str | None
    signed: bool


@dataclass
class Artifact:
    manifest: bytes
    image: bytes


class ArtifactServer:
    def __init__(self, agent_key: PublicKey, agent_id: str = AGENT_ID) -> None:
        self.agent_key = agent_key
        self.agent_id = agent_id
        self.artifacts: dict[str, Artifact] = {}
        self.seen: list[Seen] = []
        #: Image answers that end after this many bytes (one entry per answer).
        self.drops: list[int] = []
        #: Bytes sent beyond the image (a server that lies about the size).
        self.extra = b""
        #: When set: image answers stall after ``stall_after`` bytes until it is released.
        self.stall: threading.Event | None = None
        self.stall_after = 0
        self.honour_range = True
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                outer._serve(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        if self.stall is not None:
            self.stall.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _signed(self, handler: http.server.BaseHTTPRequestHandler) -> bool:
        try:
            agent, ts, nonce, sig = parse_header(handler.headers.get(HEADER, ""))
            if agent != self.agent_id:
                return False
            self.agent_key.verify(PURPOSE, canonical("GET", handler.path, ts, nonce, b""), sig)
            return True
        except Exception:
            return False

    def _serve(self, h: http.server.BaseHTTPRequestHandler) -> None:
        signed = self._signed(h)
        self.seen.append(Seen(h.path, h.headers.get("Range"), signed))
        match = re.fullmatch(r"/api/v1/artifacts/([^/]+)/(manifest|image)", h.path)
        artifact = self.artifacts.get(match.group(1)) if match else None
        if not signed:
            return self._send(h, 401, b'{"error": {"code": "bad_signature", "message": "unsigned"}}')
        if artifact is None or match is None:
            return self._send(h, 404, b'{"error": {"code": "not_found", "message": "no such artifact"}}')
        if match.group(2) == "manifest":
            return self._send(h, 200, artifact.manifest)
        body = artifact.image + self.extra
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if ranged and self.honour_range:
            start = int(ranged.group(1))
        part = body[start:]
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        h.send_header("Content-Length", str(len(part)))
        h.end_headers()
        limit = self.drops.pop(0) if self.drops else None
        if self.stall is not None:
            h.wfile.write(part[:self.stall_after])
            h.wfile.flush()
            self.stall.wait(30)
            h.close_connection = True
            return
        if limit is not None:
            h.wfile.write(part[:limit])
            h.wfile.flush()
            h.close_connection = True
            return
        h.wfile.write(part)

    def _send(self, h: http.server.BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def publish(self, signed: release.SignedManifest, image: bytes) -> None:
        self.artifacts[signed.manifest.artifact_id] = Artifact(signed.to_bytes(), image)


def make_release(key: SigningKey, version: str, image: bytes, **fields: Any) -> release.SignedManifest:
    fields.setdefault("hardware", (MODEL,))
    manifest = release.Manifest("sensor-fw", version, len(image), hashlib.sha256(image).hexdigest(), **fields)
    return release.sign(manifest, key)


def make_device(path: Path, floor: int = 0) -> DeviceRoot:
    """A device on slot a running 1.0.0 (security_version 1), committed."""
    root = DeviceRoot(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "device.json").write_text(json.dumps({"hardware_model": MODEL}))
    slot = slots.slot_dir(root, "a")
    slot.mkdir(parents=True)
    (slot / slots.IMAGE).write_bytes(OLD)
    meta = {"artifact_id": "sensor-fw-1.0.0", "name": "sensor-fw", "version": "1.0.0", "sha256": hashlib.sha256(OLD).hexdigest(),
            "size": len(OLD), "security_version": 1, "installed_at": 0.0}
    atomic_write(slot / slots.META, json.dumps(meta).encode())
    slots.save_state(root, {"active": "a", "slots": {"a": meta, "b": None}, "rollback_floor": floor, "pending": None, "last_failure": None})
    return root


def whole_version(root: DeviceRoot) -> str:
    """The version the device is wholly on; fails if the active slot is not
    a complete image matching its recorded metadata."""
    state = slots.load_state(root)
    meta = state["slots"][state["active"]]
    on_disk = slots.read_meta(root, state["active"])
    assert on_disk is not None and on_disk["sha256"] == meta["sha256"], (state, on_disk)
    assert slots.sha256_file(slots.image_path(root, state["active"])) == meta["sha256"]
    return str(meta["version"])


def add_hook(root: DeviceRoot, name: str, script: str) -> Path:
    root.hooks_dir.mkdir(parents=True, exist_ok=True)
    path = root.hooks_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


@dataclass
class Context:
    """A real ``JobContext``: signs like the agent does, records the rest."""

    assignment_id: str
    work_dir: Path
    settings: dict[str, Any]
    key: SigningKey
    clock: Clock = field(default_factory=SystemClock)
    lines: list[str] = field(default_factory=list)
    reports: list[tuple[float, str]] = field(default_factory=list)
    abort: threading.Event = field(default_factory=threading.Event)

    def progress(self, fraction: float, message: str = "") -> None:
        self.reports.append((fraction, message))

    def log(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def should_abort(self) -> bool:
        return self.abort.is_set()

    def emit_event(self, name: str, data: Any = None) -> str:
        raise RuntimeError("not used by firmware.update")

    def signed_headers(self, method: str, path: str) -> dict[str, str]:
        return {HEADER: sign_request(self.key, AGENT_ID, method, path, b"", self.clock.now())}


def main(args: list[str]) -> None:
    """Driver: ``main([config.json, result.json])`` runs the job once and
    writes its outcome; the kill -9 tests kill it in between."""
    from firmware_jobs.base import JobError
    from firmware_jobs.ota.job import FirmwareUpdate

    config = json.loads(Path(args[0]).read_text())
    ctx = Context(config["assignment_id"], Path(config["work_dir"]), config["settings"], SigningKey.load(Path(config["key"])))
    job = FirmwareUpdate()
    try:
        outcome = {"ok": job.run(ctx, job.validate(config["params"]))}
    except JobError as exc:
        outcome = {"error": exc.code, "message": str(exc), "retryable": exc.retryable}
    Path(args[1]).write_text(json.dumps(outcome))


if __name__ == "__main__":
    main(sys.argv[1:])
