"""The dashboard: server-rendered pages over ``hub.queries``.

Pages: ``/`` (DAGs and import errors), ``/dags/{dag_id}``, ``/runs``, ``/security``,
``/runs/{run_pk}``, ``/runs/{run_pk}/tasks/{ti_id}/tries/{n}/log`` (a device try's log), ``/agents``, ``/agents/{agent_id}``, ``/pools`` (pools
and deadline misses), ``/conflicts``; actions
``POST /dags/{dag_id}/trigger`` (303 to the new run) and
``POST /runs/{run_pk}/action`` (clear, rerun, mark; 303 back to the run). Jinja2 autoescapes
every value, so device-supplied strings (hostnames, labels, outputs) are
text, never markup. No inline script or style and no CDN: every response
carries ``Content-Security-Policy: default-src 'self'`` and the JS/CSS come
from ``/static``. ``static/app.js`` keeps pages live by re-fetching the
page and swapping its ``<main>``.

The composition root wires it (``hub.api`` may not import this package)::

    app = create_app(..., extra_routers=[views.router],
                     mounts={views.STATIC_PATH: views.static_files()})

The views use ``app.state.sessions``, ``.events`` and ``.clock``, which
``create_app`` sets.

Who may see and do what is decided before a view runs (``hub.api.security``:
a login, the role, the CSRF token of every session-authenticated POST); the
views render the user (``request.state.principal``), hide the action forms
from viewers, put the session's CSRF token in every form, filter by the
user's scope and name the user in the audit log. Login, logout and the
audit page are in ``auth_views``.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub import actions, queries, reconcile, registry, security, tasklogs
from hub import pools as pool_queries
from hub.auth import scope
from hub.auth.roles import Actor, Principal, Role
from hub.errors import HubError, InvalidRequest
from shared.clock import utcnow

STATIC_PATH = "/static"
_MAX_FORM_BYTES = 64 * 1024
_HERE = Path(__file__).parent

#: Sent with every dashboard response, pages and static files alike.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
#: Task-instance, run and agent states that have a badge colour; others look neutral.
_BADGE_STATES = frozenset(
    {
        "none", "scheduled", "queued", "delivered", "running", "success", "failed", "up_for_retry", "skipped",
        "upstream_failed", "removed", "device_offline", "online", "offline", "paused", "active", "inactive",
        "deferred", "pending", "notified", "succeeded", "timed_out", "aborted", "completed",
    }
)

router = APIRouter(include_in_schema=False)


def static_files() -> ASGIApp:
    """The dashboard's JS/CSS, to mount at ``STATIC_PATH``."""
    return _WithHeaders(StaticFiles(directory=str(_HERE / "static")))


# --- pages ----------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
def dag_list(request: Request) -> Response:
    with request.app.state.sessions() as session:
        dags = queries.list_dags(session, is_active=True, limit=1000, dag_ids=scope.visible_dag_ids(session, _who(request)))
        errors = queries.list_import_errors(session, limit=1000, filelocs=scope.visible_filelocs(session, _who(request)))
    return _render(request, "dags.html", nav="dags", dags=dags, import_errors=errors)


@router.get("/dags/{dag_id}", response_class=HTMLResponse)
def dag_detail(request: Request, dag_id: str) -> Response:
    try:
        with request.app.state.sessions() as session:
            scope.check_dag(session, _who(request), dag_id)
            dag = queries.get_dag(session, dag_id)
            runs = queries.list_runs(session, dag_id=dag_id, limit=25)
            versions = queries.list_dag_versions(session, dag_id, limit=20)
            # A file that now fails keeps its last good version running: say so here too.
            file_error = next((e for e in queries.list_import_errors(session, limit=1000)["items"] if e["fileloc"] == dag["fileloc"]), None)
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "dag.html", nav="dags", dag=dag, tasks=dag["structure"].get("tasks", []), runs=runs, versions=versions, file_error=file_error)


@router.post("/dags/{dag_id}/trigger")
async def trigger(request: Request, dag_id: str) -> Response:
    """Trigger a manual run and go to its page (303, so reload does not re-post).
    The form's optional ``conf`` field is a JSON object."""
    if not _same_origin(request):
        return _error_page(request, InvalidRequest("cross-site form posts are refused"), status=403)
    state = request.app.state
    try:
        conf = _parse_conf(await _form_field(request, "conf"))
        await run_in_threadpool(_check_scope, request, scope.check_dag, dag_id)
        run_pk = await run_in_threadpool(lambda: actions.trigger(state.sessions, state.events, state.clock, dag_id, conf, by=_by(request)))
    except HubError as exc:
        return _error_page(request, exc)
    return _secure(RedirectResponse(f"/runs/{run_pk}", status_code=303))


