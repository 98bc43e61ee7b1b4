"""Liveness and readiness probes."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from hub.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


@router.get("/healthz", response_model=Health)
def healthz() -> dict[str, str]:
    """Liveness: the process answers. Always 200."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "A check failed."}})
def readyz(request: Request) -> JSONResponse:
    """Readiness: the database answers and every check the hub registered
    (broker connected, scheduler alive, ...) is true; 503 otherwise."""
    checks = {"database": _database_ok(request)}
    readiness = request.app.state.readiness
    if readiness is not None:
        try:
            checks.update({name: bool(ok) for name, ok in readiness().items()})
        except Exception:
            log.exception("readiness callback failed")
            checks["readiness_callback"] = False
    ready = all(checks.values())
    body = {"status": "ready" if ready else "not_ready", "checks": checks}
    return JSONResponse(body, status_code=200 if ready else 503)


def _database_ok(request: Request) -> bool:
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except SQLAlchemyError as exc:
        log.warning("readiness: database unreachable: %s", exc)
        return False
