"""Airflow's trigger rules as one pure function.

Given the states of a task's upstream task instances (a fan-out task counts
once per device), decide whether the task runs now, waits, is skipped or is
marked upstream_failed. The semantics follow Airflow 2.x
``TriggerRuleDep`` with ``flag_upstream_failed`` on, including its early
decisions (``all_success`` fails as soon as one upstream failed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from enum import StrEnum

from shared.states import FINISHED, TaskState


class Decision(StrEnum):
    RUN = "run"
    WAIT = "wait"
    SKIP = "skipped"
    UPSTREAM_FAILED = "upstream_failed"


def decide(trigger_rule: str, upstream_states: Iterable[str]) -> Decision:
    states = [TaskState(s) for s in upstream_states]
    total = len(states)
    if total == 0 or trigger_rule == "always":
        return Decision.RUN
    count = Counter(states)
    success = count[TaskState.SUCCESS]
    skipped = count[TaskState.SKIPPED]
    failed = count[TaskState.FAILED]
    upstream_failed = count[TaskState.UPSTREAM_FAILED]
    removed = count[TaskState.REMOVED]
    done = sum(1 for s in states if s in FINISHED)
    all_done = done >= total
    any_failed = failed + upstream_failed > 0

    match trigger_rule:
        case "all_success":
            if any_failed:
                return Decision.UPSTREAM_FAILED
            if skipped:
                return Decision.SKIP
            return Decision.RUN if success + removed >= total else Decision.WAIT
        case "all_failed":
            if success or skipped:
                return Decision.SKIP
            return Decision.RUN if all_done else Decision.WAIT
        case "all_done":
            return Decision.RUN if all_done else Decision.WAIT
        case "all_skipped":
            if success or any_failed:
                return Decision.SKIP
            return Decision.RUN if all_done else Decision.WAIT
        case "one_success":
            if success:
                return Decision.RUN
            if all_done:
                return Decision.SKIP if done == skipped else Decision.UPSTREAM_FAILED
            return Decision.WAIT
        case "one_failed":
            if any_failed:
                return Decision.RUN
            return Decision.SKIP if all_done else Decision.WAIT
        case "one_done":
            # Airflow counts successes and failures only: an upstream that
            # never ran (upstream_failed) is not "done" for this rule.
            if success or failed:
                return Decision.RUN
            return Decision.SKIP if all_done else Decision.WAIT
        case "none_failed":
            if any_failed:
                return Decision.UPSTREAM_FAILED
            return Decision.RUN if all_done else Decision.WAIT
        case "none_failed_min_one_success":
            if any_failed:
                return Decision.UPSTREAM_FAILED
            if not all_done:
                return Decision.WAIT
            return Decision.RUN if success else Decision.SKIP
        case "none_skipped":
            if skipped:
                return Decision.SKIP
            return Decision.RUN if all_done else Decision.WAIT
    raise ValueError(f"unknown trigger rule {trigger_rule!r}")
