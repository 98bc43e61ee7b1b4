"""The artifact store's API (``hub.artifacts``; docs/fleet.md).

Users (API token): register a signed manifest, upload its image, list,
show, delete. Writing needs the operator role, deleting admin; every write
is in the audit log.

Agents (``Outpost-Signature``, like the HTTP sync; these two routes are in
``AGENT_ROUTES``): the signed manifest and the image of a ``ready``
artifact, the image with single-range ``Range`` support so a device
resumes an interrupted download. The answers are not signed by the hub:
the manifest carries the release key's signature and the image its
SHA-256, which the device checks; the hub's word adds nothing to them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from hub import requestauth
from hub.api.deps import By, PageParams, read_bounded
from hub.api.schemas import ErrorResponse
from hub.artifacts import ArtifactStore, BadManifest, RangeNotSatisfiable, parse_range
from hub.auth.roles import Role, requires
from hub.config import HubSettings
from shared.clock import utcnow
from shared.release import MAX_DOCUMENT_BYTES
from shared.requestsig import HEADER, parse_header
from shared.signing import SignatureError

log = logging.getLogger(__name__)

router = APIRouter(tags=["artifacts"])

#: Bytes gathered from the request before one trip to a worker thread writes them.
_WRITE_BATCH = 1024 * 1024
#: Bytes read from disk per chunk of a download.
_READ_CHUNK = 256 * 1024

ArtifactId = Annotated[str, Path(max_length=200, description="The artifact id: the manifest's <name>-<version>.")]


class ArtifactOut(BaseModel):
    id: str = Field(description="<name>-<version>, from the manifest.")
    name: str
    version: str
    security_version: int = Field(description="The manifest's anti-rollback counter.")
    hardware: list[str] = Field(description="Hardware models the image fits (empty: any).")
    size: int = Field(description="Image size in bytes, from the manifest.")
    sha256: str
    state: str = Field(description="pending (manifest only) or ready (the image arrived and matched the manifest).")
    created_at: str
    created_by: str = Field(description="Audit actor that registered the manifest.")
    ready_at: str | None
    downloads: int = Field(description="Image requests served to agents (each range request counts).")
    last_download_at: str | None


class ArtifactPage(BaseModel):
    items: list[ArtifactOut]
    total: int
    limit: int
    offset: int


class Fetch(BaseModel):
    agent_id: str
    requests: int
    completed: bool = Field(description="A request was served up to the image's last byte.")
    first_at: str
    last_at: str


class ArtifactDetail(ArtifactOut):
    manifest: dict[str, Any] = Field(description="The signed manifest document ({manifest, signatures}).")
    fetched_by: int = Field(description="Distinct agents that requested the image.")
    fetches: list[Fetch] = Field(description="The latest 100 agents' fetches.")


_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No such artifact (code artifact_not_found)."}}
_AGENT_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Not signed by a registered agent's key, stale, replayed or malformed (codes signature_missing, malformed_signature, bad_signature, stale_request, replayed_request, unknown_agent)."},
    403: {"model": ErrorResponse, "description": "The agent is revoked (code agent_revoked)."},
    409: {"model": ErrorResponse, "description": "The image has not been uploaded whole yet (code artifact_not_ready)."},
    **_NOT_FOUND,
}


def store(request: Request) -> ArtifactStore:
    state = request.app.state
    found = getattr(state, "artifact_store", None)
    if found is None:
        found = state.artifact_store = ArtifactStore.from_settings(state.settings, state.sessions, state.clock)
    return found


@router.post(
    "/artifacts", response_model=ArtifactOut, status_code=201,
    responses={
        200: {"model": ArtifactOut, "description": "The same manifest was registered before (its signatures are updated)."},
        409: {"model": ErrorResponse, "description": "Another manifest exists under this id (code artifact_conflict)."},
        413: {"model": ErrorResponse, "description": "The manifest announces more than max_artifact_bytes (code artifact_too_large)."},
        422: {"model": ErrorResponse, "description": "Not a signed manifest (bad_manifest), or not signed by a key of release_public_keys (unknown_release_key, bad_signature)."},
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "description": "A signed manifest document: {manifest, signatures} (outpost release sign)."}}}}},
)
async def register_artifact(request: Request, by: By) -> Any:
    """Register a release: its signed manifest (``outpost release sign``
    makes one). The artifact starts ``pending``; upload the image next."""
    raw = await read_bounded(request, MAX_DOCUMENT_BYTES, _manifest_too_large(MAX_DOCUMENT_BYTES))
    record, created = await run_in_threadpool(store(request).register, raw, by)
    return JSONResponse(record, status_code=201 if created else 200)


@router.put(
    "/artifacts/{artifact_id}/image", response_model=ArtifactOut,
    responses={
        **_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The artifact was deleted or replaced during the upload (code artifact_conflict)."},
        413: {"model": ErrorResponse, "description": "More bytes than the manifest's size (code artifact_too_large); the upload is cut off."},
        422: {"model": ErrorResponse, "description": "Fewer bytes than the manifest's size, or another SHA-256 (code artifact_mismatch)."},
    },
    openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
)
async def upload_image(request: Request, artifact_id: ArtifactId, by: By) -> Any:
    """Upload the image's bytes (raw body, streamed to disk). They must
    match the manifest's size and SHA-256; then the artifact is ``ready``.
    Uploading the same bytes again is harmless."""
    declared = request.headers.get("content-length", "")
    upload = await run_in_threadpool(store(request).begin_upload, artifact_id, int(declared) if declared.isdigit() else None)
    try:
        pending: list[bytes] = []
        held = 0
        async for chunk in request.stream():
            pending.append(chunk)
            held += len(chunk)
            if held >= _WRITE_BATCH:
                await run_in_threadpool(upload.write, b"".join(pending))
                pending, held = [], 0
        if pending:
            await run_in_threadpool(upload.write, b"".join(pending))
        return await run_in_threadpool(upload.finish, by)
    finally:
        await run_in_threadpool(upload.abort)


@router.get("/artifacts", response_model=ArtifactPage)
def list_artifacts(
    request: Request, paging: PageParams,
    name: Annotated[str | None, Query(max_length=100, description="Only this release name (product line).")] = None,
    state: Annotated[str | None, Query(pattern="^(pending|ready)$", description="Only pending or ready artifacts.")] = None,
) -> dict[str, Any]:
    """Artifacts, newest first."""
    return store(request).list(name=name, state=state, limit=paging.limit, offset=paging.offset)


@router.get("/artifacts/{artifact_id}", response_model=ArtifactDetail, responses=_NOT_FOUND)
def get_artifact(request: Request, artifact_id: ArtifactId) -> dict[str, Any]:
    """One artifact with its signed manifest and which agents fetched it."""
    return store(request).get(artifact_id)


@router.delete(
    "/artifacts/{artifact_id}", status_code=204,
    responses={**_NOT_FOUND, 409: {"model": ErrorResponse, "description": "Unfinished task instances name the artifact in their parameters (code artifact_in_use)."}},
)
@requires(Role.ADMIN)
def delete_artifact(request: Request, artifact_id: ArtifactId, by: By) -> Response:
    """Delete an artifact and its image (admin). Refused while an unfinished
    task instance's parameters mention the artifact id."""
    store(request).delete(artifact_id, by)
    return Response(status_code=204)


