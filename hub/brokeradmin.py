"""Agent credentials at the broker: Mosquitto's dynamic-security control API.

The hub holds the credentials of the broker's dynamic-security admin client
(``broker_admin_username`` / ``broker_admin_password``) and with them

* sets the broker up once (:meth:`BrokerAdmin.setup`): the ``outpost-hub``
  role and the hub's own MQTT client, and deny-by-default ACL access;
* gives each enrolled agent a client whose user name and client id are both
  the agent id, a random password, and a role of its own
  (:meth:`BrokerAdmin.provision_agent`);
* deletes that client and role when the agent is revoked, which also
  disconnects it (:meth:`BrokerAdmin.remove_agent`).

Why one role per agent: Mosquitto 2.0's dynamic-security plugin matches ACL
topics literally; ``%u`` and ``%c`` are substituted only by the ``acl_file``
patterns (and by the plugin from 2.1). A shared ``outpost-agent`` role with
``outpost/v1/agents/%u/#`` would therefore grant nothing. The per-agent role
names the agent's own topics (shared/topics.py), so an agent can publish only
to its events, status and probe topics and subscribe to (and receive) only
its assign and ack topics. Binding the client id to the user name keeps a
client from taking over another agent's session.

The admin client can do anything at the broker (it can create a client with
any rights), so its password is as sensitive as the broker itself; the hub's
everyday client cannot reach the control API.

With ``broker_admin_username`` empty, credentials are managed outside Outpost
(password and ACL files, or the operator's own tooling) and nothing here runs.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from hub.config import HubSettings
from shared.errors import OutpostError
from shared.mqtt import MqttRequestError, MqttSettings, request
from shared.topics import HUB_KEYS_TOPIC, PREFIX, ack_topic, assign_topic, check_agent_id, events_topic, hub_subscriptions, probe_topic, status_topic

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
HUB_ROLE = "outpost-hub"
AGENT_ROLE_PREFIX = "outpost-agent-"
#: Dynamic security's answers when a thing to delete is already gone.
_GONE = ("Client not found", "Role not found")


class BrokerAdminError(OutpostError):
    """The broker refused or did not answer a dynamic-security command."""

    code = "broker_admin_error"


def _acl(acltype: str, topic: str, allow: bool = True) -> dict[str, Any]:
    return {"acltype": acltype, "topic": topic, "allow": allow}


def agent_role(agent_id: str) -> str:
    return AGENT_ROLE_PREFIX + check_agent_id(agent_id)


def agent_acls(agent_id: str) -> list[dict[str, Any]]:
    """Exactly the agent's own topics, literally (see the module docstring),
    and reading the hub's retained key announcements (signed; only the hub
    may publish them)."""
    inbound = [assign_topic(agent_id), ack_topic(agent_id), HUB_KEYS_TOPIC]
    return [
        *(_acl("publishClientSend", t) for t in (events_topic(agent_id), status_topic(agent_id), probe_topic(agent_id))),
        *(_acl("subscribeLiteral", t) for t in inbound),
        *(_acl("publishClientReceive", t) for t in inbound),
    ]


def hub_acls() -> list[dict[str, Any]]:
    """What every hub process needs: its subscriptions (Mosquitto 2.0 checks
    a shared subscription by its full ``$share/group/...`` filter), delivery
    of agents' events and status, publishing assignments and acks, and its
    liveness probe (hub client ids vary per process and patterns are not
    substituted, so any hub probe topic)."""
    received = [f"{PREFIX}/agents/+/events", f"{PREFIX}/agents/+/status"]
    return [
        *(_acl("subscribePattern", t) for t in hub_subscriptions()),
        *(_acl("publishClientReceive", t) for t in received),
        _acl("publishClientSend", f"{PREFIX}/agents/+/assign"),
        _acl("publishClientSend", f"{PREFIX}/agents/+/ack"),
        _acl("publishClientSend", f"{PREFIX}/hub/probe/+"),
        _acl("publishClientSend", HUB_KEYS_TOPIC),
    ]


#: Everything not granted by a role is refused, including delivery: a
#: subscription that slipped through would still receive nothing.
DEFAULT_ACL_ACCESS = [
    {"acltype": "publishClientSend", "allow": False},
    {"acltype": "publishClientReceive", "allow": False},
    {"acltype": "subscribe", "allow": False},
    {"acltype": "unsubscribe", "allow": True},
]


@dataclass(frozen=True)
class AgentCredentials:
    username: str
    password: str


@dataclass
class BrokerAdmin:
    """Runs dynamic-security commands with the admin client's credentials."""

    mqtt: MqttSettings
    timeout: float = 10.0

    @classmethod
    def from_settings(cls, settings: HubSettings) -> BrokerAdmin | None:
        """None when broker credentials are managed outside Outpost."""
        if not settings.broker_admin_username:
            return None
        return cls(MqttSettings(
            host=settings.broker_host, port=settings.broker_port,
            # A client id of its own, so it never takes over the hub's session.
            client_id=f"{settings.mqtt_client_id}-admin-{secrets.token_hex(4)}",
            username=settings.broker_admin_username, password=settings.broker_admin_password,
            tls=settings.broker_tls, tls_ca=settings.broker_tls_ca or None,
            tls_cert=settings.broker_tls_cert or None, tls_key=settings.broker_tls_key or None,
        ))

    # --- what the hub does ---------------------------------------------------

    def setup(self, hub_username: str, hub_password: str) -> None:
        """Create (or reset) the hub's role and client and lock the defaults
        down. Idempotent: run it again after an upgrade to refresh the ACLs."""
        if not hub_username or not hub_password:
            raise BrokerAdminError("the hub's broker_username and broker_password must be set before 'broker setup' (the hub connects with them)")
        self.run([{"command": "deleteClient", "username": hub_username}, {"command": "deleteRole", "rolename": HUB_ROLE}], ignore=_GONE)
        commands: list[dict[str, Any]] = [
            {"command": "setDefaultACLAccess", "acls": DEFAULT_ACL_ACCESS},
            {"command": "createRole", "rolename": HUB_ROLE, "textname": "Outpost hub processes", "acls": hub_acls()},
            {"command": "createClient", "username": hub_username, "password": hub_password, "textname": "Outpost hub", "roles": [{"rolename": HUB_ROLE}]},
        ]
        self.run(commands)

    def provision_agent(self, agent_id: str) -> AgentCredentials:
        """A fresh client for ``agent_id`` with a random password. An existing
        client of that name is replaced (and disconnected): enrolling again
        issues new credentials."""
        role = agent_role(agent_id)
        self.remove_agent(agent_id)
        password = secrets.token_urlsafe(32)
        self.run([
            {"command": "createRole", "rolename": role, "textname": f"Outpost agent {agent_id}", "acls": agent_acls(agent_id)},
            {"command": "createClient", "username": agent_id, "clientid": agent_id, "password": password,
             "textname": f"Outpost agent {agent_id}", "roles": [{"rolename": role}]},
        ])
        log.info("broker: created client and role for agent %s", agent_id)
        return AgentCredentials(agent_id, password)

    def remove_agent(self, agent_id: str) -> None:
        """Delete the agent's client (the broker disconnects it at once) and
        its role. Nothing to delete is not an error."""
        self.run([{"command": "deleteClient", "username": agent_id}, {"command": "deleteRole", "rolename": agent_role(agent_id)}], ignore=_GONE)

    def agent_exists(self, agent_id: str) -> bool:
        answers = self.run([{"command": "getClient", "username": check_agent_id(agent_id)}], ignore=("Client not found",))
        return "client" in answers[0]

    # --- the wire ------------------------------------------------------------

    def run(self, commands: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """Send ``commands`` in one control message and return the answers in
        order. An answer with an error not in ``ignore`` raises
        :class:`BrokerAdminError` naming the command and the broker's reason."""
        batch = secrets.token_hex(8)
        tagged = [{**c, "correlationData": f"{batch}-{i}"} for i, c in enumerate(commands)]
        payload = json.dumps({"commands": tagged}).encode()
        try:
            # Every admin client reads the same response topic: take ours.
            raw = request(self.mqtt, CONTROL_TOPIC, payload, RESPONSE_TOPIC, self.timeout, accept=lambda b: batch.encode() in b)
        except MqttRequestError as exc:
            hint = " Is the dynamic-security plugin loaded, and is this its admin client (broker_admin_username)?" if "no answer" in str(exc) else ""
            raise BrokerAdminError(f"broker admin: {exc}.{hint}") from None
        try:
            answers = json.loads(raw)["responses"]
        except (ValueError, KeyError, TypeError):
            raise BrokerAdminError(f"broker admin: the broker's answer is not a dynamic-security response: {raw[:200]!r}") from None
        by_tag = {a.get("correlationData"): a for a in answers if isinstance(a, dict)}
        ordered = []
        for command in tagged:
            answer = by_tag.get(command["correlationData"])
            if answer is None:
                raise BrokerAdminError(f"broker admin: no answer to {command['command']} (is the dynamic-security plugin loaded?)")
            error = answer.get("error")
            if error and error not in ignore:
                target = command.get("username") or command.get("rolename") or ""
                raise BrokerAdminError(f"broker admin: {command['command']} {target} refused by the broker: {error}")
            ordered.append(answer.get("data") or {})
        return ordered
