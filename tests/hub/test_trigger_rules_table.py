"""Every trigger rule, as a table checked against Airflow, then through the
real scheduler (skip propagation, branch joins, cleanup tasks, run state).

Sources, cited per row:

* [doc] Airflow documentation, "DAGs" > "Trigger Rules"
  (docs/apache-airflow/core-concepts/dags.rst): one line per rule, and the
  note that a branch's skip cascades through ``all_success`` and that a join
  after a branch uses ``none_failed_min_one_success``.
* [dep] Airflow's ``TriggerRuleDep._evaluate_direct_relatives``
  (airflow/ti_deps/deps/trigger_rule_dep.py, same logic in 2.x and 3.x) with
  ``flag_upstream_failed`` on, as the scheduler runs it. It works in two
  steps: an *early* verdict that marks the task ``skipped`` or
  ``upstream_failed`` (possibly before every upstream is done), then a pass
  test; a task that is neither marked nor passing *waits*.
* [run] Airflow's ``DagRun.update_state``: once every task instance is
  finished, the run failed if a *leaf* task (one with no downstream) is
  ``failed`` or ``upstream_failed``, otherwise it succeeded.

tests/hub/test_trigger_rules.py keeps the original spot checks; this module
is the complete table, an exhaustive comparison with Airflow's two-step rule
over every combination of up to four upstream states, and the scheduler-level
behaviour.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from sqlalchemy import select

from hub.db import transaction
from hub.lifecycle import finish_try
from hub.models import DagRun, TaskInstance
from hub.trigger_rules import Decision, decide
from shared.clock import utcnow
from shared.states import TaskState

S, F, K, UF, RM = "success", "failed", "skipped", "upstream_failed", "removed"
R, N, Q, RT = "running", "none", "queued", "up_for_retry"
RUN, WAIT, SKIP, UPF = Decision.RUN, Decision.WAIT, Decision.SKIP, Decision.UPSTREAM_FAILED

RULES = (
    "all_success", "all_failed", "all_done", "all_skipped", "one_success", "one_failed", "one_done",
    "none_failed", "none_failed_min_one_success", "none_skipped", "always",
)

# rule, upstream states, decision, source. "early" means Airflow decides
# before every upstream is done.
TABLE: list[tuple[str, list[str], Decision, str]] = [
    ("all_success", [S, S, S], RUN, "doc: all upstream tasks have succeeded"),
    ("all_success", [S, R], WAIT, "dep: a non-success upstream fails the pass test"),
    ("all_success", [S, N], WAIT, "dep: an upstream not started yet is not a success"),
    ("all_success", [S, RT], WAIT, "dep: a failed try that will be retried is not finished"),
    ("all_success", [S, F], UPF, "dep: failed upstream marks upstream_failed"),
    ("all_success", [R, F], UPF, "dep: early, does not wait for the running upstream"),
    ("all_success", [S, UF], UPF, "dep: upstream_failed propagates"),
    ("all_success", [S, K], SKIP, "doc+dep: a skip cascades through all_success"),
    ("all_success", [R, K], SKIP, "dep: early skip"),
    ("all_success", [K, F], UPF, "dep: a failure wins over a skip"),
    ("all_success", [K, UF], UPF, "dep: a failure wins over a skip"),
    ("all_failed", [F, F], RUN, "doc: all upstream tasks failed"),
    ("all_failed", [F, UF], RUN, "doc: failed or upstream_failed"),
    ("all_failed", [UF, UF], RUN, "doc: failed or upstream_failed"),
    ("all_failed", [F, R], WAIT, "dep: a non-failed upstream fails the pass test"),
    ("all_failed", [F, S], SKIP, "dep: a success marks skipped"),
    ("all_failed", [R, S], SKIP, "dep: early skip"),
    ("all_failed", [F, K], SKIP, "dep: a skip marks skipped"),
    ("all_failed", [K, K], SKIP, "dep: a skip marks skipped"),
    ("all_done", [S, F, K, UF], RUN, "doc: all upstream tasks are done"),
    ("all_done", [K, K], RUN, "dep: skipped counts as done"),
    ("all_done", [F, F], RUN, "dep: all_done never marks the task"),
    ("all_done", [F, R], WAIT, "dep: waits for every upstream"),
    ("all_done", [S, N], WAIT, "dep: waits for every upstream"),
    ("all_done", [S, RT], WAIT, "dep: a retry is not done"),
    ("all_skipped", [K, K], RUN, "doc: all upstream tasks skipped"),
    ("all_skipped", [K, R], WAIT, "dep: a non-skipped upstream fails the pass test"),
    ("all_skipped", [K, S], SKIP, "dep: a success marks skipped"),
    ("all_skipped", [K, F], SKIP, "dep: a failure marks skipped"),
    ("all_skipped", [K, UF], SKIP, "dep: upstream_failed marks skipped"),
    ("all_skipped", [R, S], SKIP, "dep: early skip"),
    ("one_success", [S, R], RUN, "doc: does not wait for all upstream tasks"),
    ("one_success", [S, F], RUN, "doc: at least one succeeded"),
    ("one_success", [S, K], RUN, "doc: at least one succeeded"),
    ("one_success", [F, R], WAIT, "dep: no success yet, not done"),
    ("one_success", [K, R], WAIT, "dep: no success yet, not done"),
    ("one_success", [F, F], UPF, "dep: done without a success marks upstream_failed"),
    ("one_success", [F, K], UPF, "dep: done without a success, not all skipped"),
    ("one_success", [UF, K], UPF, "dep: done without a success, not all skipped"),
    ("one_success", [K, K], SKIP, "dep: done and all skipped marks skipped"),
    ("one_failed", [F, R], RUN, "doc: does not wait for all upstream tasks"),
    ("one_failed", [UF, R], RUN, "dep: upstream_failed counts as a failure"),
    ("one_failed", [F, S], RUN, "doc: at least one failed"),
    ("one_failed", [S, R], WAIT, "dep: no failure yet, not done"),
    ("one_failed", [K, R], WAIT, "dep: no failure yet, not done"),
    ("one_failed", [S, K], SKIP, "dep: done without a failure marks skipped"),
    ("one_failed", [S, S], SKIP, "dep: done without a failure marks skipped"),
    ("one_done", [S, R], RUN, "doc: at least one upstream succeeded or failed"),
    ("one_done", [F, R], RUN, "doc: at least one upstream succeeded or failed"),
    ("one_done", [K, R], WAIT, "dep: a skip is neither success nor failure"),
    ("one_done", [UF, R], WAIT, "dep: counts success + failed only, upstream_failed is not 'done' here"),
    ("one_done", [K, K], SKIP, "dep: done without success or failure marks skipped"),
    ("one_done", [UF, UF], SKIP, "dep: done without success or failure marks skipped"),
    ("one_done", [UF, K], SKIP, "dep: done without success or failure marks skipped"),
    ("one_done", [UF, F], RUN, "dep: the failed upstream counts"),
    ("none_failed", [S, K], RUN, "doc: all upstream tasks succeeded or were skipped"),
    ("none_failed", [K, K], RUN, "doc: all skipped is fine (unlike none_failed_min_one_success)"),
    ("none_failed", [S, R], WAIT, "dep: waits for every upstream"),
    ("none_failed", [S, F], UPF, "dep: a failure marks upstream_failed"),
    ("none_failed", [R, UF], UPF, "dep: early upstream_failed"),
    ("none_failed_min_one_success", [S, K], RUN, "doc: no failure and at least one success (the branch join)"),
    ("none_failed_min_one_success", [S, S], RUN, "doc"),
    ("none_failed_min_one_success", [K, K], SKIP, "dep: every upstream skipped marks skipped"),
    ("none_failed_min_one_success", [S, R], WAIT, "dep: waits for every upstream"),
    ("none_failed_min_one_success", [K, R], WAIT, "dep: not every upstream is skipped yet"),
    ("none_failed_min_one_success", [S, UF], UPF, "dep: a failure marks upstream_failed"),
    ("none_failed_min_one_success", [R, F], UPF, "dep: early upstream_failed"),
    ("none_skipped", [S, F, UF], RUN, "doc: no upstream is skipped"),
    ("none_skipped", [S, K], SKIP, "dep: a skip marks skipped"),
    ("none_skipped", [R, K], SKIP, "dep: early skip"),
    ("none_skipped", [S, R], WAIT, "dep: waits for every upstream"),
    ("always", [R, N], RUN, "doc: no dependencies at all"),
    ("always", [F, UF, K], RUN, "doc: no dependencies at all"),
]

# Outpost's choice where Airflow has no rule for a plain (unmapped) task: a
# ``removed`` upstream (a task dropped from the DAG) counts as done, and as a
# success for all_success, so a run never deadlocks on a deleted task. Airflow
# discounts removed upstreams only for mapped instances (map_index >= 0).
REMOVED_TABLE: list[tuple[str, list[str], Decision]] = [
    ("all_success", [S, RM], RUN),
    ("all_done", [F, RM], RUN),
    ("none_failed", [S, RM], RUN),
    ("one_success", [RM, RM], UPF),
    ("one_failed", [S, RM], SKIP),
    ("none_skipped", [S, RM], RUN),
]


@pytest.mark.parametrize(("rule", "upstream", "expected", "source"), TABLE, ids=[f"{r}-{'-'.join(u)}" for r, u, _e, _s in TABLE])
def test_trigger_rule_table(rule: str, upstream: list[str], expected: Decision, source: str) -> None:
    assert decide(rule, upstream) == expected, source


@pytest.mark.parametrize(("rule", "upstream", "expected"), REMOVED_TABLE)
def test_removed_upstream_counts_as_done(rule: str, upstream: list[str], expected: Decision) -> None:
    assert decide(rule, upstream) == expected


def test_table_covers_every_rule_and_outcome() -> None:
    """Each rule's rows show each decision it can reach."""
    reachable = {
        "all_success": {RUN, WAIT, SKIP, UPF}, "all_failed": {RUN, WAIT, SKIP}, "all_done": {RUN, WAIT},
        "all_skipped": {RUN, WAIT, SKIP}, "one_success": {RUN, WAIT, SKIP, UPF}, "one_failed": {RUN, WAIT, SKIP},
        "one_done": {RUN, WAIT, SKIP}, "none_failed": {RUN, WAIT, UPF}, "none_failed_min_one_success": {RUN, WAIT, SKIP, UPF},
        "none_skipped": {RUN, WAIT, SKIP}, "always": {RUN},
    }
    assert set(reachable) == set(RULES)
    covered: dict[str, set[Decision]] = {r: set() for r in RULES}
    for rule, _up, expected, _src in TABLE:
        covered[rule].add(expected)
    assert covered == reachable


