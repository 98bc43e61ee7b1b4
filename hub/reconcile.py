"""Reports that disagree with what the hub decided, applied through the
conflict rule (``shared.conflicts.resolve``; the rules are documented there
and, for operators, in docs/conflicts.md).

Ingestion calls :func:`reconcile` for every result that no longer decides
its task instance the normal way (its try was given up, cancelled, cleared,
marked, or another success came first). It loads every report about that
instance (its ``task_results`` and ``decisions``), resolves them, and
applies the difference in the caller's transaction: a late success that
wins becomes the instance's outcome (its other open assignments are
cancelled; what a terminal failure decided is re-opened: downstream
``upstream_failed`` instances reset, a finished run queued again), and
each override is stored once in ``conflicts`` (unique on instance and key,
so a redelivered result never records it twice).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub import events as ev
from hub.errors import InvalidRequest
from hub.lifecycle import cancel_assignments, finish_try, reopen_run, reset_for_rerun, tasks_spec
from hub.models import ConflictRecord, DagRun, Decision, TaskInstance, TaskResult
from shared.conflicts import RULES, DeviceResult, HubDecision, OperatorAction, Override, Report, Resolution, resolve
from shared.hlc import HLC, HybridClock
from shared.states import FINISHED, RunState, TaskState

#: Is this agent's clock trusted? (Clock-skew detection decides; default: yes.)
ClockTrust = Callable[[str], bool]


def _trusted(_agent_id: str) -> bool:
    return True


def reconcile(
    session: Session, ti: TaskInstance, now: datetime, hlc: HybridClock, emitted: list[tuple[str, dict[str, Any]]],
    *, trusted: ClockTrust | None = None,
) -> list[ConflictRecord]:
    """Bring ``ti`` in line with the conflict rule for every report about
    it, in the caller's transaction; returns the conflict records it added.
    ``trusted(agent_id)`` says whether that device's clock may explain its
    results (a skewed one is ordered by the hub's receive stamp instead).
    Events to send after the commit go into ``emitted``."""
    session.flush()  # the result being ingested is part of the set
    reports, results = load_reports(session, ti.id, trusted)
    resolution = resolve(reports)
    added = _record(session, ti, resolution, results, now, emitted)
    winner = resolution.output_from
    if resolution.state == TaskState.SUCCESS and winner is not None:
        row = results[winner.ref]
        if not (ti.state == TaskState.SUCCESS and row.applied):
            _apply_success(session, ti, row, resolution, now, hlc, emitted)
    return added


def load_reports(session: Session, ti_id: int, trusted: ClockTrust | None = None) -> tuple[list[Report], dict[str, TaskResult]]:
    """Every report about one task instance as ``shared.conflicts`` sees
    it, and the result rows by report ref."""
    trusted = trusted or _trusted
    reports: list[Report] = []
    results: dict[str, TaskResult] = {}
    for row in session.scalars(select(TaskResult).where(TaskResult.ti_id == ti_id).order_by(TaskResult.id)):
        ref = f"result:{row.assignment_id}"
        results[ref] = row
        reports.append(DeviceResult(
            ref, row.try_number, row.agent_id, "success" if row.status == "success" else "failed",
            _stamp(row.hlc, row.received_at), _received(row), trusted(row.agent_id), bool((row.error or {}).get("retryable", True)),
        ))
    for d in session.scalars(select(Decision).where(Decision.ti_id == ti_id).order_by(Decision.id)):
        stamp = _stamp(d.hlc, d.created_at)
        if d.source == "hub":
            reports.append(HubDecision(f"decision:{d.id}", d.kind, d.try_number, stamp, d.agent_id))
        else:
            reports.append(OperatorAction(f"decision:{d.id}", d.kind, d.try_number, stamp, d.actor or "operator", TaskState(d.state) if d.state else None))
    return reports, results


def _apply_success(session: Session, ti: TaskInstance, row: TaskResult, resolution: Resolution, now: datetime, hlc: HybridClock, emitted: list[tuple[str, dict[str, Any]]]) -> None:
    was = TaskState(ti.state)
    if ti.started_at is None:
        ti.started_at = now
    finish_try(ti, success=True, now=now, output=row.output)
    ti.next_try_at = None
    row.applied = True
    # The device's success settles the instance: work still out elsewhere is moot.
    cancel_assignments(session, [ti.id], now, hlc, f"try {row.try_number} already succeeded on {row.agent_id}")
    emitted.append((ev.RESULT_APPLIED, {"ti_id": ti.id, "state": str(TaskState.SUCCESS)}))
    emitted.append((ev.OUTBOX_WRITTEN, {}))
    if was in FINISHED and resolution.reopen:
        _reopen(session, ti, emitted)
    else:
        emitted.append((ev.RUN_TRIGGERED, {"dag_id": ti.dag_id, "run_pk": ti.run_pk}))


def _reopen(session: Session, ti: TaskInstance, emitted: list[tuple[str, dict[str, Any]]]) -> None:
    """Undo what the failure decided: downstream instances it made
    ``upstream_failed`` go back to ``none`` (as a clear does), and the run,
    if that failure finished it, is queued again."""
    run = session.get(DagRun, ti.run_pk)
    if run is None:
        return
    tasks = tasks_spec(session, run)
    downstream = _downstream(tasks, ti.task_id)
    reset = list(session.scalars(
        select(TaskInstance).where(TaskInstance.run_pk == run.id, TaskInstance.task_id.in_(downstream), TaskInstance.state == TaskState.UPSTREAM_FAILED)
    )) if downstream else []
    for other in reset:
        reset_for_rerun(other, int((tasks.get(other.task_id) or {}).get("retries", max(other.max_tries - 1, 0))))
    if reset or run.state == RunState.FAILED:
        reopen_run(run)
    emitted.append((ev.RUN_TRIGGERED, {"dag_id": run.dag_id, "run_pk": run.id}))


def _downstream(tasks: dict[str, dict[str, Any]], task_id: str) -> set[str]:
    below: dict[str, set[str]] = {}
    for tid, task in tasks.items():
        for up in task.get("upstream", ()):
            below.setdefault(up, set()).add(tid)
    seen: set[str] = set()
    stack = [task_id]
    while stack:
        for nxt in below.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _record(session: Session, ti: TaskInstance, resolution: Resolution, results: dict[str, TaskResult], now: datetime, emitted: list[tuple[str, dict[str, Any]]]) -> list[ConflictRecord]:
    if not resolution.overrides:
        return []
    existing = set(session.scalars(select(ConflictRecord.key).where(ConflictRecord.ti_id == ti.id)))
    added: list[ConflictRecord] = []
    for override in resolution.overrides:
        if override.key in existing:
            continue
        existing.add(override.key)
        device = override.overridden if isinstance(override.overridden, DeviceResult) else override.kept
        record = ConflictRecord(
            ti_id=ti.id, key=override.key[:300], run_pk=ti.run_pk, dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, map_index=ti.map_index,
            agent_id=device.agent_id if isinstance(device, DeviceResult) else getattr(override.overridden, "agent_id", None),
            rule=override.rule, kept=_side(override.kept, results), overridden=_side(override.overridden, results),
            resolution=_resolution_text(override, resolution), created_at=now,
        )
        session.add(record)
        added.append(record)
        emitted.append((ev.CONFLICT_RECORDED, {"ti_id": ti.id, "dag_id": ti.dag_id, "run_pk": ti.run_pk, "rule": override.rule, "agent_id": record.agent_id}))
    return added


def _resolution_text(override: Override, resolution: Resolution) -> str:
    outcome = f" Outcome: {resolution.state}." if resolution.state is not None else " Outcome: the instance follows its newer tries."
    return override.explanation + outcome


def _side(report: Report, results: dict[str, TaskResult]) -> dict[str, Any]:
    """One side of a conflict as the record stores it (JSON)."""
    if isinstance(report, DeviceResult):
        row = results[report.ref]
        return {
            "type": "result", "assignment_id": row.assignment_id, "try_number": row.try_number, "agent_id": row.agent_id,
            "status": row.status, "output": row.output, "error": row.error, "device_hlc": row.hlc, "received_hlc": str(report.received),
            "clock_trusted": report.trusted, "received_at": row.received_at.isoformat() if row.received_at else None,
        }
    if isinstance(report, HubDecision):
        return {"type": "hub_decision", "kind": report.kind, "try_number": report.try_number, "agent_id": report.agent_id, "hlc": str(report.hlc)}
    assert isinstance(report, OperatorAction)
    return {"type": "operator_action", "kind": report.kind, "state": report.state, "try_number": report.try_number, "actor": report.actor, "hlc": str(report.hlc)}


def _received(row: TaskResult) -> HLC:
    if row.received_hlc:
        try:
            return HLC.parse(row.received_hlc)
        except ValueError:
            pass
    return HLC(int(row.received_at.timestamp() * 1000), 0, "hub")


def _stamp(text: str, fallback: datetime) -> HLC:
    # A stamp that does not parse (a result stored before stamps were
    # checked) falls back to the hub's own time of the row.
    try:
        return HLC.parse(text)
    except ValueError:
        return HLC(int(fallback.timestamp() * 1000), 0, "hub")


# --- reading them back (API, dashboard) ------------------------------------------


def list_conflicts(
    session: Session, *, dag_id: str | None = None, run_pk: int | None = None, task_id: str | None = None, map_index: int | None = None,
    agent_id: str | None = None, rule: str | None = None, limit: int = 100, offset: int = 0, dag_ids: Collection[str] | None = None,
) -> dict[str, Any]:
    """Conflict records, newest first, as a page, plus ``counts`` per rule
    over every record (filters do not apply). An unknown ``rule`` is an
    error naming the rules."""
    if rule is not None and rule not in RULES:
        raise InvalidRequest(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    stmt = select(ConflictRecord)
    if dag_ids is not None:  # a user's scope
        stmt = stmt.where(ConflictRecord.dag_id.in_(dag_ids))
    for column, value in ((ConflictRecord.dag_id, dag_id), (ConflictRecord.run_pk, run_pk), (ConflictRecord.task_id, task_id),
                          (ConflictRecord.map_index, map_index), (ConflictRecord.agent_id, agent_id), (ConflictRecord.rule, rule)):
        if value is not None:
            stmt = stmt.where(column == value)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(stmt.order_by(ConflictRecord.id.desc()).limit(limit).offset(offset))
    by_rule = select(ConflictRecord.rule, func.count()).group_by(ConflictRecord.rule).order_by(ConflictRecord.rule)
    if dag_ids is not None:
        by_rule = by_rule.where(ConflictRecord.dag_id.in_(dag_ids))
    counts = dict(session.execute(by_rule).all())
    return {"items": [conflict_dict(c) for c in rows], "total": total, "limit": limit, "offset": offset, "counts": {r: counts.get(r, 0) for r in RULES}}


def conflict_dict(c: ConflictRecord) -> dict[str, Any]:
    return {
        "id": c.id, "dag_id": c.dag_id, "run_pk": c.run_pk, "run_id": c.run_id, "task_id": c.task_id, "map_index": c.map_index,
        "ti_id": c.ti_id, "agent_id": c.agent_id, "rule": c.rule, "kept": c.kept, "overridden": c.overridden,
        "resolution": c.resolution, "created_at": c.created_at,
    }
