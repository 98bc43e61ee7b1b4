"""Dashboard pages of staged rollouts: ``/rollouts`` (newest first, filter
by state and DAG) and ``/rollouts/{id}`` (phase, batch, devices per state,
the failure rate against the threshold, the devices with links to their
task instance's run page and try logs), and ``POST
/rollouts/{id}/action`` (pause, resume, abort; operator role, CSRF token,
audited; 303 back to the page)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from hub import rollout_queries, rollouts
from hub.auth import scope
from hub.errors import DagNotFound, HubError, InvalidRequest
from hub.web.views import _by, _error_page, _form_field, _render, _same_origin, _secure, _who

router = APIRouter(include_in_schema=False)
ACTIONS = ("pause", "resume", "abort")
_PAGE = 200


def _times(item: dict[str, Any]) -> dict[str, Any]:
    """ISO strings from the queries back to datetimes, for the time macros."""
    return {**item, **{k: datetime.fromisoformat(v) if isinstance(v, str) else v for k, v in item.items() if k.endswith(("_at", "deadline"))}}


@router.get("/rollouts", response_class=HTMLResponse)
def rollout_list(request: Request) -> Response:
    params = request.query_params
    filters = {name: params[name][:250] for name in ("state", "dag_id") if params.get(name)}
    try:
        with request.app.state.sessions() as session:
            page = rollout_queries.list_rollouts(session, state=filters.get("state"), dag_id=filters.get("dag_id"), limit=200,
                                                 dag_ids=scope.visible_dag_ids(session, _who(request)))
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "rollouts.html", nav="rollouts", rollouts=[_times(r) for r in page["items"]], total=page["total"], filters=filters,
                   states=rollouts.ROLLOUT_STATES)


def _check(session: Any, request: Request, rollout_id: int) -> None:
    record = rollout_queries.get_record(session, rollout_id)
    try:
        scope.check_dag(session, _who(request), record.dag_id)
    except DagNotFound:
        raise rollouts.RolloutNotFound(f"no rollout {rollout_id}") from None


@router.get("/rollouts/{rollout_id}", response_class=HTMLResponse)
def rollout_detail(request: Request, rollout_id: int) -> Response:
    state = request.query_params.get("state") or None
    try:
        offset = max(0, int(request.query_params.get("offset") or 0))
    except ValueError:
        return _error_page(request, InvalidRequest("offset must be a number"))
    try:
        with request.app.state.sessions() as session:
            _check(session, request, rollout_id)
            rollout = rollout_queries.get_rollout(session, rollout_id)
            devices = rollout_queries.list_devices(session, rollout_id, state=state, limit=_PAGE, offset=offset)
    except HubError as exc:
        return _error_page(request, exc)
    # The bar's scale: the threshold sits at two thirds of it, so both stay visible.
    scale = max(rollout["failure_threshold"] * 1.5, rollout["failure_rate"], 0.01)
    return _render(request, "rollout.html", nav="rollouts", rollout=_times(rollout), devices=[_times(d) for d in devices["items"]],
                   device_total=devices["total"], offset=offset, page_size=_PAGE, state_filter=state, scale=scale,
                   device_states=rollouts.DEVICE_STATES)


@router.post("/rollouts/{rollout_id}/action")
async def rollout_action(request: Request, rollout_id: int) -> Response:
    if not _same_origin(request):
        return _error_page(request, InvalidRequest("cross-site form posts are refused"), status=403)
    app = request.app.state
    try:
        action = await _form_field(request, "action")
        reason = (await _form_field(request, "reason"))[:500]
        if action not in ACTIONS:
            raise InvalidRequest(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")

        def run() -> None:
            with app.sessions() as session:
                _check(session, request, rollout_id)
            rollouts.act(app.sessions, app.events, app.clock, rollout_id, action, by=_by(request), reason=reason)

        await run_in_threadpool(run)
    except HubError as exc:
        return _error_page(request, exc)
    return _secure(RedirectResponse(f"/rollouts/{rollout_id}", status_code=303))