# --- exhaustive comparison with Airflow's two-step rule ----------------------


class Counts(NamedTuple):
    upstream: int
    success: int
    skipped: int
    failed: int
    upstream_failed: int
    done: int


# [dep], restated per rule as (early mark, pass test). The early mark is what
# Airflow sets with flag_upstream_failed; the pass test decides run or wait.
_Mark = Callable[[Counts], Decision | None]
_Pass = Callable[[Counts], bool]
AIRFLOW: dict[str, tuple[_Mark, _Pass]] = {
    "all_success": (
        lambda c: UPF if c.failed or c.upstream_failed else SKIP if c.skipped else None,
        lambda c: c.success == c.upstream,
    ),
    "all_failed": (
        lambda c: SKIP if c.success or c.skipped else None,
        lambda c: c.failed + c.upstream_failed == c.upstream,
    ),
    "all_done": (lambda c: None, lambda c: c.done >= c.upstream),
    "all_skipped": (
        lambda c: SKIP if c.success or c.failed or c.upstream_failed else None,
        lambda c: c.skipped == c.upstream,
    ),
    "one_success": (
        lambda c: (SKIP if c.done == c.skipped else UPF if not c.success else None) if c.done >= c.upstream else None,
        lambda c: c.success > 0,
    ),
    "one_failed": (
        lambda c: SKIP if c.done >= c.upstream and not (c.failed or c.upstream_failed) else None,
        lambda c: c.failed + c.upstream_failed > 0,
    ),
    "one_done": (
        lambda c: SKIP if c.done >= c.upstream and not (c.failed or c.success) else None,
        lambda c: c.success + c.failed > 0,
    ),
    "none_failed": (
        lambda c: UPF if c.failed or c.upstream_failed else None,
        lambda c: c.success + c.skipped == c.upstream,
    ),
    "none_failed_min_one_success": (
        lambda c: UPF if c.failed or c.upstream_failed else SKIP if c.skipped == c.upstream else None,
        lambda c: c.success + c.skipped == c.upstream,
    ),
    "none_skipped": (
        lambda c: SKIP if c.skipped else None,
        lambda c: c.done >= c.upstream and not c.skipped,
    ),
    "always": (lambda c: None, lambda c: True),
}


