"""The REST client: one ``httpx.Client`` per command, API errors turned
into ``CtlError`` with an actionable message and a named exit code."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import httpx

from hub.ctl.errors import CtlError, ExitCode

API = "/api/v1"
START_HINT = "start one with 'outpost-hub standalone' (or 'outpost-hub api'), or point --hub / OUTPOST_HUB_URL at a running hub"


class HubClient:
    def __init__(self, base_url: str, timeout: float = 10.0, token: str | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise CtlError(f"--hub {base_url!r} is not an http:// or https:// URL, e.g. http://127.0.0.1:8080", ExitCode.USAGE)
        self.base_url = base_url.rstrip("/")
        self.has_token = bool(token)
        headers = {"User-Agent": "outpost-ctl"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.base_url + API, timeout=timeout, headers=headers)

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def get(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self._request("GET", path, params=clean)

    def post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self._request("PATCH", path, json=body)

    def put(self, path: str, body: Any = None) -> Any:
        return self._request("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def post_content(self, path: str, content: bytes, content_type: str = "application/json") -> Any:
        """POST ``content`` as it is (a document whose bytes matter, e.g. a signed manifest)."""
        return self._request("POST", path, content=content, headers={"Content-Type": content_type})

    def put_stream(self, path: str, chunks: Iterable[bytes], length: int, timeout: float = 60.0) -> Any:
        """PUT a body of ``length`` bytes read from ``chunks`` (never all in
        memory); ``timeout`` bounds each network read or write, not the whole."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
        return self._request("PUT", path, content=chunks, headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc) or type(exc).__name__
            raise CtlError(f"cannot reach the hub at {self.base_url} ({reason}); {START_HINT}", ExitCode.HUB_UNREACHABLE) from None
        except httpx.TimeoutException:
            raise CtlError(f"the hub at {self.base_url} did not answer in time; check that it is running and not overloaded", ExitCode.HUB_UNREACHABLE) from None
        except httpx.HTTPError as exc:
            raise CtlError(f"talking to the hub at {self.base_url} failed: {exc}", ExitCode.HUB_UNREACHABLE) from None
        if response.is_success:
            return response.json() if response.content else None
        raise self._api_error(response)

    def _api_error(self, response: httpx.Response) -> CtlError:
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            return CtlError(
                f"{self.base_url} answered HTTP {response.status_code} without an Outpost error body; is --hub pointing at an Outpost hub?",
                ExitCode.API_ERROR,
            )
        if response.status_code == 401:
            if not self.has_token:
                return CtlError(f"the hub at {self.base_url} needs an API token: pass --token-file PATH (or set OUTPOST_TOKEN_FILE / OUTPOST_TOKEN); an admin creates one with 'outpost-hub tokens create USER'", ExitCode.AUTH)
            return CtlError(f"the hub at {self.base_url} refused the API token (unknown, expired, revoked, or its user is disabled); get a new one with 'outpost-hub tokens create USER'", ExitCode.AUTH)
        if response.status_code == 403:
            return CtlError(f"not allowed: {message}", ExitCode.AUTH)
        exit_code = ExitCode.NOT_FOUND if response.status_code == 404 else ExitCode.API_ERROR
        return CtlError(f"{code}: {message}", exit_code)
