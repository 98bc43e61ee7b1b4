"""The conflict rule: what the hub holds for one task instance, decided
from the *set* of reports about it.

While a device is offline the hub may give its try up (an execution
timeout, ``offline_grace``, a run's deadline) and an operator may mark,
cancel or clear the instance; meanwhile the device may finish the try
anyway. :func:`resolve` takes every report about one task instance and
returns the outcome and the overrides. It is pure (no I/O, no clock),
deterministic (the same set gives the same answer in any order),
idempotent (a report given twice counts once) and explainable (each
override names its rule and says why in words). ``docs/conflicts.md``
is the operator's version of this docstring.

The rules, in order:

R1 ``operator_wins``. An operator action made at try *n* (mark, cancel,
   clear) covers tries 1..n. A device result for a covered try is never
   applied. If the hub received it *after* a covering action, it is an
   override (recorded once, against the earliest such action); if the
   hub had it before the action, the operator decided knowing it and
   nothing is recorded. When no later try exists, the latest action
   (hub stamp order, then ref) decides the state: a mark or cancel its
   state; a clear lets the new tries decide.
R2 ``device_success_wins``. A success for a try no operator action
   covers makes the instance succeed, even when the hub gave that try up
   automatically (the give-up is overridden and recorded) and even when
   the instance had already gone terminal. The hub then re-opens what the
   failure decided (``reopen``), unless a run deadline is among the
   reports: a run that timed out stays failed, only the instance flips.
   ``duplicate_success``: the kept success is the *first the hub
   received*; any other success is a duplicate, recorded, its output
   discarded. (Not the earliest by device stamp: the first one received
   may already have fed downstream tasks, XComs and callbacks, and an
   output once applied is never silently replaced.)
R3 Otherwise nothing is overridden: failures follow the normal retry
   accounting (``state`` None), and a late failure for a try the hub
   already gave up agrees with it and is just kept.

Outcomes depend on hub stamps only (when the hub decided, when it
received a report), all issued by the hub's clock. A device's own stamp
(``finished``) only explains, and only when ``trusted``: a device with a
skewed clock cannot win or lose anything by it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shared.hlc import HLC
from shared.states import TaskState

#: Hub decisions that give a try up without a result from its device.
AUTOMATIC_KINDS = frozenset({"execution_timeout", "offline_grace", "deadline"})
#: What an operator can do to a task instance.
OPERATOR_KINDS = frozenset({"mark", "cancel", "clear"})

RULE_OPERATOR = "operator_wins"
RULE_SUCCESS = "device_success_wins"
RULE_DUPLICATE = "duplicate_success"
RULES = (RULE_OPERATOR, RULE_SUCCESS, RULE_DUPLICATE)


@dataclass(frozen=True)
class DeviceResult:
    """A device's result for one try. ``ref`` is unique per report (the
    hub uses the assignment id). ``finished`` is the device's stamp;
    ``received`` the hub's stamp when it took the result in."""

    ref: str
    try_number: int
    agent_id: str
    status: Literal["success", "failed"]
    finished: HLC
    received: HLC
    trusted: bool = True
    retryable: bool = True

    @property
    def order(self) -> HLC:
        """The stamp that orders this result: the device's when its clock
        is trusted, else the hub's receive stamp."""
        return self.finished if self.trusted else self.received


@dataclass(frozen=True)
class HubDecision:
    """The hub gave a try up on its own (``kind`` in AUTOMATIC_KINDS).
    ``agent_id`` None means whichever device held the try."""

    ref: str
    kind: str
    try_number: int
    hlc: HLC
    agent_id: str | None = None


@dataclass(frozen=True)
class OperatorAction:
    """An operator's mark, cancel or clear, made while the instance was at
    try ``try_number``; ``state`` is what a mark or cancel set."""

    ref: str
    kind: str
    try_number: int
    hlc: HLC
    actor: str = "operator"
    state: TaskState | None = None


Report = DeviceResult | HubDecision | OperatorAction


@dataclass(frozen=True)
class Override:
    """One report the outcome overrode, the report that won, the rule."""

    rule: str
    kept: Report
    overridden: Report
    explanation: str

    @property
    def key(self) -> str:
        """Unique per overridden report and rule: the record's identity."""
        return f"{self.rule}/{self.overridden.ref}"


@dataclass(frozen=True)
class Resolution:
    """``state`` is what the hub must hold, or None when no rule overrides
    the normal lifecycle (R3). ``output_from`` is the success whose output
    the instance holds. ``reopen``: if the instance had gone terminal, the
    hub re-opens what that decided (downstream, the run)."""

    state: TaskState | None
    decided_by: Report | None
    output_from: DeviceResult | None
    overrides: tuple[Override, ...]
    reopen: bool = False