def airflow_decision(rule: str, states: list[str]) -> Decision:
    if not states:
        return RUN  # [dep]: a task without upstream passes
    count = Counter(states)
    finished = sum(count[s] for s in (S, F, K, UF))
    c = Counts(len(states), count[S], count[K], count[F], count[UF], finished)
    mark, passes = AIRFLOW[rule]
    early = mark(c)
    if early is not None:
        return early
    return RUN if passes(c) else WAIT


#: Finished states plus unfinished ones the scheduler sees (removed is
#: Outpost's documented deviation, tested above).
STATES = (S, F, K, UF, N, R, RT)


@pytest.mark.parametrize("rule", RULES)
def test_every_combination_of_up_to_four_upstreams_matches_airflow(rule: str) -> None:
    mismatches = []
    for size in range(0, 5):
        for states in itertools.combinations_with_replacement(STATES, size):
            ours, theirs = decide(rule, list(states)), airflow_decision(rule, list(states))
            if ours != theirs:
                mismatches.append((states, ours.value, theirs.value))
    assert mismatches == []


#: The one case where deciding early gives another answer than deciding at
#: the end, in Airflow as here: all_success marks the task skipped as soon as
#: an upstream is skipped while none has failed yet; a failure that comes
#: later does not turn it into upstream_failed. (A failure seen first wins.)
RACES = {("all_success", SKIP, UPF)}


