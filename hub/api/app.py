"""The FastAPI application factory and the API's one error shape.

Every error the API answers with is ``{"error": {"code": ..., "message": ...}}``:
``HubError`` subclasses with their own status and code, request validation
errors as 422 ``invalid_request``, unknown routes as 404 ``not_found``,
anything unexpected as 500 ``internal_error`` (logged with its traceback).

OpenAPI is at ``/api/v1/openapi.json`` and Swagger UI at ``/api/docs``. The
Swagger UI assets come from the ``fastapi-offline`` package and are served
by the hub at ``/api/docs/assets``: the docs work with no internet access.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from importlib.resources import files
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from hub import vault
from hub.api.routes import agents, artifacts, assets, audit_log, backfills, connections, conflicts, dags, enrolment, health, operations, pools, rollouts, runs, security, sync, users, variables
from hub.api.security import AuthMiddleware
from hub.auth.keys import check_secret_key
from hub.config import HubSettings
from hub.encryption import parse_keys
from hub.errors import HubError, RateLimited
from hub.events import EventBus
from hub.masking import MASKER
from shared.clock import Clock

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
OPENAPI_URL = f"{API_PREFIX}/openapi.json"
DOCS_URL = "/api/docs"
_DOCS_ASSETS = f"{DOCS_URL}/assets"

Readiness = Callable[[], dict[str, bool]]

#: Routes anyone may call, as (method, path template); HEAD counts as GET.
#: Liveness and readiness are for load balancers and orchestrators; the
#: login form must be reachable logged out; the API docs and the OpenAPI
#: document describe the API, hold no data, and every operation in them
#: still needs a token (hiding them would only hide what the code on
#: GitHub shows anyway).
PUBLIC_ROUTES = frozenset(
    {
        ("GET", f"{API_PREFIX}/healthz"),
        ("GET", f"{API_PREFIX}/readyz"),
        ("GET", "/login"),
        ("POST", "/login"),
        ("GET", OPENAPI_URL),
        ("GET", DOCS_URL),
    }
)
#: Agent-facing routes: no user; each authenticates the agent itself
#: (the HTTP sync checks the agent's credential before reading anything).
AGENT_ROUTES = frozenset(
    {
        ("POST", f"{API_PREFIX}/agents/{{agent_id}}/sync"),
        ("GET", f"{API_PREFIX}/agents/{{agent_id}}/sync"),
        # Authenticated by the one-time enrolment token in its body.
        ("POST", f"{API_PREFIX}/enroll"),
        # Firmware downloads, signed by the agent (hub/api/routes/artifacts.py).
        ("GET", f"{API_PREFIX}/artifacts/{{artifact_id}}/manifest"),
        ("GET", f"{API_PREFIX}/artifacts/{{artifact_id}}/image"),
    }
)
#: Mounted apps served without a user: the dashboard's JS/CSS and the Swagger UI assets.
PUBLIC_MOUNTS = frozenset({"/static", _DOCS_ASSETS})


def create_app(
    settings: HubSettings,
    sessions: sessionmaker[Session],
    events: EventBus,
    clock: Clock,
    readiness: Readiness | None = None,
    *,
    extra_routers: Sequence[APIRouter] = (),
    mounts: Mapping[str, ASGIApp] | None = None,
) -> FastAPI:
    """Build the hub's HTTP application.

    ``readiness`` returns named checks for ``/api/v1/readyz`` (for example
    ``{"broker": True, "scheduler": True}``); the database check is built in.
    ``extra_routers`` and ``mounts`` let the composition root add the
    dashboard, which this package may not import (``hub.api`` and ``hub.web``
    are independent siblings)::

        from hub.web import views
        app = create_app(settings, sessions, events, clock, readiness,
                         extra_routers=[views.router],
                         mounts={views.STATIC_PATH: views.static_files()})

    The parts are kept on ``app.state`` (``settings``, ``sessions``,
    ``events``, ``clock``, ``readiness``) for routes and views to use.
    """
    check_secret_key(settings.secret_key)
    app = FastAPI(
        title="Outpost hub API",
        version="1",
        summary="Edge-to-cloud workflow orchestrator: DAGs, runs, task instances, agents.",
        openapi_url=OPENAPI_URL,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.events = events
    app.state.clock = clock
    app.state.readiness = readiness
    # HubRuntime refuses to start without keys; an app built bare (tests of
    # other routes) answers 503 secrets_unavailable on the secret routes.
    app.state.cipher = parse_keys(settings.fernet_keys) if settings.fernet_keys else None
    if app.state.cipher is not None and sessions is not None:
        MASKER.set_source(vault.secret_values(sessions, app.state.cipher))

    for router in (
        dags.router, runs.router, operations.router, pools.router, backfills.router, assets.router, agents.router, conflicts.router, security.router, sync.router, enrolment.router, health.router,
        variables.router, connections.router, users.router, audit_log.router,
        artifacts.router, rollouts.router,
    ):
        app.include_router(router, prefix=API_PREFIX)
    _install_docs(app)
    for router in extra_routers:
        app.include_router(router)
    for path, asgi in (mounts or {}).items():
        app.mount(path, asgi)

    _document_error_shape(app)
    # Every route of this app, whoever added it, passes through here first.
    app.add_middleware(AuthMiddleware, router=app.router, state=app.state, public=PUBLIC_ROUTES | AGENT_ROUTES, public_mounts=PUBLIC_MOUNTS)
    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
    return app


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _hub_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubError)
    response = error_response(exc.status, exc.code, str(exc))
    if isinstance(exc, RateLimited):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", "; ".join(_describe(e) for e in exc.errors()))


async def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
    # A number past what the database stores (SQLite: 64-bit signed), in a
    # path, query or body: the request's fault, not the hub's (found by the
    # API fuzz test; it was a 500).
    return error_response(422, "invalid_request", f"a number in the request is out of range (at most {2**63 - 1}): {exc}")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(404, "not_found", f"no such endpoint: {request.method} {request.url.path}; see {OPENAPI_URL}")
    if exc.status_code == 405:
        return error_response(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}; see {OPENAPI_URL}")
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error in the hub; the hub log has the details")


def _describe(error: Any) -> str:
    """One problem as ``where: what``, e.g. ``query.limit: Input should be
    less than or equal to 1000`` or ``conf: Input should be a valid dictionary``."""
    loc = [str(part) for part in error.get("loc", ())]
    if len(loc) > 1 and loc[0] == "body":
        loc = loc[1:]
    return f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}"


def _document_error_shape(app: FastAPI) -> None:
    """Make the OpenAPI document tell the truth about 422 answers: they
    have the one error shape, not FastAPI's default validation body."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = generate()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                if "422" in operation.get("responses", {}):
                    operation["responses"]["422"] = {
                        "description": "Invalid request (code invalid_request).",
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
        # ErrorResponse is already there: routes name it for their 404s.
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        # Every operation but the public and agent ones takes an API token (hub.api.security).
        schema["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API token (opt_...): outpost-hub tokens create."}}
        open_paths = PUBLIC_ROUTES | AGENT_ROUTES
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if (method.upper(), path) not in open_paths:
                    operation["security"] = [{"bearerAuth": []}]
                    operation.setdefault("responses", {}).setdefault("401", {"description": "No or bad credentials (code unauthorized).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
                    operation["responses"].setdefault("403", {"description": "The role does not allow it (code forbidden).", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_docs(app: FastAPI) -> None:
    assets = files("fastapi_offline") / "static"
    app.mount(_DOCS_ASSETS, StaticFiles(directory=str(assets)), name="api-docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title="Outpost hub API",
            swagger_js_url=f"{_DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_DOCS_ASSETS}/favicon.png",
            # Swagger UI would ask validator.swagger.io for a badge: offline hubs cannot.
            swagger_ui_parameters={"validatorUrl": None},
        )
