"""The artifact store: firmware images with their signed release manifests.

A release goes in in two steps: the signed manifest (``register``), which
says what the image must be (size, SHA-256), then the image bytes
(``Upload``), streamed to a temporary file while they are hashed and never
held in memory. Only an image whose size and SHA-256 match the manifest is
renamed into place and marked ``ready``; bytes past the manifest's size cut
the upload off (413). Agents are served ``ready`` artifacts only.

The hub never holds a release key. When ``release_public_keys`` is set it
refuses manifests none of them signed, early; the device's own check of the
manifest is the real gate (docs/fleet.md).

Files: ``<artifacts_path>/<artifact_id>.img``, temporaries in
``<artifacts_path>/.incoming`` (a hub killed mid-upload leaves a ``.part``
there; the next upload of any artifact removes those older than a day).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import String, cast, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from hub import audit
from hub.auth.roles import Actor
from hub.config import HubSettings
from hub.db import transaction
from hub.errors import Conflict, HubError, InvalidRequest, NotFound
from hub.models import TaskInstance
from hub.models_artifacts import Artifact, ArtifactFetch
from shared.clock import Clock, utcnow
from shared.release import MAX_DOCUMENT_BYTES, ManifestError, SignedManifest, load
from shared.signing import PublicKey, SignatureError
from shared.states import UNFINISHED

log = logging.getLogger(__name__)

#: Longest artifact id (the table's key); ``<name>-<version>``.
MAX_ID = 200
_STALE_PART = timedelta(days=1)


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"


class ArtifactNotReady(Conflict):
    """The manifest is registered but its image has not arrived whole."""

    code = "artifact_not_ready"


class ArtifactConflict(Conflict):
    code = "artifact_conflict"


class ArtifactInUse(Conflict):
    code = "artifact_in_use"


class ArtifactTooLarge(HubError):
    status = 413
    code = "artifact_too_large"


class ArtifactMismatch(InvalidRequest):
    """The uploaded bytes are not the image the manifest describes."""

    code = "artifact_mismatch"


class BadManifest(InvalidRequest):
    code = "bad_manifest"


class UntrustedManifest(InvalidRequest):
    """No release key in ``release_public_keys`` signed the manifest (``code`` says why)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ArtifactUnavailable(HubError):
    """A ready artifact's file is gone from disk (removed behind the hub's back)."""

    status = 503
    code = "artifact_unavailable"


def summary(row: Artifact) -> dict[str, Any]:
    return {
        "id": row.id, "name": row.name, "version": row.version, "security_version": row.security_version, "hardware": list(row.hardware),
        "size": row.size, "sha256": row.sha256, "state": row.state, "created_at": row.created_at.isoformat(), "created_by": row.created_by,
        "ready_at": row.ready_at.isoformat() if row.ready_at else None, "downloads": row.downloads,
        "last_download_at": row.last_download_at.isoformat() if row.last_download_at else None,
    }


