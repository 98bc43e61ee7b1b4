"""The rollout policy (hub.rollout_policy) and its authoring: sizes,
thresholds, windows, and invalid policies refused when the DAG file is parsed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hub.dag import DAG, AgentOperator, Rollout, any_agent, every_agent, on_agent
from hub.dagbag import DagBag
from hub.errors import InvalidDag


def test_sizes_are_counts_or_percentages_of_the_devices() -> None:
    policy = Rollout(canary="5%", batch_size="10%", failure_threshold=0.03)
    assert [policy.batch_target(b, 200) for b in range(3)] == [10, 20, 20]
    assert Rollout(canary="1%", batch_size=3).batch_target(0, 7) == 1  # rounded up, at least one
    assert [Rollout(canary=0, batch_size=4).batch_target(b, 100) for b in range(2)] == [4, 4]
    assert not Rollout(canary=0).has_canary(100)
    exponential = Rollout(canary=2, batch_size=5, growth="exponential", max_batch=30)
    assert [exponential.batch_target(b, 1000) for b in range(6)] == [2, 5, 10, 20, 30, 30]


def test_thresholds() -> None:
    policy = Rollout(failure_threshold=0.03)
    assert policy.needed_success == pytest.approx(0.97)
    assert not policy.too_many_failures(0, 0) and not policy.too_many_failures(1, 40) and policy.too_many_failures(2, 60)
    assert policy.batch_passed(97, 100) and not policy.batch_passed(96, 100) and not policy.batch_passed(0, 0)
    assert Rollout(failure_threshold=0.5, success_threshold=0.75).batch_passed(3, 4)


def test_maintenance_windows_open_at_each_cron_fire_for_their_duration() -> None:
    policy = Rollout(windows=[("0 2 * * *", timedelta(hours=1)), ("30 12 * * 6", 600)])
    at = lambda text: datetime.fromisoformat(text).replace(tzinfo=UTC)  # noqa: E731
    assert policy.in_window(at("2026-01-01T02:00:00")) and policy.in_window(at("2026-01-01T02:59:59"))
    assert not policy.in_window(at("2026-01-01T03:00:00")) and not policy.in_window(at("2026-01-01T01:59:59"))
    assert policy.in_window(at("2026-01-03T12:35:00"))  # a Saturday
    assert not policy.in_window(at("2026-01-02T12:35:00"))
    assert Rollout().in_window(at("2026-01-01T17:00:00"))  # no windows: any time


def test_the_policy_survives_serialization() -> None:
    policy = Rollout(canary="5%", batch_size=10, growth="exponential", max_batch=40, failure_threshold=0.03, success_threshold=0.9,
                     max_concurrent_per_group=5, windows=[("0 2 * * *", timedelta(hours=2))], deadline=timedelta(days=2),
                     pause_after_canary=True, shuffle=True, seed=7)
    assert Rollout.from_dict(policy.to_dict()) == policy
    with pytest.raises(InvalidDag, match="unknown rollout field"):
        Rollout.from_dict({"canary": 1, "speed": "fast"})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"canary": -1}, "canary must be >= 0"),
        ({"canary": "150%"}, "percentage"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"batch_size": "0%"}, "percentage"),
        ({"batch_size": True}, "count or a percentage"),
        ({"growth": "linear"}, "growth must be one of fixed, exponential"),
        ({"max_batch": 0}, "max_batch"),
        ({"failure_threshold": 3}, "failure_threshold must be a fraction"),
        ({"success_threshold": -0.1}, "success_threshold must be a fraction"),
        ({"max_concurrent_per_group": 0}, "max_concurrent_per_group"),
        ({"windows": [("not cron", 60)]}, "is not a cron expression"),
        ({"windows": [("0 2 * * *", 0)]}, "window duration must be a positive"),
        ({"windows": [("0 2 * * *", timedelta(days=8))]}, "at most 7 days"),
        ({"windows": "0 2 * * *"}, "list of \\(cron, duration\\) pairs"),
        ({"deadline": -5}, "deadline must be a positive"),
        ({"pause_after_canary": "yes"}, "pause_after_canary must be True or False"),
    ],
)
def test_invalid_policies_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidDag, match=message):
        Rollout(**kwargs)


def test_a_rollout_needs_every_agent_and_selectors_are_checked() -> None:
    with DAG("d"):
        for target in (any_agent(), on_agent("a1")):
            with pytest.raises(InvalidDag, match="needs target=every_agent"):
                AgentOperator(task_id="t", job_type="noop", target=target, rollout=Rollout())
        with pytest.raises(InvalidDag, match="takes a Rollout"):
            AgentOperator(task_id="t", job_type="noop", target=every_agent(), rollout={"canary": 1})  # type: ignore[arg-type]
        task = AgentOperator(task_id="t", job_type="noop", target=every_agent(groups="plant", firmware=">=1.0,<2.0", site="x"), rollout=Rollout(canary=2))
    data = task.serialize()
    assert data["target"] == {"mode": "all", "agent_id": None, "labels": {"site": "x"}, "groups": ["plant"], "hardware": [], "firmware": ">=1.0,<2.0"}
    assert data["rollout"]["canary"] == 2
    with pytest.raises(InvalidDag, match="version range clause"):
        every_agent(firmware="one")
    with pytest.raises(InvalidDag, match="groups must be a list of non-empty strings"):
        every_agent(groups=[""])
    # A plain target serializes as before (no new keys: DAG versions do not change).
    assert every_agent(site="x").to_dict() == {"mode": "all", "agent_id": None, "labels": {"site": "x"}}


def test_a_dag_file_with_a_bad_policy_is_an_import_error(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "from hub.dag import DAG, AgentOperator, Rollout, every_agent\n"
        "with DAG('bad') as dag:\n"
        "    AgentOperator(task_id='t', job_type='noop', target=every_agent(), rollout=Rollout(failure_threshold=1.5))\n"
    )
    bag = DagBag(tmp_path)
    bag.collect()
    assert "bad" not in bag.dags
    assert "failure_threshold must be a fraction" in next(iter(bag.errors.values())).error
