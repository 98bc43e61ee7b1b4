"""Pure target selection: which agents get an agent task.

Input is a snapshot of the fleet (plain values), a target (mode, agent id,
labels) and the job type; output is the chosen agent ids. No DB, no clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shared.release import ManifestError, compare_versions


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
    groups: frozenset[str] = frozenset()
    hardware_model: str = ""
    firmware_version: str = ""


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


# --- selectors: which devices a fleet task or a registry filter means ---------------

_CLAUSE_RE = re.compile(r"^\s*(==|!=|>=|<=|>|<)?\s*([0-9][0-9A-Za-z.+-]*)\s*$")


@dataclass(frozen=True)
class VersionSpec:
    """A firmware version range: comma-separated clauses that must all hold,
    each an operator (``==`` ``!=`` ``>=`` ``<=`` ``>`` ``<``; none means
    ``==``) and a dotted version: ``">=1.2,<2.0"``. Versions compare as in
    :func:`shared.release.compare_versions`."""

    clauses: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> VersionSpec:
        """Raises ``ValueError`` naming the bad clause."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("a version range must be a non-empty string such as '>=1.2,<2.0'")
        clauses = []
        for part in text.split(","):
            match = _CLAUSE_RE.match(part)
            if match is None:
                raise ValueError(f"version range clause {part.strip()!r} is not an operator (==, !=, >=, <=, >, <) and a version")
            try:
                compare_versions(match.group(2), "0")
            except ManifestError as exc:
                raise ValueError(f"version range clause {part.strip()!r}: {exc}") from None
            clauses.append((match.group(1) or "==", match.group(2)))
        return cls(tuple(clauses))

    def contains(self, version: str) -> bool:
        """False for a version that does not parse (an unknown device is not in any range)."""
        try:
            results = [(op, compare_versions(version, bound)) for op, bound in self.clauses]
        except ManifestError:
            return False
        return all(_OPS[op](c) for op, c in results)

    def __str__(self) -> str:
        return ",".join(f"{op}{v}" for op, v in self.clauses)


_OPS = {"==": lambda c: c == 0, "!=": lambda c: c != 0, ">=": lambda c: c >= 0, "<=": lambda c: c <= 0, ">": lambda c: c > 0, "<": lambda c: c < 0}


@dataclass(frozen=True)
class Selector:
    """Which devices: all of ``labels`` (exact values), in any of ``groups``
    (empty: any group or none), with a hardware model in ``hardware`` (empty:
    any) and a firmware version in ``firmware`` (None: any). Online state is
    not part of it: a rollout includes offline devices and waits for them."""

    labels: Mapping[str, str] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()
    hardware: frozenset[str] = frozenset()
    firmware: VersionSpec | None = None

    def selects(self, agent: AgentView) -> bool:
        if any(agent.labels.get(k) != v for k, v in self.labels.items()):
            return False
        if self.groups and not (self.groups & agent.groups):
            return False
        if self.hardware and agent.hardware_model not in self.hardware:
            return False
        return self.firmware is None or self.firmware.contains(agent.firmware_version)

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": dict(self.labels), "groups": sorted(self.groups), "hardware": sorted(self.hardware),
            "firmware": None if self.firmware is None else str(self.firmware),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Selector:
        """Raises ``ValueError`` for a malformed selector."""
        labels = data.get("labels") or {}
        groups = data.get("groups") or []
        hardware = data.get("hardware") or []
        if not isinstance(labels, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ValueError("selector labels must map strings to strings")
        for name, value in (("groups", groups), ("hardware", hardware)):
            if not isinstance(value, list | tuple | set | frozenset) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"selector {name} must be a list of non-empty strings")
        firmware = data.get("firmware")
        return cls(dict(labels), frozenset(groups), frozenset(hardware), None if firmware in (None, "") else VersionSpec.parse(firmware))
