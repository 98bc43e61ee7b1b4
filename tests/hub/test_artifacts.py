"""The artifact store (hub/artifacts.py) and its user API: a signed manifest
goes in, then the image, streamed to disk and checked against the manifest;
wrong bytes never become ready, a conflicting manifest is refused, roles and
the audit log apply, release_public_keys refuses unknown release keys early."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from hub import audit
from hub.api.app import create_app
from hub.artifacts import ArtifactMismatch, ArtifactStore, ArtifactTooLarge, RangeNotSatisfiable, parse_range
from hub.auth.roles import Actor
from hub.db import transaction
from hub.models import TaskInstance
from hub.models_artifacts import Artifact
from shared.release import Manifest, sign
from shared.signing import SigningKey
from tests.hub.api_harness import Hub, hub, hub_settings, seeded_sqlite_template  # noqa: F401  (fixtures)
from tests.hub.conftest import pg_db_url  # noqa: F401  (fixture)

RELEASE_KEY = SigningKey.generate()
BY = Actor("user:tester", "127.0.0.1")


def image(size: int = 300_000, seed: int = 1) -> bytes:
    block = hashlib.sha256(str(seed).encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def manifest_doc(data: bytes, name: str = "sensor-fw", version: str = "2.1.0", key: SigningKey = RELEASE_KEY, **extra: Any) -> bytes:
    m = Manifest(name=name, version=version, size=len(data), sha256=hashlib.sha256(data).hexdigest(), **extra)
    return sign(m, key).to_bytes()


@pytest.fixture
def store(hub: Hub, tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(hub.sessions, tmp_path / "artifacts", hub.clock, max_bytes=1_000_000)


def put(store: ArtifactStore, artifact_id: str, data: bytes, chunk: int = 65536) -> dict[str, Any]:
    upload = store.begin_upload(artifact_id, None)
    try:
        for i in range(0, len(data), chunk):
            upload.write(data[i:i + chunk])
        return upload.finish(BY)
    finally:
        upload.abort()


def leftovers(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in (store.root / ".incoming").glob("*"))


# --- the store ------------------------------------------------------------------


def test_an_image_matching_its_manifest_becomes_ready_on_disk(store: ArtifactStore) -> None:
    data = image()
    record, created = store.register(manifest_doc(data), BY)
    assert created and record["state"] == "pending" and record["id"] == "sensor-fw-2.1.0"
    record = put(store, "sensor-fw-2.1.0", data)
    assert record["state"] == "ready" and record["ready_at"]
    assert store.path("sensor-fw-2.1.0").read_bytes() == data
    assert leftovers(store) == []


def test_wrong_bytes_of_the_right_size_are_refused_and_leave_nothing(store: ArtifactStore) -> None:
    data = image()
    store.register(manifest_doc(data), BY)
    with pytest.raises(ArtifactMismatch, match="sha256"):
        put(store, "sensor-fw-2.1.0", image(seed=2))
    assert store.get("sensor-fw-2.1.0")["state"] == "pending"
    assert not store.path("sensor-fw-2.1.0").exists() and leftovers(store) == []


def test_a_truncated_upload_is_refused(store: ArtifactStore) -> None:
    data = image()
    store.register(manifest_doc(data), BY)
    with pytest.raises(ArtifactMismatch, match="interrupted"):
        put(store, "sensor-fw-2.1.0", data[:-1])
    assert store.get("sensor-fw-2.1.0")["state"] == "pending" and leftovers(store) == []


def test_bytes_past_the_manifest_size_cut_the_upload_off(store: ArtifactStore) -> None:
    data = image()
    store.register(manifest_doc(data), BY)
    with pytest.raises(ArtifactTooLarge):
        store.begin_upload("sensor-fw-2.1.0", len(data) + 1)  # declared up front
    with pytest.raises(ArtifactTooLarge):
        put(store, "sensor-fw-2.1.0", data + b"x")
    assert leftovers(store) == [] and store.get("sensor-fw-2.1.0")["state"] == "pending"


def test_a_manifest_over_the_size_limit_is_refused(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactTooLarge, match="max_artifact_bytes"):
        store.register(manifest_doc(image(1_000_001)), BY)


def test_uploading_the_same_bytes_again_is_harmless_and_other_bytes_do_not_replace_them(store: ArtifactStore) -> None:
    data = image()
    store.register(manifest_doc(data), BY)
    first = put(store, "sensor-fw-2.1.0", data)
    again = put(store, "sensor-fw-2.1.0", data, chunk=1000)
    assert again == first
    with pytest.raises(ArtifactMismatch):
        put(store, "sensor-fw-2.1.0", image(seed=3))
    assert store.path("sensor-fw-2.1.0").read_bytes() == data


def test_the_same_manifest_again_is_accepted_another_under_the_same_id_is_a_conflict(store: ArtifactStore) -> None:
    data = image()
    store.register(manifest_doc(data), BY)
    record, created = store.register(manifest_doc(data), BY)
    assert not created and record["state"] == "pending"
    # Re-signed with a second key (rotation): accepted, the new document kept.
    other_key = SigningKey.generate()
    both = sign(Manifest(name="sensor-fw", version="2.1.0", size=len(data), sha256=hashlib.sha256(data).hexdigest()), RELEASE_KEY, other_key).to_bytes()
    store.register(both, BY)
    assert len(store.get("sensor-fw-2.1.0")["manifest"]["signatures"]) == 2
    from hub.artifacts import ArtifactConflict

    with pytest.raises(ArtifactConflict, match="another manifest"):
        store.register(manifest_doc(image(seed=9)), BY)
    with pytest.raises(ArtifactConflict):
        store.register(manifest_doc(data, security_version=4), BY)


def test_delete_is_refused_while_an_unfinished_task_names_the_artifact(store: ArtifactStore, hub: Hub) -> None:
    data = image()
    store.register(manifest_doc(data), BY)
    put(store, "sensor-fw-2.1.0", data)
    assert hub.seeded is not None
    with transaction(hub.sessions) as s:
        ti = s.scalars(select(TaskInstance).where(TaskInstance.state == "running")).first()
        assert ti is not None
        ti.params = {"artifact_id": "sensor-fw-2.1.0"}
        ti_id = ti.id
    from hub.artifacts import ArtifactInUse

    with pytest.raises(ArtifactInUse, match=str(ti_id)):
        store.delete("sensor-fw-2.1.0", BY)
    with transaction(hub.sessions) as s:
        s.get(TaskInstance, ti_id).state = "success"  # type: ignore[union-attr]
    store.delete("sensor-fw-2.1.0", BY)
    assert not store.path("sensor-fw-2.1.0").exists()
    with hub.sessions() as s:
        assert s.get(Artifact, "sensor-fw-2.1.0") is None
        assert [r.action for r in audit.recent(s, action="artifact.*")] == ["artifact.delete", "artifact.upload", "artifact.create"]


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-", (0, 99)), ("bytes=10-", (10, 99)), ("bytes=10-19", (10, 19)), ("bytes=90-500", (90, 99)),
    ("bytes=-10", (90, 99)), ("bytes=-500", (0, 99)), ("bytes=1-2,5-6", None), ("items=0-1", None), ("bytes=x-", None), ("bytes=5-1", None),
])
def test_range_headers(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-200", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


# --- the user API ---------------------------------------------------------------


@pytest.fixture
def api(hub: Hub, tmp_path: Path) -> Iterator[Any]:
    """A client factory over an app whose store lives in the test's folder."""

    def client(role: str | None = "admin", **settings: Any) -> TestClient:
        app = create_app(hub_settings(database_url=hub.url, state_dir=tmp_path / "state", **settings), hub.sessions, hub.events, hub.clock)
        headers = {"Authorization": f"Bearer {hub.token(role)}"} if role else {}
        return TestClient(app, headers=headers)

    yield client


