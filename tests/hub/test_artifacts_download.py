"""Agents fetch artifacts over real HTTP (uvicorn): every request signed with
the device key (Outpost-Signature), as the device's OTA job signs it; ranges
for resuming; unknown, unsigned, replayed and revoked agents refused; only
ready artifacts served; each fetch counted per agent."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hub.api.app import create_app
from hub.artifacts import ArtifactStore
from hub.auth.roles import Actor
from hub.db import transaction
from hub.identity import register_agent, revoke_agent
from shared.clock import utcnow
from shared.release import Manifest, load, sign
from shared.requestsig import HEADER, sign_request
from shared.signing import SigningKey
from tests.hub.api_harness import Hub, LiveServer, hub, hub_settings, seeded_sqlite_template  # noqa: F401  (fixtures)

DEVICE_KEY = SigningKey.generate()
RELEASE_KEY = SigningKey.generate()
DATA = bytes(range(256)) * 4000 + b"tail"  # 1,024,004 bytes: several read chunks
SHA = hashlib.sha256(DATA).hexdigest()
BY = Actor("user:tester")


class Served:
    def __init__(self, hub: Hub, url: str, store: ArtifactStore) -> None:
        self.hub, self.url, self.store = hub, url, store

    def get(self, path: str, agent: str = "dev-1", key: SigningKey = DEVICE_KEY, headers: dict[str, str] | None = None, signature: str | None = None) -> httpx.Response:
        full = f"/api/v1/artifacts/{path}"
        sig = signature if signature is not None else sign_request(key, agent, "GET", full, b"", self.hub.clock.now())
        return httpx.get(self.url + full, headers={**({HEADER: sig} if sig else {}), **(headers or {})}, timeout=30)


@pytest.fixture
def served(hub: Hub, tmp_path: Path) -> Iterator[Served]:
    """A hub serving sensor-fw-2.1.0 (ready) and sensor-fw-2.2.0 (pending); dev-1 registered."""
    app = create_app(hub_settings(database_url=hub.url, state_dir=tmp_path / "state"), hub.sessions, hub.events, hub.clock)
    store = ArtifactStore.from_settings(app.state.settings, hub.sessions, hub.clock)
    m = Manifest(name="sensor-fw", version="2.1.0", size=len(DATA), sha256=SHA)
    store.register(sign(m, RELEASE_KEY).to_bytes(), BY)
    upload = store.begin_upload("sensor-fw-2.1.0", len(DATA))
    upload.write(DATA)
    upload.finish(BY)
    store.register(sign(Manifest(name="sensor-fw", version="2.2.0", size=10, sha256="0" * 64), RELEASE_KEY).to_bytes(), BY)
    with transaction(hub.sessions) as s:
        register_agent(s, "dev-1", DEVICE_KEY.public, utcnow(hub.clock))
        register_agent(s, "dev-2", SigningKey.generate().public, utcnow(hub.clock))
    with LiveServer(app) as server:
        yield Served(hub, server.url, store)


def test_the_manifest_is_served_as_uploaded_and_verifies_with_the_release_key(served: Served) -> None:
    answer = served.get("sensor-fw-2.1.0/manifest")
    assert answer.status_code == 200, answer.text
    signed = load(answer.content)
    assert signed.verify([RELEASE_KEY.public]).kid == RELEASE_KEY.kid
    assert signed.manifest.sha256 == SHA


def test_the_whole_image_then_a_resumed_tail_then_a_middle_range(served: Served) -> None:
    whole = served.get("sensor-fw-2.1.0/image")
    assert whole.status_code == 200 and whole.content == DATA
    assert whole.headers["content-length"] == str(len(DATA)) and whole.headers["etag"] == f'"{SHA}"' and whole.headers["accept-ranges"] == "bytes"
    # A download that stopped at 700,001 bytes resumes from there.
    tail = served.get("sensor-fw-2.1.0/image", headers={"Range": "bytes=700001-"})
    assert tail.status_code == 206
    assert tail.headers["content-range"] == f"bytes 700001-{len(DATA) - 1}/{len(DATA)}"
    assert DATA[:700001] + tail.content == DATA
    middle = served.get("sensor-fw-2.1.0/image", headers={"Range": "bytes=10-19"})
    assert middle.status_code == 206 and middle.content == DATA[10:20] and middle.headers["content-length"] == "10"
    # If-Range with the right ETag honours the range; with another, the whole image.
    assert served.get("sensor-fw-2.1.0/image", headers={"Range": "bytes=5-", "If-Range": f'"{SHA}"'}).status_code == 206
    stale = served.get("sensor-fw-2.1.0/image", headers={"Range": "bytes=5-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == DATA
    detail = served.store.get("sensor-fw-2.1.0")
    assert detail["downloads"] == 5 and detail["fetched_by"] == 1
    assert detail["fetches"][0]["agent_id"] == "dev-1" and detail["fetches"][0]["requests"] == 5 and detail["fetches"][0]["completed"]


def test_a_range_past_the_end_is_416_with_the_size(served: Served) -> None:
    answer = served.get("sensor-fw-2.1.0/image", headers={"Range": f"bytes={len(DATA)}-"})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == f"bytes */{len(DATA)}"
    assert answer.json()["error"]["code"] == "range_not_satisfiable"


def test_a_pending_artifact_is_not_served(served: Served) -> None:
    for what in ("manifest", "image"):
        answer = served.get(f"sensor-fw-2.2.0/{what}")
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "artifact_not_ready"
    assert served.get("nope-1.0/image").json()["error"]["code"] == "artifact_not_found"


@pytest.mark.parametrize(("kwargs", "status", "code"), [
    ({"signature": ""}, 401, "signature_missing"),
    ({"signature": "garbage"}, 401, "malformed_signature"),
    ({"agent": "ghost", "key": SigningKey.generate()}, 401, "unknown_agent"),
    ({"agent": "dev-2"}, 401, "bad_signature"),  # dev-1's key claiming to be dev-2
])
def test_unsigned_unknown_and_forged_requests_are_refused(served: Served, kwargs: dict[str, Any], status: int, code: str) -> None:
    for what in ("manifest", "image"):
        answer = served.get(f"sensor-fw-2.1.0/{what}", **kwargs)
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code)
    assert served.store.get("sensor-fw-2.1.0")["downloads"] == 0


def test_a_user_token_is_not_an_agent_signature(served: Served) -> None:
    token = served.hub.token("admin")
    answer = httpx.get(f"{served.url}/api/v1/artifacts/sensor-fw-2.1.0/image", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 401


def test_a_replayed_request_and_a_stale_one_are_refused(served: Served) -> None:
    path = "/api/v1/artifacts/sensor-fw-2.1.0/manifest"
    header = sign_request(DEVICE_KEY, "dev-1", "GET", path, b"", served.hub.clock.now())
    assert served.get("sensor-fw-2.1.0/manifest", signature=header).status_code == 200
    again = served.get("sensor-fw-2.1.0/manifest", signature=header)
    assert again.status_code == 401 and again.json()["error"]["code"] == "replayed_request"
    old = sign_request(DEVICE_KEY, "dev-1", "GET", path, b"", served.hub.clock.now() - 3600)
    assert served.get("sensor-fw-2.1.0/manifest", signature=old).json()["error"]["code"] == "stale_request"
    # Signed for the manifest, sent for the image: the path is covered.
    other = sign_request(DEVICE_KEY, "dev-1", "GET", path, b"", served.hub.clock.now())
    assert served.get("sensor-fw-2.1.0/image", signature=other).json()["error"]["code"] == "bad_signature"


def test_a_revoked_agent_is_refused(served: Served) -> None:
    assert served.get("sensor-fw-2.1.0/manifest").status_code == 200
    with transaction(served.hub.sessions) as s:
        revoke_agent(s, "dev-1", utcnow(served.hub.clock))
    for what in ("manifest", "image"):
        answer = served.get(f"sensor-fw-2.1.0/{what}")
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "agent_revoked"


def test_an_oversize_upload_over_real_http_is_cut_off_with_413(served: Served) -> None:
    """Bytes past the manifest's size, sent chunked (no Content-Length to refuse up front)."""
    token = served.hub.token("operator")

    def body() -> Iterator[bytes]:
        yield b"\0" * 8
        yield b"\0" * 8  # the pending manifest announces 10 bytes

    answer = httpx.put(f"{served.url}/api/v1/artifacts/sensor-fw-2.2.0/image", content=body(), headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "artifact_too_large"
    assert served.store.get("sensor-fw-2.2.0")["state"] == "pending"
    assert list((served.store.root / ".incoming").glob("*")) == []
