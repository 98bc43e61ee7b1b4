"""The MQTT topic layout, all under ``outpost/v1/``.

Per agent ``A``:

* ``outpost/v1/agents/A/assign``  hub to agent: assign, cancel (QoS 1)
* ``outpost/v1/agents/A/ack``     hub to agent: result acknowledgements (QoS 1)
* ``outpost/v1/agents/A/events``  agent to hub: accepted, started, result, progress, log,
  heartbeat, rejected, agent_event (QoS 1)
* ``outpost/v1/agents/A/status``  agent to hub, retained, and the agent's
  last will (QoS 1)
* ``outpost/v1/agents/A/probe``   agent's liveness probe; nobody subscribes
  (the broker's PUBACK is the answer, see shared/mqtt.py)

The hub probes on ``outpost/v1/hub/probe/<client id>``, and keeps its key
announcements (the chain of its signing keys, each signed by the one before;
see docs/security-signing.md) retained on ``outpost/v1/hub/keys``, which
every agent may read and only the hub may write.

Every topic an agent uses contains its id, so a broker ACL of the form
``outpost/v1/agents/%c/#`` confines each agent to its own topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PREFIX = "outpost/v1"
AGENT_TOPICS = ("assign", "ack", "events", "status")
#: Agent ids are safe in topics, file names and URLs.
AGENT_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: The hub's shared-subscription group: events are load-balanced across hub processes.
HUB_GROUP = "outpost-hub"
#: Retained hub key announcements (hub to all agents).
HUB_KEYS_TOPIC = f"{PREFIX}/hub/keys"


def check_agent_id(agent_id: str) -> str:
    if not isinstance(agent_id, str) or not AGENT_ID_RE.fullmatch(agent_id):
        raise ValueError(f"invalid agent id {agent_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return agent_id


def agent_topic(agent_id: str, kind: str) -> str:
    if kind not in AGENT_TOPICS:
        raise ValueError(f"unknown agent topic kind {kind!r}")
    return f"{PREFIX}/agents/{check_agent_id(agent_id)}/{kind}"


def assign_topic(agent_id: str) -> str:
    return agent_topic(agent_id, "assign")


def ack_topic(agent_id: str) -> str:
    return agent_topic(agent_id, "ack")


def events_topic(agent_id: str) -> str:
    return agent_topic(agent_id, "events")


def status_topic(agent_id: str) -> str:
    return agent_topic(agent_id, "status")


def probe_topic(agent_id: str) -> str:
    """The agent's liveness-probe topic: inside its ACL namespace, read by nobody."""
    return f"{PREFIX}/agents/{check_agent_id(agent_id)}/probe"


def hub_probe_topic(client_id: str) -> str:
    """A hub process's liveness-probe topic (wildcards and levels removed from the id)."""
    safe = "".join("_" if c in "+#/" else c for c in client_id) or "hub"
    return f"{PREFIX}/hub/probe/{safe}"


def hub_subscriptions(shared: bool = True) -> list[str]:
    """What a hub process subscribes to. Events go through a shared
    subscription so several hub processes split the load; retained status is
    read by every hub process."""
    events = f"{PREFIX}/agents/+/events"
    return [f"$share/{HUB_GROUP}/{events}" if shared else events, f"{PREFIX}/agents/+/status"]


@dataclass(frozen=True, slots=True)
class AgentTopic:
    agent_id: str
    kind: str


def parse(topic: str) -> AgentTopic:
    """Split an agent topic; raises ``ValueError`` for anything else."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "agents" or parts[4] not in AGENT_TOPICS:
        raise ValueError(f"not an Outpost agent topic: {topic!r}")
    return AgentTopic(check_agent_id(parts[3]), parts[4])