@pytest.mark.parametrize("rule", RULES)
def test_an_early_decision_is_the_final_one_but_for_one_airflow_race(rule: str) -> None:
    """For every combination of up to four upstreams, some finished and
    some still unfinished (running, queued, waiting for a retry, not
    started), and every way the unfinished ones can end: a decision taken
    before they end equals the one taken after, so a run's outcome does not
    depend on when the scheduler looked, except for RACES."""
    upstream_options = [(final, final) for final in (S, F, K, UF)] + [(now, final) for now in (N, R, Q, RT) for final in (S, F, K, UF)]
    contradictions = set()
    for size in range(1, 5):
        for combo in itertools.combinations_with_replacement(upstream_options, size):
            early = decide(rule, [now for now, _final in combo])
            final = decide(rule, [final for _now, final in combo])
            assert final != WAIT, "once every upstream is finished a rule decides"
            if early not in (WAIT, final):
                contradictions.add((rule, early, final))
    assert contradictions == {race for race in RACES if race[0] == rule}


# --- through the scheduler ---------------------------------------------------

HUB_DAG = '''
from hub.dag import DAG, AgentOperator, PythonOperator, every_agent

def work():
    return "ok"

with DAG("{dag_id}") as dag:
    tasks = {{}}
    for task_id, rule in {rules!r}.items():
        if task_id.startswith("skip_"):
            # a fan-out with no matching agent is skipped (a zero-length map)
            tasks[task_id] = AgentOperator(task_id=task_id, job_type="noop", target=every_agent(site="nowhere"), trigger_rule=rule)
        else:
            tasks[task_id] = PythonOperator(task_id=task_id, python_callable=work, trigger_rule=rule)
    for up, down in {edges!r}:
        tasks[up] >> tasks[down]
'''


def dag_file(dag_id: str, rules: dict[str, str], edges: list[tuple[str, str]]) -> dict[str, str]:
    return {f"{dag_id}.py": HUB_DAG.format(dag_id=dag_id, rules=rules, edges=edges)}


