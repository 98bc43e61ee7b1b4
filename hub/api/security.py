"""Authentication and authorisation of every HTTP route, in one place.

``AuthMiddleware`` sits in front of the whole application (API routes,
dashboard pages, mounts), so a route added anywhere is covered without
doing anything. For each request it finds the route, decides what the
route needs, and refuses before the route runs:

- public routes (liveness, readiness, login, API docs, static assets) and
  agent routes (which authenticate the agent themselves) pass;
- everything else needs a user: a bearer API token (``Authorization:
  Bearer opt_...``), or, for dashboard pages only, the session cookie;
- GET/HEAD need the viewer role, other methods operator, and routes marked
  with ``hub.auth.roles.requires`` what they name (admin for users, tokens
  and the audit log);
- a request authenticated by the session cookie that changes something
  must carry the session's CSRF value (form field ``csrf_token`` or header
  ``X-CSRF-Token``). Bearer tokens need none: browsers never send them on
  their own, so another site cannot make a browser use one.

The principal is put on ``request.state.principal`` (and, for sessions,
``request.state.csrf_token``) for routes that filter by the user's scope.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Router, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub.auth import sessions as web_sessions
from hub.auth import tokens
from hub.auth.roles import ROLE_ATTRIBUTE, Principal, Role
from shared.clock import utcnow

log = logging.getLogger(__name__)

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Largest form a session-authenticated change may post (the CSRF check reads it).
MAX_FORM_BYTES = 64 * 1024
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class RouteInfo:
    """One route as served: its full path template, methods (None for a
    mount: every method) and endpoint."""

    path: str
    methods: frozenset[str] | None
    endpoint: Callable[..., Any] | None
    regex: re.Pattern[str]

    @property
    def is_mount(self) -> bool:
        return self.methods is None

    def matches(self, method: str, path: str) -> bool:
        if self.is_mount:
            return path == self.path or path.startswith(self.path.rstrip("/") + "/")
        return method in self.methods and self.regex.match(path) is not None  # type: ignore[operator]


def route_table(router: Router) -> list[RouteInfo]:
    """Every route of ``router`` with its full path, included routers
    flattened (newer FastAPI keeps them nested), in matching order."""
    try:
        from fastapi.routing import iter_route_contexts

        candidates: Iterator[Any] = iter(iter_route_contexts(router.routes))
    except ImportError:  # FastAPI that flattens included routers itself
        candidates = iter(router.routes)
    table = []
    for route in candidates:
        original = getattr(route, "original_route", route)
        path = getattr(route, "path", None)
        if not path:
            continue
        if isinstance(original, Mount):
            table.append(RouteInfo(path, None, None, re.compile("")))
            continue
        methods = set(getattr(route, "methods", None) or ())
        if "GET" in methods:
            methods.add("HEAD")
        regex, _format, _convertors = compile_path(path)
        table.append(RouteInfo(path, frozenset(methods), getattr(route, "endpoint", None), regex))
    return table


def required_role(route: RouteInfo, method: str, public: Collection[tuple[str, str]], public_mounts: Collection[str]) -> Role | None:
    """What ``method`` on ``route`` needs: a role, or None (no user: public
    and agent routes)."""
    if route.is_mount:
        return None if route.path in public_mounts else Role.VIEWER
    as_get = "GET" if method == "HEAD" else method
    if (as_get, route.path) in public:
        return None
    marked = getattr(route.endpoint, ROLE_ATTRIBUTE, None)
    if marked is not None:
        return Role(marked)
    return Role.VIEWER if method in SAFE_METHODS else Role.OPERATOR


def is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, router: Router, state: Any, public: Collection[tuple[str, str]], public_mounts: Collection[str]) -> None:
        self.app = app
        self.router = router
        self.state = state
        self.public = frozenset(public)
        self.public_mounts = frozenset(public_mounts)
        self._table: list[RouteInfo] | None = None
        self._table_key: int = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self._route(scope)
        method = scope["method"]
        need = required_role(route, method, self.public, self.public_mounts) if route is not None else None
        if need is None:
            # Public, agent-facing, or no such route (the router answers 404/405).
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        try:
            who = await run_in_threadpool(self._authenticate, request)
        except SQLAlchemyError as exc:
            log.warning("cannot check credentials: %s", exc)
            await _json(503, "database_unavailable", "the hub database is unavailable; try again")(scope, receive, send)
            return
        if who is None:
            await self._unauthenticated(request)(scope, receive, send)
            return
        if not who.can(need):
            message = f"{method} {route.path} needs the {need.value} role; {who.name} acts as {who.role.value}"
            await _refuse(request, 403, "forbidden", message)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["principal"] = who
        # The audit actor for routes that record one without asking for the principal.
        state["actor"] = f"user:{who.name}"
        if who.via == "session" and who.session_secret is not None:
            csrf = web_sessions.csrf_token(self.state.settings.secret_key, who.session_secret)
            state["csrf_token"] = csrf
            if method not in SAFE_METHODS:
                body, too_big = await _read_body(receive)
                if too_big:
                    await _refuse(request, 413, "form_too_large", f"form is larger than {MAX_FORM_BYTES} bytes")(scope, receive, send)
                    return
                if not web_sessions.csrf_ok(self.state.settings.secret_key, who.session_secret, _csrf_given(request, body)):
                    await _refuse(request, 403, "csrf_failed", "the form's CSRF token is missing or wrong; reload the page and try again")(scope, receive, send)
                    return
                receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _route(self, scope: Scope) -> RouteInfo | None:
        # Built on first use (routers may be added after the middleware) and
        # again if routes were added since.
        if self._table is None or self._table_key != len(self.router.routes):
            self._table, self._table_key = route_table(self.router), len(self.router.routes)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # served under a prefix (a proxy's root_path)
            path = path[len(root):] or "/"
        for route in self._table:
            if route.matches(scope["method"], path):
                return route
        return None

    def _authenticate(self, request: Request) -> Principal | None:
        state = self.state
        now = utcnow(state.clock)
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, value = header.partition(" ")
            if scheme.lower() != "bearer":
                return None
            return tokens.authenticate(state.sessions, value.strip(), now)
        if is_api(request.url.path):
            return None  # the API takes tokens only: no ambient cookie authority, no CSRF there
        cookie = request.cookies.get(web_sessions.COOKIE_NAME)
        if not cookie:
            return None
        s = state.settings
        return web_sessions.authenticate(state.sessions, cookie, now, web_sessions.SessionPolicy(s.session_idle_timeout, s.session_max_age))

    def _unauthenticated(self, request: Request) -> Response:
        path = request.url.path
        if is_api(path):
            response = _json(401, "unauthorized", "authentication required: send 'Authorization: Bearer <API token>' (create one with 'outpost-hub tokens create')")
            response.headers["WWW-Authenticate"] = 'Bearer realm="outpost"'
            return response
        if request.method in ("GET", "HEAD"):
            target = path + (f"?{request.url.query}" if request.url.query else "")
            return _page_headers(RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303))
        return _page(401, "Log in first", 'Your session has ended or you are not logged in. <a href="/login">Log in</a> and try again.')


def _json(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _refuse(request: Request, status: int, code: str, message: str) -> Response:
    if is_api(request.url.path):
        return _json(status, code, message)
    return _page(status, code.replace("_", " ").capitalize(), html.escape(message))


def _page(status: int, title: str, body_html: str) -> Response:
    """A bare page (the dashboard's templates live in hub.web, which this
    package may not import); no inline style or script."""
    text = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)} · Outpost</title>'
        f'<link rel="stylesheet" href="/static/app.css"><link rel="icon" href="/static/favicon.svg" type="image/svg+xml"></head><body><main id="main"><h1>{html.escape(title)}</h1><p>{body_html}</p></main></body></html>'
    )
    return _page_headers(HTMLResponse(text, status_code=status))


def _page_headers(response: Response) -> Response:
    response.headers.update(_PAGE_HEADERS)
    return response


def _csrf_given(request: Request, body: bytes) -> str:
    header = request.headers.get(web_sessions.CSRF_HEADER)
    if header:
        return header
    if request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
        return parse_qs(body.decode("utf-8", errors="replace")).get(web_sessions.CSRF_FIELD, [""])[0]
    return ""


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_FORM_BYTES:
            return b"", True
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks), False


def _replay(body: bytes, original: Receive) -> Receive:
    """The body read for the CSRF check, once; then the real channel (disconnects)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive
