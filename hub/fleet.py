"""The agent registry: who is out there, what they run, whether they are up.

Online state comes from two sources: heartbeats (``last_seen``; the
scheduler marks an agent offline after ``agent_offline_after`` seconds of
silence) and the retained status topic, whose ``offline`` value the broker
publishes as the agent's last will. An ``offline`` status applies in the
order the broker delivers it, not by its HLC stamp: the will is stamped when
the agent connects, before every ``online`` it publishes later, yet it is the
newest news when the broker sends it. A retained status is the last one the
broker saw, so a hub that (re)subscribes gets the truth.

Replays (:func:`replay_of`): a signed heartbeat or ``online`` status captured
and sent again would fake liveness, so one stamped no later than the newest
of its kind the hub applied (``heartbeat_hlc``, ``status_hlc``, which keeps
the newest stamp even when an older will applies) is refused. An agent's
heartbeats come from one thread, stamped when sent, so they only grow.

Clock skew: statuses and heartbeats are sent fresh, so the device's time in
one, minus the hub's time on receipt, is the device clock's skew (plus
transit, small next to the bound). A heartbeat carries the device clock
itself (``Heartbeat.clock``); otherwise the HLC stamp's wall time stands in,
which is exact for a clock ahead and never overstates one behind (an HLC
wall time is never below the device clock) but can hide it once the device
merged a newer hub stamp, so it may flag a clock behind but not clear it.
Past ``max_clock_skew`` either way the agent is flagged
(``clock_skew_flagged_at``) until a fresh reading is within bounds again;
``clock_trusted`` is what the conflict rule asks.

Inventory (the device registry, docs/fleet.md): heartbeats and ``online``
statuses carry the device's inventory (:data:`shared.messages.INVENTORY_KEYS`).
It is stored whole (keys this hub does not know included: newer agents may
add some) in ``Agent.inventory``, with the hardware model and firmware
version copied into indexed columns for filters and rollout selectors. One
over :data:`MAX_INVENTORY_BYTES` is not stored (the previous one stays);
:func:`inventory_problem` says why, and ingestion records the rejection.
Groups are the operators' (:func:`set_groups`), never the device's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.models import Agent
from shared.envelope import Envelope
from shared.hlc import HLC
from shared.messages import Heartbeat, Status


#: Largest inventory stored, as compact JSON: a device's report must not bloat every agent row.
MAX_INVENTORY_BYTES = 8192
#: Longest hardware model and firmware version kept in the indexed columns (their sizes).
_HARDWARE_CHARS, _FIRMWARE_CHARS = 100, 50
#: What a group name may look like, and how many groups one device may be in.
GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_GROUPS = 32


def inventory_problem(inventory: Any) -> str | None:
    """Why ``inventory`` is not stored (too large, not JSON), or None."""
    try:
        size = len(json.dumps(inventory, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError) as exc:
        return f"inventory is not JSON: {exc}"
    if size > MAX_INVENTORY_BYTES:
        return f"inventory of {size} bytes exceeds the limit of {MAX_INVENTORY_BYTES}; not stored (the previous one stays)"
    return None


def _text(value: Any, limit: int) -> str:
    return value.replace("\x00", "")[:limit] if isinstance(value, str) else ""


def store_inventory(agent: Agent, inventory: dict[str, Any]) -> bool:
    """Keep ``inventory`` (unless empty, from an agent that predates the
    registry, or refused by :func:`inventory_problem`); True when stored."""
    if not inventory or inventory_problem(inventory) is not None:
        return False
    agent.inventory = dict(inventory)
    agent.hardware_model = _text(inventory.get("hardware_model"), _HARDWARE_CHARS)
    agent.firmware_version = _text(inventory.get("firmware_version"), _FIRMWARE_CHARS)
    return True


def check_groups(groups: Any) -> list[str]:
    """The groups as stored (unique, sorted); ValueError naming the problem."""
    if not isinstance(groups, list | tuple) or not all(isinstance(g, str) for g in groups):
        raise ValueError("groups must be a list of strings")
    bad = [g for g in groups if not GROUP_RE.match(g)]
    if bad:
        raise ValueError(f"group name(s) {', '.join(repr(g[:80]) for g in bad[:5])} invalid: 1-64 letters, digits, '.', '_', ':' or '-', starting with a letter or digit")
    unique = sorted(set(groups))
    if len(unique) > MAX_GROUPS:
        raise ValueError(f"{len(unique)} groups; a device may be in at most {MAX_GROUPS}")
    return unique


def set_groups(agent: Agent, groups: Any) -> tuple[list[str], list[str]]:
    """Replace the agent's groups; returns (before, after). ValueError for bad groups."""
    after = check_groups(groups)
    before = list(agent.groups or [])
    agent.groups = after
    return before, after


def _agent(session: Session, agent_id: str, now: datetime) -> Agent:
    agent = session.get(Agent, agent_id)
    if agent is None:
        agent = Agent(agent_id=agent_id, first_seen=now, last_seen=now, state="offline", labels={}, job_types=[], last_heartbeat={}, status_hlc="", heartbeat_hlc="")
        session.add(agent)
    return agent


def _stamp(text: str) -> HLC | None:
    try:
        return HLC.parse(text) if text else None
    except ValueError:
        return None


def _after(stamp: HLC, stored: str) -> bool:
    """True when ``stamp`` is later than the stored one (or there is none).
    The node is left out: it is the agent's id on both."""
    old = _stamp(stored)
    return old is None or (stamp.wall_ms, stamp.logical) > (old.wall_ms, old.logical)


def replay_of(session: Session, agent_id: str, envelope: Envelope) -> str | None:
    """Why ``envelope`` (a heartbeat or an ``online`` status) is a replay of
    one already applied, or None when it is new (or of another kind)."""
    body = envelope.body
    if not isinstance(body, Heartbeat) and not (isinstance(body, Status) and body.state == "online"):
        return None
    agent = session.get(Agent, agent_id)
    if agent is None:
        return None
    stored = agent.heartbeat_hlc if isinstance(body, Heartbeat) else agent.status_hlc
    if _after(envelope.hlc, stored):
        return None
    kind = "heartbeat" if isinstance(body, Heartbeat) else "online status"
    return f"{kind} stamped {envelope.hlc}, not after the newest applied ({stored}); not applied"


def apply_status(session: Session, agent_id: str, status: Status, stamp: HLC, now: datetime) -> bool:
    """Apply a status message; returns True if the online state changed."""
    agent = _agent(session, agent_id, now)
    changed = agent.state != status.state
    if _after(stamp, agent.status_hlc):
        agent.status_hlc = str(stamp)
    agent.state = status.state
    if status.state == "online":
        agent.last_seen = now
        agent.hostname = status.hostname
        agent.agent_version = status.agent_version
        agent.labels = dict(status.labels)
        agent.job_types = [j.to_dict() for j in status.job_types]
        store_inventory(agent, status.inventory)
    return changed


def apply_heartbeat(session: Session, agent_id: str, beat: Heartbeat, now: datetime, stamp: HLC | None = None) -> bool:
    """Record a heartbeat (stamped ``stamp``); returns True if the agent came back online."""
    agent = _agent(session, agent_id, now)
    if stamp is not None and _after(stamp, agent.heartbeat_hlc):
        agent.heartbeat_hlc = str(stamp)
    agent.last_seen = now
    # The inventory has its own column: not stored twice per row.
    agent.last_heartbeat = {k: v for k, v in beat.to_dict().items() if k != "inventory"}
    store_inventory(agent, beat.inventory)
    if beat.agent_version:
        agent.agent_version = beat.agent_version
    came_back = agent.state != "online"
    agent.state = "online"
    return came_back


@dataclass(frozen=True)
class SkewChange:
    agent_id: str
    #: Seconds ahead (+) or behind (-) the hub's clock.
    skew: float
    #: True: newly flagged; False: back within bounds.
    flagged: bool


@dataclass(frozen=True)
class ClockReading:
    """A device's wall time when it sent a message. ``exact``: read from its
    clock (``Heartbeat.clock``); otherwise the HLC stamp's wall time, which
    is exact for a clock ahead but may understate one behind (it is never
    below the device clock, and jumps to the hub's time when the device
    merges a hub stamp)."""

    seconds: float
    exact: bool

    @staticmethod
    def of(envelope: Envelope) -> ClockReading:
        body = envelope.body
        if isinstance(body, Heartbeat) and body.clock is not None:
            return ClockReading(body.clock, True)
        return ClockReading(envelope.hlc.wall_ms / 1000.0, False)


def observe_clocks(session: Session, readings: dict[str, ClockReading], now: datetime, max_skew: float) -> list[SkewChange]:
    """Record each agent's clock skew from its freshest status or heartbeat;
    returns the agents whose flag was set or cleared."""
    changes = []
    for agent_id, reading in readings.items():
        agent = session.get(Agent, agent_id)
        if agent is None:
            continue
        skew = round(reading.seconds - now.timestamp(), 3)
        if not reading.exact and abs(skew) <= max_skew and agent.clock_skew_flagged_at is not None and (agent.clock_skew or 0) < 0:
            continue  # an HLC wall time cannot show that a clock behind was fixed
        agent.clock_skew = skew
        if abs(skew) > max_skew and agent.clock_skew_flagged_at is None:
            agent.clock_skew_flagged_at = now
            changes.append(SkewChange(agent_id, skew, True))
        elif abs(skew) <= max_skew and agent.clock_skew_flagged_at is not None:
            agent.clock_skew_flagged_at = None
            changes.append(SkewChange(agent_id, skew, False))
    return changes


def clock_trusted(session: Session, agent_id: str) -> bool:
    """False while the agent's clock is flagged as skewed beyond
    ``max_clock_skew``: its device times (``started_at``, ``finished_at``,
    HLC wall times) must not decide anything. An agent never measured (no
    fresh status or heartbeat yet) is trusted: there is no evidence against it."""
    return session.scalar(select(Agent.clock_skew_flagged_at).where(Agent.agent_id == agent_id)) is None


def last_heard(session: Session, agent_id: str) -> datetime | None:
    """When the hub last heard from the agent (None: never)."""
    return session.scalar(select(Agent.last_seen).where(Agent.agent_id == agent_id))


def flagged_clocks(session: Session) -> set[str]:
    """The agents whose clocks are flagged now."""
    return set(session.scalars(select(Agent.agent_id).where(Agent.clock_skew_flagged_at.is_not(None))))


def touch(session: Session, agent_ids: set[str], now: datetime) -> None:
    """Any event from an agent proves it is alive. ``last_seen`` moves at most
    once a second per agent: under load this saves a row update per batch."""
    cutoff = now - timedelta(seconds=1)
    for agent in session.scalars(select(Agent).where(Agent.agent_id.in_(agent_ids), Agent.last_seen < cutoff)):
        agent.last_seen = now