class ArtifactStore:
    """The store over one database and one folder."""

    def __init__(self, sessions: sessionmaker[Session], root: Path, clock: Clock, *, max_bytes: int, trusted: tuple[PublicKey, ...] = ()) -> None:
        self.sessions = sessions
        self.root = root
        self.clock = clock
        self.max_bytes = max_bytes
        self.trusted = trusted

    @classmethod
    def from_settings(cls, settings: HubSettings, sessions: sessionmaker[Session], clock: Clock) -> ArtifactStore:
        keys = tuple(PublicKey.from_text(text) for text in settings.release_public_keys)
        return cls(sessions, settings.artifacts_path, clock, max_bytes=settings.max_artifact_bytes, trusted=keys)

    def path(self, artifact_id: str) -> Path:
        return self.root / f"{artifact_id}.img"

    # --- manifests -------------------------------------------------------

    def register(self, raw: bytes, by: Actor, *, _again: bool = False) -> tuple[dict[str, Any], bool]:
        """Record a signed manifest; returns (the artifact, whether it is new).

        The same manifest again is accepted (its signatures are replaced: a
        release re-signed during a key rotation); another manifest under the
        same id is refused with 409."""
        signed = self._parse(raw)
        manifest = signed.manifest
        if manifest.size > self.max_bytes:
            raise ArtifactTooLarge(f"the manifest announces {manifest.size} bytes, over max_artifact_bytes ({self.max_bytes})")
        if len(manifest.artifact_id) > MAX_ID:
            raise BadManifest(f"artifact id {manifest.artifact_id[:60]!r}... is longer than {MAX_ID} characters")
        document = signed.to_bytes().decode()
        now = utcnow(self.clock)
        try:
            with transaction(self.sessions) as session:
                row = session.get(Artifact, manifest.artifact_id)
                if row is not None:
                    if load(row.document).manifest != manifest:
                        raise ArtifactConflict(
                            f"artifact {row.id!r} already exists with another manifest (sha256 {row.sha256[:12]}..., given {manifest.sha256[:12]}...); "
                            "a release's bytes never change: publish a new version",
                        )
                    if row.document != document:
                        row.document = document
                        audit.record(session, by.actor, "artifact.resign", row.id, at=now, remote=by.remote, signatures=[kid for kid, _ in signed.signatures])
                    return summary(row), False
                row = Artifact(
                    id=manifest.artifact_id, name=manifest.name, version=manifest.version, security_version=manifest.security_version,
                    hardware=list(manifest.hardware), size=manifest.size, sha256=manifest.sha256, document=document, state="pending",
                    created_at=now, created_by=by.actor, downloads=0,
                )
                session.add(row)
                session.flush()
                audit.record(session, by.actor, "artifact.create", row.id, at=now, remote=by.remote, size=row.size, sha256=row.sha256,
                             signatures=[kid for kid, _ in signed.signatures])
                return summary(row), True
        except IntegrityError:
            # Registered by a concurrent request between our read and insert: compare with that one.
            if _again:
                raise
            return self.register(raw, by, _again=True)

    def _parse(self, raw: bytes) -> SignedManifest:
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise BadManifest(f"a signed manifest is at most {MAX_DOCUMENT_BYTES} bytes; this body is {len(raw)}")
        try:
            signed = load(raw)
        except ManifestError as exc:
            raise BadManifest(str(exc)) from None
        if self.trusted:
            try:
                signed.verify(self.trusted)
            except SignatureError as exc:
                raise UntrustedManifest(f"{exc} (the hub checks release_public_keys)", exc.code) from None
        return signed

    # --- reading ---------------------------------------------------------

    def get(self, artifact_id: str) -> dict[str, Any]:
        with self.sessions() as session:
            row = self._row(session, artifact_id)
            fetches = session.scalars(select(ArtifactFetch).where(ArtifactFetch.artifact_id == artifact_id).order_by(ArtifactFetch.last_at.desc()).limit(100)).all()
            agents = session.scalar(select(func.count()).select_from(ArtifactFetch).where(ArtifactFetch.artifact_id == artifact_id)) or 0
            return {
                **summary(row), "manifest": load(row.document).to_dict(), "fetched_by": int(agents),
                "fetches": [{"agent_id": f.agent_id, "requests": f.requests, "completed": f.completed, "first_at": f.first_at.isoformat(), "last_at": f.last_at.isoformat()} for f in fetches],
            }

    def list(self, *, name: str | None = None, state: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        stmt = select(Artifact)
        if name:
            stmt = stmt.where(Artifact.name == name)
        if state:
            stmt = stmt.where(Artifact.state == state)
        with self.sessions() as session:
            total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
            rows = session.scalars(stmt.order_by(Artifact.created_at.desc(), Artifact.id).limit(limit).offset(offset)).all()
            return {"items": [summary(r) for r in rows], "total": int(total), "limit": limit, "offset": offset}

    def ready(self, artifact_id: str) -> Artifact:
        """A ready artifact's row (detached) for serving; its file must exist."""
        with self.sessions() as session:
            row = self._row(session, artifact_id)
            if row.state != "ready":
                raise ArtifactNotReady(f"artifact {artifact_id!r} has no complete image yet (state {row.state})")
            session.expunge(row)
        if not self.path(artifact_id).is_file():
            log.error("artifact %s is ready but its file %s is missing", artifact_id, self.path(artifact_id))
            raise ArtifactUnavailable(f"artifact {artifact_id!r} is ready but its image is missing from the hub's artifact_dir; upload it again")
        return row

    def record_fetch(self, artifact_id: str, agent_id: str, completed: bool) -> None:
        """Count one image request by ``agent_id``."""
        now = utcnow(self.clock)
        try:
            with transaction(self.sessions) as session:
                row = session.get(Artifact, artifact_id)
                if row is None:
                    return
                row.downloads += 1
                row.last_download_at = now
                fetch = session.get(ArtifactFetch, (artifact_id, agent_id))
                if fetch is None:
                    fetch = ArtifactFetch(artifact_id=artifact_id, agent_id=agent_id, requests=0, completed=False, first_at=now, last_at=now)
                    session.add(fetch)
                fetch.requests += 1
                fetch.completed = fetch.completed or completed
                fetch.last_at = now
        except IntegrityError:
            # The same agent's first two requests at once; counting is bookkeeping, not worth a retry loop.
            log.info("download of %s by %s not counted (concurrent first fetch)", artifact_id, agent_id)

    @staticmethod
    def _row(session: Session, artifact_id: str) -> Artifact:
        row = session.get(Artifact, artifact_id)
        if row is None:
            raise ArtifactNotFound(f"no artifact {artifact_id!r}; upload its manifest first (outpost artifacts upload)")
        return row

    # --- images ----------------------------------------------------------

    def begin_upload(self, artifact_id: str, declared: int | None) -> Upload:
        """Start receiving ``artifact_id``'s image; ``declared`` is the
        request's Content-Length, refused up front when it is over the size."""
        with self.sessions() as session:
            row = self._row(session, artifact_id)
            size, sha256 = row.size, row.sha256
        if declared is not None and declared > size:
            raise ArtifactTooLarge(f"the upload is {declared} bytes; the manifest of {artifact_id!r} says {size}")
        incoming = self.root / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        self._sweep(incoming)
        temp = incoming / f"{artifact_id}.{secrets.token_hex(6)}.part"
        return Upload(self, artifact_id, size, sha256, temp)

    def _sweep(self, incoming: Path) -> None:
        cutoff = self.clock.now() - _STALE_PART.total_seconds()
        for part in incoming.glob("*.part"):
            try:
                if part.stat().st_mtime < cutoff:
                    part.unlink()
            except OSError:
                pass

    def _commit(self, upload: Upload, by: Actor) -> dict[str, Any]:
        final = self.path(upload.artifact_id)
        os.replace(upload.temp, final)
        _fsync_dir(self.root)
        now = utcnow(self.clock)
        with transaction(self.sessions) as session:
            row = session.get(Artifact, upload.artifact_id)
            if row is None or row.sha256 != upload.sha256:
                # Deleted (or deleted and registered anew) while the bytes came in.
                final.unlink(missing_ok=True)
                raise ArtifactConflict(f"artifact {upload.artifact_id!r} was deleted or replaced during the upload")
            first = row.state != "ready"
            if first:
                row.state, row.ready_at = "ready", now
            audit.record(session, by.actor, "artifact.upload", row.id, at=now, remote=by.remote, size=row.size, first=first)
            return summary(row)

    def delete(self, artifact_id: str, by: Actor) -> None:
        """Remove an artifact and its image; refused while an unfinished task
        instance's parameters name it (a rollout still installing it)."""
        now = utcnow(self.clock)
        with transaction(self.sessions) as session:
            self._row(session, artifact_id)
            using = session.scalars(
                select(TaskInstance.id).where(TaskInstance.state.in_([s.value for s in UNFINISHED]), cast(TaskInstance.params, String).contains(artifact_id, autoescape=True)).limit(5)
            ).all()
            if using:
                raise ArtifactInUse(f"artifact {artifact_id!r} is named by unfinished task instances {list(using)}; finish or abort the rollout first")
            session.execute(ArtifactFetch.__table__.delete().where(ArtifactFetch.artifact_id == artifact_id))
            session.execute(Artifact.__table__.delete().where(Artifact.id == artifact_id))
            audit.record(session, by.actor, "artifact.delete", artifact_id, at=now, remote=by.remote)
        self.path(artifact_id).unlink(missing_ok=True)


class Upload:
    """One image upload in progress: ``write`` chunks, then ``finish`` (or ``abort``)."""

    def __init__(self, store: ArtifactStore, artifact_id: str, size: int, sha256: str, temp: Path) -> None:
        self.store, self.artifact_id, self.size, self.sha256, self.temp = store, artifact_id, size, sha256, temp
        self.received = 0
        self._hash = hashlib.sha256()
        self._file = open(temp, "wb")  # noqa: SIM115 - closed by finish/abort

    def write(self, chunk: bytes) -> None:
        """Hash and store ``chunk``; past the manifest's size the upload is
        aborted with ``ArtifactTooLarge``."""
        self.received += len(chunk)
        if self.received > self.size:
            self.abort()
            raise ArtifactTooLarge(f"the upload passed the {self.size} bytes the manifest of {self.artifact_id!r} announces; cut off")
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self, by: Actor) -> dict[str, Any]:
        """Check the bytes against the manifest and make the artifact ready."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if self.received != self.size:
                raise ArtifactMismatch(f"the upload has {self.received} bytes; the manifest of {self.artifact_id!r} says {self.size} (interrupted?)")
            digest = self._hash.hexdigest()
            if digest != self.sha256:
                raise ArtifactMismatch(f"the upload's sha256 is {digest}; the manifest of {self.artifact_id!r} says {self.sha256}")
            return self.store._commit(self, by)
        finally:
            self.abort()

    def abort(self) -> None:
        """Drop the temporary file (idempotent; harmless after ``finish``)."""
        if not self._file.closed:
            self._file.close()
        self.temp.unlink(missing_ok=True)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte range a ``Range`` header asks of a ``size``-byte
    image; None for the whole image (no header, or one this server ignores as
    RFC 9110 allows: another unit, several ranges, malformed). Raises
    ``RangeNotSatisfiable`` when it starts past the end."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or (first == last == ""):
        return None
    if first == "":  # suffix: the last N bytes
        count = int(last)
        if count == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - count), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(size)
    return start, end


class RangeNotSatisfiable(HubError):
    status = 416
    code = "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"the requested range starts past the image's {size} bytes")
        self.size = size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
