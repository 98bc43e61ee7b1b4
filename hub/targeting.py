"""Pure target selection: which agents get an agent task.

Input is a snapshot of the fleet (plain values), a target (mode, agent id,
labels) and the job type; output is the chosen agent ids. No DB, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    online: bool
    labels: Mapping[str, str] = field(default_factory=dict)
    job_types: frozenset[str] = frozenset()
    #: Assignments sent to this agent and not yet finished.
    load: int = 0
    #: False while its last heartbeat said it takes no new work (back-pressure).
    accepting: bool = True
    #: An admin revoked the device: it gets no work, ever (until reinstated).
    revoked: bool = False


def matches(agent: AgentView, job_type: str, labels: Mapping[str, str]) -> bool:
    return job_type in agent.job_types and all(agent.labels.get(k) == v for k, v in labels.items())


def choose(mode: str, job_type: str, agents: Iterable[AgentView], *, agent_id: str | None = None, labels: Mapping[str, str] | None = None) -> list[str]:
    """Agent ids for a task.

    * ``agent``: the named agent, online or not (it receives the work when it
      connects); empty if the hub has never seen it.
    * ``any``: the least-loaded online agent with the job type and labels
      (ties broken by id, so the choice is deterministic); empty if none.
    * ``all``: every online matching agent, sorted by id.

    ``any`` and ``all`` skip agents that are not accepting work; a named
    agent gets its work anyway and refuses it until it accepts again (the
    hub redelivers). Revoked agents are never chosen by ``any`` or ``all``;
    the caller fails work pinned to one (``agent_revoked``).
    """
    wanted = dict(labels or {})
    fleet = list(agents)
    if mode == "agent":
        return [a.agent_id for a in fleet if a.agent_id == agent_id]
    candidates = sorted((a for a in fleet if a.online and a.accepting and not a.revoked and matches(a, job_type, wanted)), key=lambda a: a.agent_id)
    if mode == "all":
        return [a.agent_id for a in candidates]
    if mode == "any":
        return [min(candidates, key=lambda a: (a.load, a.agent_id)).agent_id] if candidates else []
    raise ValueError(f"unknown target mode {mode!r}")
