"""Task-instance states and the transitions the hub may make."""

from __future__ import annotations

from shared.states import FINISHED, LEGAL_TRANSITIONS, UNFINISHED, RunState, TaskState, can_transition

AIRFLOW_STATES = {"none", "scheduled", "queued", "running", "success", "failed", "up_for_retry", "up_for_reschedule", "skipped", "upstream_failed", "removed", "deferred"}


def test_airflow_states_keep_their_names_and_edge_states_are_added() -> None:
    assert {s.value for s in TaskState} == AIRFLOW_STATES | {"delivered", "device_offline"}


def test_finished_and_unfinished_partition_the_states() -> None:
    assert FINISHED | UNFINISHED == set(TaskState) and not FINISHED & UNFINISHED
    assert FINISHED == {TaskState.SUCCESS, TaskState.FAILED, TaskState.SKIPPED, TaskState.UPSTREAM_FAILED, TaskState.REMOVED}


def test_every_state_has_a_transition_entry_and_none_to_itself() -> None:
    assert set(LEGAL_TRANSITIONS) == set(TaskState)
    for state, targets in LEGAL_TRANSITIONS.items():
        assert state not in targets


def test_finished_states_only_leave_by_being_cleared() -> None:
    for state in FINISHED:
        assert LEGAL_TRANSITIONS[state] == {TaskState.NONE}


def test_every_state_is_reachable_and_every_unfinished_state_can_finish() -> None:
    def reachable(start: TaskState) -> set[TaskState]:
        seen, todo = {start}, [start]
        while todo:
            for nxt in LEGAL_TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert reachable(TaskState.NONE) == set(TaskState)
    for state in UNFINISHED:
        assert reachable(state) & FINISHED, f"{state} can never finish"


def test_the_edge_lifecycle_is_legal() -> None:
    path = [TaskState.NONE, TaskState.SCHEDULED, TaskState.QUEUED, TaskState.DELIVERED, TaskState.DEVICE_OFFLINE, TaskState.RUNNING, TaskState.SUCCESS]
    assert all(can_transition(a, b) for a, b in zip(path, path[1:]))


def test_illegal_transitions_are_refused() -> None:
    assert not can_transition(TaskState.SUCCESS, TaskState.RUNNING)
    assert not can_transition(TaskState.NONE, TaskState.RUNNING)
    assert not can_transition(TaskState.RUNNING, TaskState.QUEUED)


def test_states_are_strings_on_the_wire() -> None:
    assert TaskState("up_for_retry") is TaskState.UP_FOR_RETRY and f"{TaskState.RUNNING}" == "running"
    assert {s.value for s in RunState} == {"queued", "running", "success", "failed"}
