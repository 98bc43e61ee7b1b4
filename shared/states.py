"""Task-instance states: Airflow's, plus the ones an edge device needs."""

from __future__ import annotations

from enum import StrEnum


class TaskState(StrEnum):
    NONE = "none"
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    #: The assignment reached the device's inbox (it sent ``accepted``).
    DELIVERED = "delivered"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    UP_FOR_RETRY = "up_for_retry"
    SKIPPED = "skipped"
    UPSTREAM_FAILED = "upstream_failed"
    REMOVED = "removed"
    #: The target device stopped heartbeating while it held the work.
    DEVICE_OFFLINE = "device_offline"
    #: A sensor in reschedule mode between two pokes: it holds no worker slot.
    UP_FOR_RESCHEDULE = "up_for_reschedule"
    #: Airflow's name for a task that waits on something outside the
    #: scheduler: here a device of a staged rollout waiting for its batch
    #: (hub.rollouts starts it; the scheduler never decides it).
    DEFERRED = "deferred"


FINISHED = frozenset({TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED, TaskState.UPSTREAM_FAILED, TaskState.REMOVED})
#: States in which the task holds (or may hold) a worker or a device.
UNFINISHED = frozenset(TaskState) - FINISHED


class RunState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"


# Which transitions the hub may make. Reports from devices that arrive late are
# not transitions: they go through conflict resolution instead.
_T = TaskState
LEGAL_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    _T.NONE: frozenset({_T.SCHEDULED, _T.QUEUED, _T.SKIPPED, _T.UPSTREAM_FAILED, _T.REMOVED, _T.FAILED, _T.DEFERRED}),
    _T.SCHEDULED: frozenset({_T.QUEUED, _T.SKIPPED, _T.UPSTREAM_FAILED, _T.REMOVED, _T.FAILED, _T.DEFERRED}),
    _T.DEFERRED: frozenset({_T.QUEUED, _T.SKIPPED, _T.REMOVED, _T.FAILED, _T.SUCCESS}),
    _T.QUEUED: frozenset({_T.DELIVERED, _T.RUNNING, _T.SUCCESS, _T.FAILED, _T.UP_FOR_RETRY, _T.DEVICE_OFFLINE, _T.REMOVED}),
    _T.DELIVERED: frozenset({_T.RUNNING, _T.SUCCESS, _T.FAILED, _T.UP_FOR_RETRY, _T.DEVICE_OFFLINE}),
    _T.RUNNING: frozenset({_T.SUCCESS, _T.FAILED, _T.UP_FOR_RETRY, _T.DEVICE_OFFLINE, _T.UP_FOR_RESCHEDULE, _T.SKIPPED}),
    _T.UP_FOR_RESCHEDULE: frozenset({_T.SCHEDULED, _T.QUEUED, _T.FAILED, _T.SKIPPED}),
    # Back to queued when the device returns without the work; to scheduled
    # when offline_grace re-targets it to another device (hub.offline).
    _T.DEVICE_OFFLINE: frozenset({_T.QUEUED, _T.SCHEDULED, _T.DELIVERED, _T.RUNNING, _T.SUCCESS, _T.FAILED, _T.UP_FOR_RETRY}),
    _T.UP_FOR_RETRY: frozenset({_T.SCHEDULED, _T.QUEUED, _T.FAILED}),
    _T.SUCCESS: frozenset({_T.NONE}),
    _T.FAILED: frozenset({_T.NONE}),
    _T.SKIPPED: frozenset({_T.NONE}),
    _T.UPSTREAM_FAILED: frozenset({_T.NONE}),
    _T.REMOVED: frozenset({_T.NONE}),
}


def can_transition(old: TaskState, new: TaskState) -> bool:
    return new in LEGAL_TRANSITIONS[old]