def resolve(reports: Iterable[Report]) -> Resolution:
    """Decide the outcome of one task instance from every report about it."""
    unique = _unique(reports)
    results = sorted((r for r in unique if isinstance(r, DeviceResult)), key=lambda r: (r.received, r.ref))
    decisions = sorted((r for r in unique if isinstance(r, HubDecision)), key=lambda r: (r.hlc, r.ref))
    actions = sorted((r for r in unique if isinstance(r, OperatorAction)), key=lambda r: (r.hlc, r.ref))
    overrides: list[Override] = []
    live: list[DeviceResult] = []
    for result in results:
        covering = [a for a in actions if a.try_number >= result.try_number]
        if not covering:
            live.append(result)
            continue
        late_for = [a for a in covering if a.hlc < result.received]
        if late_for:
            overrides.append(Override(RULE_OPERATOR, late_for[0], result, _explain_operator(late_for[0], result)))
    successes = [r for r in live if r.status == "success"]
    if successes:
        winner = successes[0]
        for decision in decisions:
            if decision.try_number == winner.try_number and decision.agent_id in (None, winner.agent_id):
                overrides.append(Override(RULE_SUCCESS, winner, decision, _explain_success(winner, decision)))
        for duplicate in successes[1:]:
            overrides.append(Override(RULE_DUPLICATE, winner, duplicate, _explain_duplicate(winner, duplicate)))
        reopen = not any(d.kind == "deadline" for d in decisions)
        return Resolution(TaskState.SUCCESS, winner, winner, tuple(overrides), reopen)
    latest = actions[-1] if actions else None
    if latest is not None and latest.kind != "clear" and latest.state is not None and not any(r.try_number > latest.try_number for r in live):
        return Resolution(TaskState(latest.state), latest, None, tuple(overrides))
    return Resolution(None, None, None, tuple(overrides))


def _unique(reports: Iterable[Report]) -> list[Report]:
    by_ref: dict[str, Report] = {}
    for report in reports:
        if not isinstance(report, DeviceResult | HubDecision | OperatorAction):
            raise TypeError(f"not a report: {report!r}")
        if isinstance(report, HubDecision) and report.kind not in AUTOMATIC_KINDS:
            raise ValueError(f"hub decision {report.ref!r}: kind {report.kind!r} is not one of {sorted(AUTOMATIC_KINDS)}")
        if isinstance(report, OperatorAction) and report.kind not in OPERATOR_KINDS:
            raise ValueError(f"operator action {report.ref!r}: kind {report.kind!r} is not one of {sorted(OPERATOR_KINDS)}")
        seen = by_ref.setdefault(report.ref, report)
        if seen != report:
            raise ValueError(f"two different reports share ref {report.ref!r}: {seen!r} and {report!r}")
    return list(by_ref.values())


def _sentence(text: str) -> str:
    # Not str.capitalize(): it lowercases the rest, and agent ids and actor
    # names are case-sensitive ("Edge-7B" must not read "edge-7b").
    return text[:1].upper() + text[1:]


def _side(report: Report) -> str:
    if isinstance(report, DeviceResult):
        return f"device {report.agent_id}'s {report.status} for try {report.try_number}"
    if isinstance(report, HubDecision):
        return f"the hub's {report.kind} give-up of try {report.try_number}" + (f" on {report.agent_id}" if report.agent_id else "")
    what = f"{report.kind} {report.state}" if report.kind == "mark" else report.kind
    return f"operator {report.actor}'s {what} (at try {report.try_number})"


def _explain_operator(action: OperatorAction, result: DeviceResult) -> str:
    then = "voided that try; the new tries decide" if action.kind == "clear" else f"set {action.state}"
    return f"{_sentence(_side(result))} arrived after {_side(action)}, which {then}. The result is kept, not applied."


def _explain_success(winner: DeviceResult, decision: HubDecision) -> str:
    if winner.trusted:
        when = "had finished before the hub gave up" if winner.finished < decision.hlc else "finished after the hub gave up"
    else:
        when = "finished at a time its untrusted clock cannot tell"
    return f"{_sentence(_side(decision))} was overridden: the device {when}, and a device's success is never lost to an automatic decision. The instance succeeds with that output."


def _explain_duplicate(winner: DeviceResult, duplicate: DeviceResult) -> str:
    return f"{_sentence(_side(duplicate))} came after {_side(winner)}, which the hub received first and keeps. The duplicate's output is discarded."