@router.get("/runs", response_class=HTMLResponse)
def run_list(request: Request) -> Response:
    with request.app.state.sessions() as session:
        runs = queries.list_runs(session, limit=100, dag_ids=scope.visible_dag_ids(session, _who(request)))
    return _render(request, "runs.html", nav="runs", runs=runs)


@router.get("/runs/{run_pk}", response_class=HTMLResponse)
def run_detail(request: Request, run_pk: int) -> Response:
    try:
        with request.app.state.sessions() as session:
            scope.check_run(session, _who(request), run_pk)
            run = queries.get_run(session, run_pk)
            # The structure the run follows: its DAG version's, not the file's latest.
            number = run.get("dag_version_number")
            structure = (queries.get_dag_version(session, run["dag_id"], number) if number is not None else queries.get_dag(session, run["dag_id"]))["structure"]
            conflicts = reconcile.list_conflicts(session, run_pk=run_pk, limit=1)["total"]
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "run.html", nav="runs", run=run, groups=task_groups(run["task_instances"], structure), conflicts=conflicts)


@router.get("/runs/{run_pk}/tasks/{ti_id}/tries/{try_number}/log", response_class=HTMLResponse)
def task_log(request: Request, run_pk: int, ti_id: int, try_number: int) -> Response:
    try:
        with request.app.state.sessions() as session:
            scope.check_run(session, _who(request), run_pk)
            doc = tasklogs.read_log(session, run_pk, ti_id, try_number)
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "task_log.html", nav="runs", log=doc, run_pk=run_pk)


#: The run page's operator actions: clear, rerun, mark (hub.actions).
RUN_ACTIONS = ("clear", "rerun", "mark_success", "mark_failed", "mark_run_success", "mark_run_failed")


@router.post("/runs/{run_pk}/action")
async def run_action(request: Request, run_pk: int) -> Response:
    """Clear a task (optionally with its downstream tasks), mark it success or
    failed, rerun the whole run or mark it success or failed; then back to
    the run page (303)."""
    if not _same_origin(request):
        return _error_page(request, InvalidRequest("cross-site form posts are refused"), status=403)
    state = request.app.state
    try:
        action = await _form_field(request, "action")
        task_id = (await _form_field(request, "task_id")).strip()
        downstream = (await _form_field(request, "downstream")) == "1"
        if action not in RUN_ACTIONS:
            raise InvalidRequest(f"unknown action {action!r}; one of {', '.join(RUN_ACTIONS)}")
        await run_in_threadpool(_check_scope, request, scope.check_run, run_pk)
        by = _by(request)
        if action == "rerun":
            await run_in_threadpool(lambda: actions.clear(state.sessions, state.events, state.clock, run_pk, by=by))
        elif action.startswith("mark_run_"):
            await run_in_threadpool(lambda: actions.set_run_state(state.sessions, state.events, state.clock, run_pk, action.removeprefix("mark_run_"), by=by))
        elif not task_id:
            raise InvalidRequest("choose a task first")
        elif action == "clear":
            await run_in_threadpool(lambda: actions.clear(state.sessions, state.events, state.clock, run_pk, task_ids=[task_id], include_downstream=downstream, by=by))
        else:
            target = action.removeprefix("mark_")
            await run_in_threadpool(lambda: actions.mark(state.sessions, state.events, state.clock, run_pk, target, task_ids=[task_id], include_downstream=downstream, by=by))
    except HubError as exc:
        return _error_page(request, exc)
    return _secure(RedirectResponse(f"/runs/{run_pk}", status_code=303))


@router.get("/pools", response_class=HTMLResponse)
def pool_list(request: Request) -> Response:
    """Pools with their slots in use, and the latest missed SLAs and run timeouts."""
    default_slots = int(getattr(request.app.state.settings, "default_pool_slots", 128))
    with request.app.state.sessions() as session:
        pools = pool_queries.list_pools(session, default_slots, limit=1000)
        misses = pool_queries.list_deadline_misses(session, limit=50)
    return _render(request, "pools.html", nav="pools", pools=pools, misses=misses)


