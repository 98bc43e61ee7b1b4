"""Fetching a release from the hub: its signed manifest and its image.

Both requests carry the agent's ``Outpost-Signature`` header, made by the
agent process (``ctx.signed_headers``): the job's process never holds the
device key. The image download resumes: bytes already in
``ota/downloads/<artifact_id>.part`` are kept and only the rest is asked for
with an HTTP ``Range`` header (a ``206`` answer appends, a ``200`` answer
means the server ignored the range and the file starts over). It stops as
soon as more bytes arrive than the manifest's size (``too_large``), and the
finished file must hash to the manifest's SHA-256 (``hash_mismatch``) before
it is renamed to ``<artifact_id>.img``, the only name install reads.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from firmware_jobs.base import JobAborted, JobError
from firmware_jobs.ota.slots import sha256_file
from shared.release import MAX_DOCUMENT_BYTES, Manifest

#: (method, path) -> the signed-request headers; the agent answers it.
Signer = Callable[[str, str], Mapping[str, str]]
#: Sync the partial file this often, so a power cut loses little of it.
_SYNC_EVERY = 8 * 1024 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _Interrupted(Exception):
    """The transfer stopped early; what arrived is kept and a retry resumes."""


class Hub:
    """The two artifact routes of one hub, signed per request."""

    def __init__(self, base_url: str, sign: Signer, verify: Any = True, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        # The signature covers the path the hub sees, prefix included.
        self._prefix = urlsplit(self.base_url).path.rstrip("/")
        self._sign = sign
        self._verify = verify
        self._timeout = timeout

    def _headers(self, path: str) -> dict[str, str]:
        try:
            return dict(self._sign("GET", path))
        except (RuntimeError, ValueError) as exc:
            raise JobError(f"the agent cannot sign requests to the hub: {exc}", "signing_unavailable", retryable=True) from None

    def _route(self, artifact_id: str, what: str) -> tuple[str, str]:
        path = f"/api/v1/artifacts/{quote(artifact_id, safe='')}/{what}"
        return self.base_url + path, self._prefix + path

    def _client(self) -> Any:
        import httpx  # here, not at the top: only this job needs it, and the hub imports the catalog

        return httpx.Client(verify=self._verify, timeout=httpx.Timeout(self._timeout), follow_redirects=False)

    def manifest(self, artifact_id: str) -> bytes:
        """The signed manifest document of ``artifact_id`` (not yet verified)."""
        import httpx

        url, path = self._route(artifact_id, "manifest")
        try:
            with self._client() as client:
                response = client.get(url, headers=self._headers(path))
            _check_status(response.status_code, response.text, f"the manifest of {artifact_id}")
        except (httpx.HTTPError, _Interrupted) as exc:
            raise JobError(f"cannot fetch the manifest of {artifact_id}: {exc}", "hub_unreachable", retryable=True) from None
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise JobError(f"the hub's manifest of {artifact_id} is {len(response.content)} bytes, over {MAX_DOCUMENT_BYTES}", "bad_manifest", retryable=False)
        return response.content

    def image(self, manifest: Manifest, downloads: Path, progress: Callable[[int, int], None],
              should_abort: Callable[[], bool], log: Callable[[str], None], attempts: int = 4) -> Path:
        """The image of ``manifest``, complete and hash-checked, in ``downloads``."""
        final = downloads / f"{manifest.artifact_id}.img"
        part = downloads / f"{manifest.artifact_id}.part"
        if final.exists():
            if sha256_file(final, should_abort) == manifest.sha256:
                return final
            final.unlink()
        downloads.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            try:
                self._fetch(manifest, part, progress, should_abort)
                break
            except _Interrupted as exc:
                have = part.stat().st_size if part.exists() else 0
                log(f"download of {manifest.artifact_id} interrupted at {have} of {manifest.size} bytes (try {attempt}/{attempts}): {exc}")
                if attempt == attempts:
                    raise JobError(f"download of {manifest.artifact_id} kept failing ({exc}); {have} bytes kept for the next try",
                                   "download_failed", retryable=True) from None
                _pause(0.2 * 2 ** attempt, should_abort)
        if sha256_file(part, should_abort) != manifest.sha256:
            part.unlink()
            raise JobError(f"the downloaded image of {manifest.artifact_id} does not match the manifest's SHA-256", "hash_mismatch", retryable=False)
        os.replace(part, final)
        fd = os.open(downloads, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return final

    def _fetch(self, manifest: Manifest, part: Path, progress: Callable[[int, int], None], should_abort: Callable[[], bool]) -> None:
        import httpx

        size = manifest.size
        offset = part.stat().st_size if part.exists() else 0
        if offset > size:
            part.unlink()
            offset = 0
        if offset == size:
            return
        url, path = self._route(manifest.artifact_id, "image")
        headers = self._headers(path)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with self._client() as client, client.stream("GET", url, headers=headers) as response:
                if response.status_code == 206:
                    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
                    if match is None or int(match.group(1)) != offset:
                        part.unlink(missing_ok=True)  # an answer for other bytes: start over
                        raise _Interrupted(f"unexpected Content-Range {response.headers.get('content-range')!r} for offset {offset}")
                    mode = "ab"
                elif response.status_code == 200:
                    offset, mode = 0, "wb"
                elif response.status_code == 416:
                    part.unlink(missing_ok=True)
                    raise _Interrupted("the hub refused the resume range; starting over")
                else:
                    response.read()
                    _check_status(response.status_code, response.text, f"the image of {manifest.artifact_id}")
                    raise _Interrupted(f"unexpected status {response.status_code}")
                announced = response.headers.get("content-length")
                if announced is not None and announced.isdigit() and offset + int(announced) > size:
                    part.unlink(missing_ok=True)
                    raise JobError(f"the hub announces {offset + int(announced)} bytes for {manifest.artifact_id}, the manifest says {size}",
                                   "too_large", retryable=False)
                # Chunks as they arrive (no re-chunking): when the connection
                # drops, every byte received is already in the file.
                _copy(response.iter_bytes(), part, mode, offset, size, progress, should_abort)
        except httpx.HTTPError as exc:
            raise _Interrupted(f"{type(exc).__name__}: {exc}") from None


def _copy(chunks: Any, part: Path, mode: str, offset: int, size: int, progress: Callable[[int, int], None],
          should_abort: Callable[[], bool]) -> None:
    have, unsynced = offset, 0
    with open(part, mode) as out:
        try:
            for chunk in chunks:
                if should_abort():
                    raise JobAborted()
                if have + len(chunk) > size:
                    out.close()
                    part.unlink(missing_ok=True)
                    raise JobError(f"the image is longer than the manifest's {size} bytes; download stopped", "too_large", retryable=False)
                out.write(chunk)
                have += len(chunk)
                unsynced += len(chunk)
                if unsynced >= _SYNC_EVERY:
                    out.flush()
                    os.fsync(out.fileno())
                    unsynced = 0
                progress(have, size)
        finally:
            if not out.closed:
                out.flush()
                os.fsync(out.fileno())
    if have < size:
        raise _Interrupted(f"the connection ended after {have} of {size} bytes")


def _check_status(status: int, text: str, what: str) -> None:
    if status == 200 or status == 206:
        return
    detail = text[:300]
    if status == 404:
        raise JobError(f"the hub has no {what}: {detail}", "artifact_not_found", retryable=False)
    if status in (401, 403):
        raise JobError(f"the hub refused to give {what} to this agent ({status}): {detail}", "download_refused", retryable=True)
    if status >= 500 or status in (408, 429):
        raise _Interrupted(f"the hub answered {status} for {what}: {detail}")
    raise JobError(f"the hub answered {status} for {what}: {detail}", "download_failed", retryable=False)


def _pause(seconds: float, should_abort: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if should_abort():
            raise JobAborted()
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