def run_to_end(hub: Any, run_pk: int, outcomes: dict[str, str]) -> tuple[str, dict[str, str]]:
    """Drive a run with the scheduler, playing the executor's part: each hub
    task it queues ends as ``outcomes[task_id]`` (default success), the way
    the executor records a return, an exception or ``TaskSkipped``."""
    for _ in range(50):
        hub.scheduler.tick()
        if not hub.hub_queue:
            with hub.sessions() as session:
                run = session.get(DagRun, run_pk)
                if run.state in ("success", "failed"):
                    break
            continue
        with transaction(hub.sessions) as session:
            for ti_id in hub.hub_queue:
                ti = session.get(TaskInstance, ti_id)
                ti.state = TaskState.RUNNING
                outcome = outcomes.get(ti.task_id, S)
                if outcome == K:
                    ti.state, ti.ended_at = TaskState.SKIPPED, utcnow(hub.clock)
                else:
                    finish_try(ti, success=outcome == S, now=utcnow(hub.clock), output="ok" if outcome == S else None)
            hub.hub_queue.clear()
    with hub.sessions() as session:
        run = session.get(DagRun, run_pk)
        states = dict(session.execute(select(TaskInstance.task_id, TaskInstance.state).where(TaskInstance.run_pk == run_pk)).all())
        return run.state, states


def test_a_skip_cascades_through_all_success(make_hub: Any) -> None:
    """[doc]: the skip of a branch cascades down through all_success tasks;
    the leaves are skipped, not failed, so the run succeeds [run]."""
    rules = {"skip_fanout": "all_success", "a": "all_success", "b": "all_success", "keep": "all_skipped"}
    hub = make_hub(dag_file("cascade", rules, [("skip_fanout", "a"), ("a", "b"), ("skip_fanout", "keep")]))
    state, states = run_to_end(hub, hub.trigger("cascade"), {})
    assert states == {"skip_fanout": "skipped", "a": "skipped", "b": "skipped", "keep": "success"}
    assert state == "success"


def test_a_task_that_skips_itself_cascades_like_a_skipped_branch(make_hub: Any) -> None:
    rules = {"check": "all_success", "after": "all_success", "report_failure": "one_failed", "always_runs": "all_done"}
    hub = make_hub(dag_file("selfskip", rules, [("check", "after"), ("check", "report_failure"), ("check", "always_runs")]))
    state, states = run_to_end(hub, hub.trigger("selfskip"), {"check": K})
    assert states == {"check": "skipped", "after": "skipped", "report_failure": "skipped", "always_runs": "success"}
    assert state == "success"


def test_a_join_after_a_branch_runs_with_none_failed_min_one_success(make_hub: Any) -> None:
    """[doc]'s branch example: the untaken branch is skipped; a join with the
    default all_success is skipped too, one with none_failed_min_one_success
    runs."""
    rules = {
        "start": "all_success", "branch_a": "all_success", "follow_a": "all_success", "skip_branch_b": "all_success",
        "follow_b": "all_success", "join": "none_failed_min_one_success", "naive_join": "all_success",
    }
    edges = [
        ("start", "branch_a"), ("branch_a", "follow_a"), ("start", "skip_branch_b"), ("skip_branch_b", "follow_b"),
        ("follow_a", "join"), ("follow_b", "join"), ("follow_a", "naive_join"), ("follow_b", "naive_join"),
    ]
    hub = make_hub(dag_file("branchy", rules, edges))
    state, states = run_to_end(hub, hub.trigger("branchy"), {})
    assert states == {
        "start": "success", "branch_a": "success", "follow_a": "success", "skip_branch_b": "skipped",
        "follow_b": "skipped", "join": "success", "naive_join": "skipped",
    }
    assert state == "success"


def test_a_join_after_a_branch_that_failed_is_upstream_failed(make_hub: Any) -> None:
    rules = {"start": "all_success", "branch_a": "all_success", "skip_branch_b": "all_success", "join": "none_failed_min_one_success"}
    edges = [("start", "branch_a"), ("start", "skip_branch_b"), ("branch_a", "join"), ("skip_branch_b", "join")]
    hub = make_hub(dag_file("branchfail", rules, edges))
    state, states = run_to_end(hub, hub.trigger("branchfail"), {"branch_a": F})
    assert states == {"start": "success", "branch_a": "failed", "skip_branch_b": "skipped", "join": "upstream_failed"}
    assert state == "failed"