@router.get("/conflicts", response_class=HTMLResponse)
def conflict_list(request: Request) -> Response:
    """Conflict records, newest first; ``dag_id``, ``run``, ``agent_id`` and
    ``rule`` in the query string filter them."""
    params = request.query_params
    filters = {name: params[name] for name in ("dag_id", "run", "agent_id", "rule") if params.get(name)}
    try:
        run = int(filters["run"]) if "run" in filters else None
    except ValueError:
        return _error_page(request, InvalidRequest(f"run must be a run's numeric id, got {filters['run']!r}"))
    try:
        with request.app.state.sessions() as session:
            page = reconcile.list_conflicts(
                session, dag_id=filters.get("dag_id"), run_pk=run, agent_id=filters.get("agent_id"), rule=filters.get("rule"), limit=200,
                dag_ids=scope.visible_dag_ids(session, _who(request)),
            )
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "conflicts.html", nav="conflicts", page=page, filters=filters)


@router.get("/security", response_class=HTMLResponse)
def security_events_page(request: Request) -> Response:
    """Security events, newest first, with counts per code; ``code``,
    ``agent_id`` and ``source`` in the query string filter them. Everything
    shown may come from an attacker: the templates escape it all."""
    params = request.query_params
    filters = {name: params[name][:128] for name in ("code", "agent_id", "source") if params.get(name)}
    with request.app.state.sessions() as session:
        rows, total, counts = security.query(
            session, code=filters.get("code"), agent_id=filters.get("agent_id"), source=filters.get("source"), limit=200,
            agent_ids=scope.visible_agent_ids(session, _who(request)),
        )
    return _render(request, "security.html", nav="security", events=rows, total=total, counts=counts, filters=filters)


@router.get("/agents", response_class=HTMLResponse)
def agent_list(request: Request) -> Response:
    """The device registry: agents filtered by the query string (the API's
    filters: label, group, hardware, firmware, online, job_type, q), 200 a page (``offset``)."""
    empty = {"items": [], "total": 0, "limit": AGENTS_PAGE, "offset": 0}
    try:
        where, filters = registry.from_form(request.query_params)
        offset_text = request.query_params.get("offset") or "0"
        if not (offset_text.isascii() and offset_text.isdigit() and len(offset_text) <= 9):
            raise InvalidRequest(f"offset must be a whole number, got {offset_text[:20]!r}")
        offset = int(offset_text)
    except InvalidRequest as exc:
        return _render(request, "agents.html", 400, nav="agents", agents=empty, online=0, filters={}, error=str(exc))
    with request.app.state.sessions() as session:
        visible = scope.visible_agent_ids(session, _who(request))
        agents = queries.list_agents(session, limit=AGENTS_PAGE, offset=offset, agent_ids=visible, where=where)
        online = queries.list_agents(session, limit=1, agent_ids=visible, where=dataclasses.replace(where, online=True))["total"] if where.online is not False else 0
    pages = {"next": urlencode([*_filter_pairs(request), ("offset", offset + AGENTS_PAGE)]) if offset + AGENTS_PAGE < agents["total"] else None,
             "prev": urlencode([*_filter_pairs(request), ("offset", max(0, offset - AGENTS_PAGE))]) if offset else None}
    return _render(request, "agents.html", nav="agents", agents=agents, online=online, filters=filters, pages=pages, error=None)


#: Agents on one page of the dashboard's registry.
AGENTS_PAGE = 200


def _filter_pairs(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.query_params.multi_items() if k in registry.FORM_FIELDS and v]


@router.get("/agents/{agent_id}", response_class=HTMLResponse)
def agent_detail(request: Request, agent_id: str) -> Response:
    try:
        with request.app.state.sessions() as session:
            scope.check_agent(session, _who(request), agent_id)
            agent = queries.get_agent(session, agent_id, dag_ids=scope.visible_dag_ids(session, _who(request)))
    except HubError as exc:
        return _error_page(request, exc)
    return _render(request, "agent.html", nav="agents", agent=agent)


# --- view logic -------------------------------------------------------------------


