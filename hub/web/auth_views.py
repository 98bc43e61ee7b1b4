"""Dashboard login, logout, the account page (change your own password)
and the audit log page.

Login: ``GET /login`` shows the form; ``POST /login`` checks the user name
and password (rate-limited, ``hub.auth.login``), starts a server-side
session and sets its cookie (HttpOnly, SameSite=Strict, Secure unless
``session_cookie_secure`` is false), then goes to ``next``. The form is
itself protected against login CSRF (another site logging the browser in
as someone else): it carries a value signed with the hub's secret key over
a random cookie set with the form, on top of the same-origin check.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from hub import audit
from hub.auth import login as auth_login
from hub.auth.keys import same, sign
from hub.auth.ratelimit import LoginLimits
from hub.auth.roles import Role, requires
from hub.auth.sessions import COOKIE_NAME, SessionPolicy
from hub.auth.users import MIN_PASSWORD_LENGTH
from hub.errors import HubError, InvalidRequest, RateLimited
from hub.web.views import _MAX_FORM_BYTES, _error_page, _render, _same_origin, _secure, _who
from shared.clock import utcnow

router = APIRouter(include_in_schema=False)

#: The random value the login form's CSRF field is signed over.
_LOGIN_COOKIE = "outpost_login"


@router.get("/login")
def login_page(request: Request, next: str = "/") -> Response:
    return _login_form(request, _safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await _form(request)
    target = _safe_next(form.get("next", "/"))
    if not _same_origin(request):
        return _login_form(request, target, "Cross-site login posts are refused.", 403)
    nonce = request.cookies.get(_LOGIN_COOKIE, "")
    if not nonce or not same(sign(_settings(request).secret_key, "login", nonce), form.get("csrf_token", "")):
        return _login_form(request, target, "The login form expired; please try again.", 403)
    state = request.app.state
    s = _settings(request)
    address = request.client.host if request.client else ""
    try:
        secret = await run_in_threadpool(
            auth_login.login, state.sessions, form.get("username", ""), form.get("password", ""), address, utcnow(state.clock),
            LoginLimits(s.login_max_failures, s.login_max_failures_per_address, s.login_failure_window), SessionPolicy(s.session_idle_timeout, s.session_max_age),
        )
    except RateLimited as exc:
        response = _login_form(request, target, f"Too many failed logins. Try again in {exc.retry_after} s.", 429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except HubError:
        return _login_form(request, target, "Wrong user name or password.", 401)
    response = _secure(RedirectResponse(target, status_code=303))
    response.set_cookie(COOKIE_NAME, secret, max_age=int(s.session_max_age), path="/", secure=s.session_cookie_secure, httponly=True, samesite="strict")
    response.delete_cookie(_LOGIN_COOKIE, path="/login")
    return response


@router.post("/logout")
@requires(Role.VIEWER)
async def logout(request: Request) -> Response:
    """End the session (hub.api.security checked its CSRF value)."""
    who = _who(request)
    secret = request.cookies.get(COOKIE_NAME, "")
    if who is not None and who.via == "session" and secret:
        state = request.app.state
        await run_in_threadpool(auth_login.logout, state.sessions, secret, who.name, request.client.host if request.client else "", utcnow(state.clock))
    response = _secure(RedirectResponse("/login", status_code=303))
    response.delete_cookie(COOKIE_NAME, path="/", secure=_settings(request).session_cookie_secure, httponly=True, samesite="strict")
    return response


@router.get("/account")
@requires(Role.VIEWER)
def account_page(request: Request) -> Response:
    """Who you are, and the form to change your own password."""
    return _account(request)


@router.post("/account/password")
@requires(Role.VIEWER)
async def change_password(request: Request) -> Response:
    """Change your own password (hub.api.security checked the CSRF value).
    Rate-limited like login; your other sessions end, this one stays."""
    if not _same_origin(request):
        return _account(request, "Cross-site posts are refused.", 403)
    form = await _form(request)
    who = _who(request)
    assert who is not None, "the route needs a user"
    new = form.get("new_password", "")
    if new != form.get("confirm_password", ""):
        return _account(request, "The two new passwords differ.", 422)
    state = request.app.state
    s = _settings(request)
    try:
        await run_in_threadpool(
            auth_login.change_password, state.sessions, who.name, form.get("current_password", ""), new,
            request.client.host if request.client else "", utcnow(state.clock),
            LoginLimits(s.login_max_failures, s.login_max_failures_per_address, s.login_failure_window), who.session_secret,
        )
    except RateLimited as exc:
        response = _account(request, f"Too many failed attempts. Try again in {exc.retry_after} s.", 429)
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    except HubError as exc:
        return _account(request, str(exc)[:1].upper() + str(exc)[1:] + ".", exc.status)
    return _account(request, changed=True)


def _account(request: Request, error: str = "", status: int = 200, changed: bool = False) -> Response:
    return _render(request, "account.html", status=status, nav="account", error=error, changed=changed, min_length=MIN_PASSWORD_LENGTH)


@router.get("/audit")
@requires(Role.ADMIN)
def audit_page(request: Request) -> Response:
    """The audit log, newest first; ``actor``, ``action`` (``auth.*`` for a
    prefix) and ``since`` (ISO date or time) in the query string filter it."""
    params = request.query_params
    filters = {name: params[name].strip() for name in ("actor", "action", "since") if params.get(name, "").strip()}
    try:
        since = _parse_time(filters["since"]) if "since" in filters else None
        with request.app.state.sessions() as session:
            rows = audit.recent(session, actor=filters.get("actor"), action=filters.get("action"), since=since, limit=500)
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "audit.html", nav="audit", rows=rows, filters=filters)


def _login_form(request: Request, target: str, error: str = "", status: int = 200) -> Response:
    s = _settings(request)
    nonce = secrets.token_urlsafe(24)
    response = _render(request, "login.html", status=status, next=target, error=error, login_csrf=sign(s.secret_key, "login", nonce))
    response.set_cookie(_LOGIN_COOKIE, nonce, max_age=3600, path="/login", secure=s.session_cookie_secure, httponly=True, samesite="strict")
    response.headers["Cache-Control"] = "no-store"
    return response


def _safe_next(target: str) -> str:
    """Only paths of this site: no ``//host`` or ``/\\host`` (open redirects)."""
    if not target.startswith("/") or target.startswith(("//", "/\\")) or any(c in target for c in "\r\n\t"):
        return "/"
    return target


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        return {}
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).items()}


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"since must be an ISO date or time, e.g. 2026-01-31 or 2026-01-31T12:00, got {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _settings(request: Request):  # type: ignore[no-untyped-def]
    return request.app.state.settings