def test_all_done_cleanup_runs_after_a_failure_and_the_leaf_decides_the_run(make_hub: Any) -> None:
    """[run]: the failure of ``work`` is handled by its only downstream, the
    all_done cleanup, which is the leaf; the run succeeds, as in Airflow."""
    rules = {"setup": "all_success", "work": "all_success", "cleanup": "all_done"}
    hub = make_hub(dag_file("cleanup", rules, [("setup", "work"), ("work", "cleanup")]))
    state, states = run_to_end(hub, hub.trigger("cleanup"), {"work": F})
    assert states == {"setup": "success", "work": "failed", "cleanup": "success"}
    assert state == "success"


def test_a_failed_leaf_fails_the_run_even_when_cleanup_succeeds(make_hub: Any) -> None:
    rules = {"work": "all_success", "publish": "all_success", "cleanup": "all_done"}
    hub = make_hub(dag_file("cleanup2", rules, [("work", "publish"), ("work", "cleanup")]))
    state, states = run_to_end(hub, hub.trigger("cleanup2"), {"work": F})
    assert states == {"work": "failed", "publish": "upstream_failed", "cleanup": "success"}
    assert state == "failed"


def test_a_failed_cleanup_leaf_fails_an_otherwise_good_run(make_hub: Any) -> None:
    rules = {"work": "all_success", "cleanup": "all_done"}
    hub = make_hub(dag_file("cleanup3", rules, [("work", "cleanup")]))
    state, states = run_to_end(hub, hub.trigger("cleanup3"), {"cleanup": F})
    assert states == {"work": "success", "cleanup": "failed"}
    assert state == "failed"


def test_one_failed_alert_runs_and_one_success_does_not_wait(make_hub: Any) -> None:
    rules = {"a": "all_success", "b": "all_success", "alert": "one_failed", "first": "one_success", "after_first": "all_success"}
    edges = [("a", "alert"), ("b", "alert"), ("a", "first"), ("b", "first"), ("first", "after_first")]
    hub = make_hub(dag_file("onefail", rules, edges))
    state, states = run_to_end(hub, hub.trigger("onefail"), {"a": F})
    assert states == {"a": "failed", "b": "success", "alert": "success", "first": "success", "after_first": "success"}
    # Leaves are alert and after_first, both succeeded: the handled failure does not fail the run.
    assert state == "success"


def test_upstream_failed_propagates_down_a_chain_and_one_done_skips_on_it(make_hub: Any) -> None:
    """[dep]: one_done counts successes and failures only, so a task whose
    upstreams all ended upstream_failed is skipped, not run."""
    rules = {"a": "all_success", "b": "all_success", "c": "all_success", "d": "one_done"}
    hub = make_hub(dag_file("ufchain", rules, [("a", "b"), ("b", "c"), ("c", "d")]))
    state, states = run_to_end(hub, hub.trigger("ufchain"), {"a": F})
    assert states == {"a": "failed", "b": "upstream_failed", "c": "upstream_failed", "d": "skipped"}
    assert state == "success"  # the only leaf was skipped [run]


def test_a_skip_seen_before_a_failure_skips_all_success_as_in_airflow(make_hub: Any) -> None:
    """RACES through the scheduler: the join is skipped while ``work`` still
    runs; ``work`` failing later changes nothing, and as ``work`` is not a
    leaf the run succeeds. Airflow's early skip does the same."""
    rules = {"skip_fanout": "all_success", "work": "all_success", "join": "all_success"}
    hub = make_hub(dag_file("race", rules, [("skip_fanout", "join"), ("work", "join")]))
    run_pk = hub.trigger("race")
    hub.scheduler.tick()
    hub.scheduler.tick()
    [work_id] = hub.hub_queue
    states = {ti.task_id: ti.state for ti in hub.tis(run_pk)}
    assert states == {"skip_fanout": "skipped", "work": "queued", "join": "skipped"}
    hub.hub_queue.clear()
    with transaction(hub.sessions) as session:
        ti = session.get(TaskInstance, work_id)
        ti.state = TaskState.RUNNING
        finish_try(ti, success=False, now=utcnow(hub.clock))
    state, states = run_to_end(hub, run_pk, {})
    assert states == {"skip_fanout": "skipped", "work": "failed", "join": "skipped"}
    assert state == "success"