def test_operator_uploads_viewer_reads_admin_deletes_and_it_is_audited(api: Any, hub: Hub, tmp_path: Path) -> None:
    data = image()
    operator, viewer = api("operator"), api("viewer")
    assert viewer.post("/api/v1/artifacts", content=manifest_doc(data)).status_code == 403
    answer = operator.post("/api/v1/artifacts", content=manifest_doc(data))
    assert answer.status_code == 201, answer.text
    assert operator.post("/api/v1/artifacts", content=manifest_doc(data)).status_code == 200
    answer = operator.put("/api/v1/artifacts/sensor-fw-2.1.0/image", content=data, headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["state"] == "ready"
    assert (tmp_path / "state" / "artifacts" / "sensor-fw-2.1.0.img").read_bytes() == data
    listed = viewer.get("/api/v1/artifacts", params={"name": "sensor-fw"}).json()
    assert listed["total"] == 1 and listed["items"][0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert viewer.get("/api/v1/artifacts", params={"name": "other"}).json()["total"] == 0
    shown = viewer.get("/api/v1/artifacts/sensor-fw-2.1.0").json()
    assert shown["manifest"]["manifest"]["version"] == "2.1.0" and shown["fetches"] == []
    assert operator.delete("/api/v1/artifacts/sensor-fw-2.1.0").status_code == 403
    assert api("admin").delete("/api/v1/artifacts/sensor-fw-2.1.0").status_code == 204
    assert viewer.get("/api/v1/artifacts/sensor-fw-2.1.0").json()["error"]["code"] == "artifact_not_found"
    with hub.sessions() as s:
        records = [(r.actor, r.action) for r in audit.recent(s, action="artifact.*")]
    assert records == [("user:test-admin", "artifact.delete"), ("user:test-operator", "artifact.upload"), ("user:test-operator", "artifact.create")]
    assert api(None).get("/api/v1/artifacts").status_code == 401


@pytest.mark.parametrize(("body", "fragment"), [
    (b"{not json", "not JSON"), (b"[]", "exactly 'manifest' and 'signatures'"), (json.dumps({"manifest": {}, "signatures": []}).encode(), "at least one signature"),
    (b"x" * 70_000, "at most"),
])
def test_bad_manifests_get_a_clear_error(api: Any, body: bytes, fragment: str) -> None:
    answer = api("operator").post("/api/v1/artifacts", content=body)
    assert answer.status_code == 422 and fragment in answer.json()["error"]["message"]
    assert answer.json()["error"]["code"] == "bad_manifest"


def test_with_release_public_keys_set_only_their_manifests_are_accepted(api: Any) -> None:
    data = image()
    client = api("operator", release_public_keys=[RELEASE_KEY.public.to_text()])
    answer = client.post("/api/v1/artifacts", content=manifest_doc(data, key=SigningKey.generate()))
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "unknown_release_key"
    # A trusted key's signature over altered fields does not verify.
    doc = json.loads(manifest_doc(data))
    doc["manifest"]["security_version"] = 7
    answer = client.post("/api/v1/artifacts", content=json.dumps(doc).encode())
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "bad_signature"
    assert client.post("/api/v1/artifacts", content=manifest_doc(data)).status_code == 201


def test_upload_errors_over_the_api(api: Any) -> None:
    data = image()
    client = api("operator")
    assert client.put("/api/v1/artifacts/nope-1.0/image", content=b"x").json()["error"]["code"] == "artifact_not_found"
    client.post("/api/v1/artifacts", content=manifest_doc(data))
    over = client.put("/api/v1/artifacts/sensor-fw-2.1.0/image", content=data + b"!")
    assert over.status_code == 413 and over.json()["error"]["code"] == "artifact_too_large"
    # No Content-Length (chunked): cut off while streaming.
    over = client.put("/api/v1/artifacts/sensor-fw-2.1.0/image", content=iter([data, b"more"]))
    assert over.status_code == 413
    short = client.put("/api/v1/artifacts/sensor-fw-2.1.0/image", content=data[:1000])
    assert short.status_code == 422 and short.json()["error"]["code"] == "artifact_mismatch"
    assert client.get("/api/v1/artifacts/sensor-fw-2.1.0").json()["state"] == "pending"
    big = api("operator", max_artifact_bytes=1000).post("/api/v1/artifacts", content=manifest_doc(image(2000), version="3.0"))
    assert big.status_code == 413


@pytest.mark.postgres
def test_the_store_on_postgresql(pg_db_url: str, tmp_path: Path) -> None:
    """The in-use text match over JSON parameters and the fetch counters on PostgreSQL."""
    from hub.db import make_engine, make_sessionmaker, upgrade
    from shared.clock import ManualClock, to_datetime

    upgrade(pg_db_url)
    engine = make_engine(pg_db_url)
    try:
        sessions = make_sessionmaker(engine)
        clock = ManualClock(1_767_225_600.0)
        pg_store = ArtifactStore(sessions, tmp_path / "artifacts", clock, max_bytes=1_000_000)
        data = image()
        pg_store.register(manifest_doc(data), BY)
        put(pg_store, "sensor-fw-2.1.0", data)
        pg_store.record_fetch("sensor-fw-2.1.0", "dev-1", False)
        pg_store.record_fetch("sensor-fw-2.1.0", "dev-1", True)
        detail = pg_store.get("sensor-fw-2.1.0")
        assert (detail["downloads"], detail["fetched_by"], detail["fetches"][0]["requests"], detail["fetches"][0]["completed"]) == (2, 1, 2, True)
        from hub.models import Dag, DagRun

        t0 = to_datetime(clock.now())
        with transaction(sessions) as s:
            s.add(Dag(dag_id="ota", fileloc="/dags/ota.py", structure={}))
            s.flush()
            run = DagRun(dag_id="ota", run_id="manual__1", run_type="manual", state="running", logical_date=t0, conf={}, created_at=t0)
            s.add(run)
            s.flush()
            s.add(TaskInstance(run_pk=run.id, dag_id="ota", run_id="manual__1", task_id="update", kind="agent", state="queued",
                               params={"url": "/api/v1/artifacts/sensor-fw-2.1.0/image"}))
        from hub.artifacts import ArtifactInUse

        with pytest.raises(ArtifactInUse):
            pg_store.delete("sensor-fw-2.1.0", BY)
        with transaction(sessions) as s:
            for ti in s.scalars(select(TaskInstance)):
                ti.state = "removed"
        pg_store.delete("sensor-fw-2.1.0", BY)
        assert pg_store.list()["total"] == 0
    finally:
        engine.dispose()