def task_groups(task_instances: list[dict[str, Any]], structure: dict[str, Any]) -> list[dict[str, Any]]:
    """Task instances grouped under their task, in the DAG's order (upstream
    first); a fan-out's instances sorted by map index. Tasks that no longer
    exist in the DAG come last, in the order they were created."""
    specs = {t["task_id"]: t for t in structure.get("tasks", [])}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for ti in task_instances:
        by_task.setdefault(ti["task_id"], []).append(ti)
    order = [t for t in specs if t in by_task] + [t for t in by_task if t not in specs]
    groups = []
    for task_id in order:
        instances = sorted(by_task[task_id], key=lambda ti: ti["map_index"])
        groups.append(
            {
                "task_id": task_id,
                "spec": specs.get(task_id, {}),
                "instances": instances,
                "mapped": any(ti["map_index"] >= 0 for ti in instances),
                "counts": dict(sorted(Counter(ti["state"] for ti in instances).items())),
            }
        )
    return groups


async def _form_field(request: Request, name: str) -> str:
    """One field of an urlencoded form post (the dashboard's only kind)."""
    body = await request.body()
    if len(body) > _MAX_FORM_BYTES:
        raise InvalidRequest(f"form is larger than {_MAX_FORM_BYTES} bytes")
    values = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True).get(name, [""])
    return values[0]


def _parse_conf(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        conf = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"conf is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(conf, dict):
        raise InvalidRequest(f"conf must be a JSON object, not {type(conf).__name__}")
    return conf


def _who(request: Request) -> Principal | None:
    """The logged-in user (hub.api.security put it there); None only on public pages."""
    return getattr(request.state, "principal", None)


def _by(request: Request) -> Actor:
    who = _who(request)
    assert who is not None, "actions are never public"
    return who.actor(request.client.host if request.client else "")


def _check_scope(request: Request, check: Any, key: Any) -> None:
    with request.app.state.sessions() as session:
        check(session, _who(request), key)


def _same_origin(request: Request) -> bool:
    """Refuse form posts from other sites (CSRF): browsers send Origin and
    Sec-Fetch-Site with every POST; clients without them are not browsers."""
    if request.headers.get("sec-fetch-site") == "cross-site":
        return False
    origin = request.headers.get("origin")
    if origin is None:
        return True
    return origin != "null" and urlsplit(origin).netloc == request.headers.get("host")


# --- rendering ------------------------------------------------------------------


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "never"
    seconds = int((now - value).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{seconds} s"
    elif seconds < 3600:
        text = f"{seconds // 60} min"
    elif seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        text = f"{hours} h {minutes} min" if minutes else f"{hours} h"
    else:
        days, hours = divmod(seconds // 3600, 24)
        text = f"{days} d {hours} h" if hours else f"{days} d"
    return f"in {text}" if future else f"{text} ago"


def _absolute(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat()


def _duration(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return ""
    seconds = (end - start).total_seconds()
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def _pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def _badge(state: str | None) -> str:
    """CSS class for a state badge; unknown states (from a newer hub or a
    device) get the neutral class rather than reaching the markup."""
    return f"badge badge-{state}" if state in _BADGE_STATES else "badge badge-other"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(absolute=_absolute, iso=_iso, pretty_json=_pretty_json, badge=_badge)
    env.globals.update(ago=_ago, duration=_duration)
    return env


_templates = Jinja2Templates(env=_environment())


def _render(request: Request, template: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("nav", "")
    context["now"] = utcnow(request.app.state.clock)
    who = _who(request)
    context.update(
        user=who, can_operate=who is not None and who.can(Role.OPERATOR), is_admin=who is not None and who.can(Role.ADMIN),
        csrf_token=getattr(request.state, "csrf_token", ""),
    )
    response = _secure(_templates.TemplateResponse(request, template, context, status_code=status))
    # Pages show what a login allows: not kept in the browser's cache for the Back button after logout.
    response.headers["Cache-Control"] = "no-store"
    return response


def _error_page(request: Request, exc: HubError, status: int | None = None) -> Response:
    return _render(request, "error.html", status=status or exc.status, code=exc.code, message=str(exc))


def _secure(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


class _WithHeaders:
    """ASGI wrapper adding ``SECURITY_HEADERS`` to every response of ``app``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).update(SECURITY_HEADERS)
            await send(message)

        await self.app(scope, receive, send_with_headers)


# The login, logout and audit pages live in their own module, on this router.
from hub.web import auth_views as _auth_views  # noqa: E402

router.include_router(_auth_views.router)

# Rollout pages (hub/web/rollout_views.py), on this router too.
from hub.web import rollout_views as _rollout_views  # noqa: E402

router.include_router(_rollout_views.router)