# --- agents -----------------------------------------------------------------


async def _agent(request: Request) -> str:
    """The agent that signed this (bodiless) request; raises 401/403."""
    settings: HubSettings = request.app.state.settings
    header = request.headers.get(HEADER)
    signer = ""
    if header:
        try:
            signer = parse_header(header)[0]
        except SignatureError as exc:
            raise requestauth.AgentUnauthorized(str(exc), exc.code) from None
    now = utcnow(request.app.state.clock)
    signed = await run_in_threadpool(requestauth.check_header, request.app.state.sessions, now, settings.agent_request_window, signer, header)
    await run_in_threadpool(signed.verify, request.app.state.sessions, now, settings.agent_request_window, request.method, request.url.path, b"")
    return signed.agent_id


@router.get(
    "/artifacts/{artifact_id}/manifest", response_model=None,
    responses={200: {"content": {"application/json": {}}, "description": "The signed manifest document, as uploaded."}, **_AGENT_AUTH},
)
async def agent_manifest(request: Request, artifact_id: ArtifactId) -> Response:
    """For agents: the signed manifest of a ready artifact. Signed by the
    agent (``Outpost-Signature``, no user token)."""
    await _agent(request)
    row = await run_in_threadpool(store(request).ready, artifact_id)
    return Response(row.document.encode(), media_type="application/json", headers={"ETag": f'"{row.sha256}"'})


@router.get(
    "/artifacts/{artifact_id}/image", response_model=None,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The whole image."},
        206: {"content": {"application/octet-stream": {}}, "description": "The requested byte range (Content-Range)."},
        416: {"model": ErrorResponse, "description": "The range starts past the image's end (code range_not_satisfiable)."},
        **_AGENT_AUTH,
    },
)
async def agent_image(request: Request, artifact_id: ArtifactId) -> Response:
    """For agents: the image of a ready artifact, streamed from disk. One
    range (``Range: bytes=N-``, ``bytes=N-M``, ``bytes=-N``) answers 206, so a
    device resumes where it stopped; ``If-Range`` with another ETag (the
    SHA-256) gets the whole image. Signed by the agent."""
    agent_id = await _agent(request)
    artifacts = store(request)
    row = await run_in_threadpool(artifacts.ready, artifact_id)
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    if_range = request.headers.get("if-range")
    try:
        wanted = parse_range(request.headers.get("range"), row.size) if if_range in (None, etag) else None
    except RangeNotSatisfiable as exc:
        return JSONResponse({"error": {"code": exc.code, "message": str(exc)}}, status_code=416, headers={**headers, "Content-Range": f"bytes */{row.size}"})
    start, end = wanted if wanted is not None else (0, row.size - 1)
    # Open before answering: a file deleted afterwards stays readable through this handle.
    handle = await run_in_threadpool(open, artifacts.path(artifact_id), "rb")
    await run_in_threadpool(artifacts.record_fetch, artifact_id, agent_id, end == row.size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{row.size}"
    return StreamingResponse(_chunks(handle, start, end), status_code=206 if wanted is not None else 200, media_type="application/octet-stream", headers=headers)


def _chunks(handle: Any, start: int, end: int) -> Iterator[bytes]:
    """Bytes ``start``..``end`` (inclusive) of the open file, then close it.
    A plain iterator: Starlette reads it in a worker thread."""
    try:
        handle.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = handle.read(min(_READ_CHUNK, left))
            if not chunk:
                raise OSError(f"image file ended {left} bytes early")  # truncated behind the hub's back
            left -= len(chunk)
            yield chunk
    finally:
        handle.close()


def _manifest_too_large(limit: int) -> Callable[[str | None], BadManifest]:
    def refuse(declared: str | None) -> BadManifest:
        if declared is not None:
            return BadManifest(f"a signed manifest is at most {limit} bytes; this body is {declared}")
        return BadManifest(f"a signed manifest is at most {limit} bytes")
    return refuse
