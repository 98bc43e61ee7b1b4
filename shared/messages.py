"""Every message body on the wire, as a frozen typed record.

Bodies are small JSON objects. Decoding is strict about the fields it knows
(type-checked, required ones present) and ignores fields it does not know, so
a newer peer may add optional fields without breaking an older one. A new
field must therefore always have a default.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from shared.errors import InvalidMessage

JSONValue = Any

#: Names of agent events (``battery_low``): safe in asset URIs, logs and URLs.
AGENT_EVENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
#: Largest JSON payload of an agent event; bigger data belongs in a job's result.
MAX_AGENT_EVENT_PAYLOAD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all bodies; ``TYPE`` is the envelope's ``type`` string."""

    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in _field_names(type(self))}

    @classmethod
    def from_dict(cls, data: Any) -> typing.Self:
        if not isinstance(data, dict):
            raise InvalidMessage(f"{cls.TYPE} body must be a JSON object, got {type(data).__name__}")
        values: dict[str, Any] = {}
        for name, required, check in _validators(cls):
            if name in data:
                values[name] = check(data[name])
            elif required:
                raise InvalidMessage(f"{cls.TYPE} body lacks required field {name!r}")
        return cls(**values)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def _validators(cls: type[Message]) -> tuple[tuple[str, bool, Callable[[Any], Any]], ...]:
    """Per field: name, whether it is required, and its checker, built once
    per class: interpreting the annotations on every decode cost more than
    the JSON parse."""
    hints = typing.get_type_hints(cls)
    return tuple(
        (f.name, f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, _checker(cls.TYPE, f.name, hints[f.name]))
        for f in dataclasses.fields(cls)
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _checker(type_name: str, name: str, hint: Any) -> Callable[[Any], Any]:
    """A function that checks a value against a field's annotation and
    converts nested records, raising ``InvalidMessage`` naming the field."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def invalid(value: Any) -> InvalidMessage:
        return InvalidMessage(f"{type_name}.{name}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")

    if hint is Any:
        return _identity
    if origin in (typing.Union, types.UnionType):
        nullable = type(None) in args
        options = [_checker(type_name, name, arg) for arg in args if arg is not type(None)]

        def check_union(value: Any) -> Any:
            # Only Any or NoneType itself could accept None, and both return it.
            if value is None and nullable:
                return None
            for option in options:
                try:
                    return option(value)
                except InvalidMessage:
                    continue
            raise InvalidMessage(f"{type_name}.{name}: {value!r} does not match {hint}")

        return check_union
    if hint is type(None):

        def check_none(value: Any) -> Any:
            if value is None:
                return None
            raise invalid(value)

        return check_none
    if origin is Literal:

        def check_literal(value: Any) -> Any:
            if value in args:
                return value
            raise invalid(value)

        return check_literal
    if origin is tuple:
        item = _checker(type_name, name, args[0])

        def check_tuple(value: Any) -> Any:
            if isinstance(value, list):
                return tuple(item(v) for v in value)
            raise invalid(value)

        return check_tuple
    if origin is dict or hint is dict:
        member = _checker(type_name, name, args[1]) if args else None

        def check_dict(value: Any) -> Any:
            if isinstance(value, dict) and all(isinstance(k, str) for k in value):
                if member is not None:
                    return {k: member(v) for k, v in value.items()}
                return value
            raise invalid(value)

        return check_dict
    if isinstance(hint, type) and issubclass(hint, Message):
        return hint.from_dict
    if hint is float:

        def check_float(value: Any) -> Any:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise invalid(value)

        return check_float
    if hint is int:

        def check_int(value: Any) -> Any:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise invalid(value)

        return check_int
    if isinstance(hint, type):

        def check_instance(value: Any) -> Any:
            if isinstance(value, hint):
                return value
            raise invalid(value)

        return check_instance

    def check_nothing(value: Any) -> Any:
        raise invalid(value)

    return check_nothing


def _identity(value: Any) -> Any:
    return value


# --- hub to agent ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Assign(Message):
    """Run ``job_type`` with ``params`` on this agent, once.

    ``assignment_id`` is unique per (task instance, try, agent); it is the
    agent inbox's idempotency key, so a redelivered assignment never runs twice.
    """

    TYPE: ClassVar[str] = "assign"
    assignment_id: str
    dag_id: str
    run_id: str
    task_id: str
    try_number: int
    job_type: str
    params: dict[str, Any] = field(default_factory=dict)
    map_index: int = -1
    #: Epoch seconds before which the agent must not start the job.
    not_before: float | None = None
    #: Epoch seconds after which the agent must not start the job.
    deadline: float | None = None
    #: Execution time limit in seconds.
    timeout: float | None = None


@dataclass(frozen=True, slots=True)
class Cancel(Message):
    TYPE: ClassVar[str] = "cancel"
    assignment_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Ack(Message):
    """The hub committed these results; the agent may forget them."""

    TYPE: ClassVar[str] = "ack"
    assignment_ids: tuple[str, ...]
    #: Agent events the hub committed (``AgentEvent.event_id``).
    event_ids: tuple[str, ...] = ()
    #: Log chunks the hub stored, as ``"<assignment id>/<seq>"``.
    log_ids: tuple[str, ...] = ()
    #: Results the hub recorded as rejected and will never apply (an
    #: assignment it never issued, or issued to another agent; a malformed
    #: result): the agent sets them aside instead of re-sending them. An
    #: older agent ignores the field and keeps re-sending, as before.
    refused_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyLink(Message):
    """One link of the hub's key announcement chain (``shared.keychain``):
    ``add`` the key ``key`` (id ``kid``) or ``retire`` the key ``kid``,
    signed (``sig``) by the hub key ``signer``, at ``at`` (epoch seconds)."""

    action: Literal["add", "retire"]
    kid: str
    signer: str
    at: float
    sig: str
    key: str = ""


@dataclass(frozen=True, slots=True)
class KeyAnnouncement(Message):
    """The hub's whole key chain, retained on ``outpost/v1/hub/keys``.
    ``current`` names the key that signs now (and signs this frame)."""

    TYPE: ClassVar[str] = "hub_keys"
    current: str
    links: tuple[KeyLink, ...] = ()


# --- agent to hub ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted(Message):
    """The assignment is durably in the agent's inbox."""

    TYPE: ClassVar[str] = "accepted"
    assignment_id: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Started(Message):
    TYPE: ClassVar[str] = "started"
    assignment_id: str
    started_at: float


@dataclass(frozen=True, slots=True)
class JobError(Message):
    TYPE: ClassVar[str] = "job_error"
    code: str
    message: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class Result(Message):
    """The outcome of one try of one assignment. Delivered at least once,
    applied by the hub exactly once (unique on task instance, try, agent)."""

    TYPE: ClassVar[str] = "result"
    assignment_id: str
    try_number: int
    status: Literal["success", "failed"]
    output: Any = None
    error: JobError | None = None
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class Rejected(Message):
    """The agent refused a message it received (decode error, expired,
    unknown job type...). ``message_id`` is the refused envelope's id when it
    could be read."""

    TYPE: ClassVar[str] = "rejected"
    code: str
    detail: str
    message_id: str | None = None
    assignment_id: str | None = None


#: What an agent reports about its device, in heartbeats and ``online``
#: statuses: ``hardware_model`` (str), ``firmware_version`` (str, the active
#: slot's), ``agent_version`` (str), ``job_types`` ({name: version}),
#: ``disk_free_bytes``, ``mem_free_bytes``, ``mem_total_bytes`` (int). The
#: hub keeps what it does not know, so newer agents may add keys.
INVENTORY_KEYS = ("hardware_model", "firmware_version", "agent_version", "job_types", "disk_free_bytes", "mem_free_bytes", "mem_total_bytes")


@dataclass(frozen=True, slots=True)
class JobTypeInfo(Message):
    TYPE: ClassVar[str] = "job_type"
    name: str
    version: str


@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    TYPE: ClassVar[str] = "heartbeat"
    agent_version: str
    inbox_depth: int = 0
    outbox_depth: int = 0
    running: tuple[str, ...] = ()
    #: False while the agent refuses new work (back-pressure).
    accepting: bool = True
    #: Monotonic counters since start, e.g. ``rejected.decode_error``.
    counters: dict[str, int] = field(default_factory=dict)
    #: Why ``accepting`` is False ("" while accepting): the outbox is over
    #: its disk quota, or the agent is stopping.
    not_accepting: str = ""
    #: The device's wall clock (epoch seconds) when it sent this. The hub
    #: measures clock skew from it: an HLC stamp cannot show a clock that is
    #: behind once the device has merged a newer hub stamp.
    clock: float | None = None
    #: The device's inventory (see :data:`INVENTORY_KEYS`); empty from agents
    #: that predate the device registry.
    inventory: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Status(Message):
    """Retained on the agent's status topic; the broker publishes the
    ``offline`` one as the agent's last will."""

    TYPE: ClassVar[str] = "status"
    state: Literal["online", "offline"]
    agent_version: str = ""
    hostname: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    job_types: tuple[JobTypeInfo, ...] = ()
    inventory: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentEvent(Message):
    """A condition the device reports (``battery_low``), from a job
    (``ctx.emit_event``) or the command line (``outpost-agent emit``).

    It travels like a result: stored in the agent's outbox, sent until the
    hub acknowledges ``event_id`` (in ``Ack.event_ids``), applied once. The
    hub records it as an asset event on ``agent-event://<name>``, which
    triggers the DAGs scheduled on that asset."""

    TYPE: ClassVar[str] = "agent_event"
    event_id: str
    name: str
    payload: dict[str, Any] = field(default_factory=dict)
    #: Epoch seconds on the device when the event was emitted.
    occurred_at: float | None = None


@dataclass(frozen=True, slots=True)
class Progress(Message):
    """How far a running job got. Best effort: sent at most once a second
    per assignment (the last report always), never queued or acknowledged."""

    TYPE: ClassVar[str] = "progress"
    assignment_id: str
    fraction: float
    message: str = ""
    #: Epoch seconds on the device when the job reported it.
    at: float | None = None


@dataclass(frozen=True, slots=True)
class LogChunk(Message):
    """Part ``seq`` (from 0) of what one try of an assignment logged.
    Travels like a result (the agent's outbox, key ``log/<assignment id>/<seq>``)
    and is acknowledged as ``"<assignment id>/<seq>"`` in ``Ack.log_ids``;
    ``final`` marks the last chunk of the try's log."""

    TYPE: ClassVar[str] = "log"
    assignment_id: str
    seq: int
    data: str
    final: bool = False


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Assign, Cancel, Ack, KeyAnnouncement, Accepted, Started, Result, Rejected, Heartbeat, Status, AgentEvent, Progress, LogChunk)
}
