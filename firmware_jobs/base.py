"""The job contract: what a job type is, what it may ask of the agent, how it fails.

A job type is a subclass of :class:`Job` registered with
``firmware_jobs.registry.register``. The agent's runner looks it up by name,
calls :meth:`Job.validate` on the assignment's parameters, then
:meth:`Job.run` with a :class:`JobContext`. Retries, time limits, progress
reporting and cancellation belong to the runner; a job only implements
``run`` and reaches the outside world through its context.

Parameters are checked against the job's ``params_schema``, a small subset of
JSON Schema implemented here rather than with the ``jsonschema`` package: the
agent's base install must stay small (an RSS target under 40 MB on the
device), and ``jsonschema`` pulls in ``referencing`` and the compiled
``rpds-py``. Supported keywords: ``type`` (object, string, integer, number,
boolean, array, null, or a list of them), ``properties``, ``required``,
``additionalProperties`` (``false`` only), ``items``, ``enum``,
``minimum``/``maximum``, ``minLength``/``maxLength``, ``minItems``/``maxItems``
and ``default``, plus the annotations ``title`` and ``description``. A schema
using anything else is refused at registration, so no rule is silently
ignored. ``integer`` means a JSON integer (``1``, not ``1.0``); ``number``
excludes booleans, NaN and infinities.
"""

from __future__ import annotations

import abc
import copy
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NoReturn, Protocol

from shared.clock import Clock
from shared.errors import InvalidParams, OutpostError


class JobContext(Protocol):
    """What the agent gives a running job.

    ``settings`` holds agent-provided values: ``"agent_version"`` (str),
    ``"command_allowlist"`` (list of str), ``"state_dir"`` (str),
    ``"device_root"`` (str), ``"hub_url"`` (str or None: the hub's HTTP base
    URL), ``"hub_ca"`` (str or None) and ``"release_keys"`` (list of
    ``ed25519:...`` texts: the firmware release keys this device trusts).
    ``work_dir`` is a private, existing directory for this assignment.
    """

    assignment_id: str
    work_dir: pathlib.Path
    clock: Clock
    settings: Mapping[str, Any]

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; the agent may rate-limit what it sends."""
        ...

    def log(self, line: str) -> None:
        """Append one line to the assignment's log."""
        ...

    def should_abort(self) -> bool:
        """True once the job must stop (cancelled, or the agent is stopping).
        Long-running jobs poll it and raise :class:`JobAborted`."""
        ...

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> str:
        """Report a condition of the device (``battery_low``) to the hub, where
        it triggers DAGs scheduled on ``AgentEvent(name)``. Durable once it
        returns (the agent's outbox) and sent whatever becomes of the job;
        returns the event id. ``ValueError`` for a bad name or a payload that
        is not a JSON object of at most 16 KiB."""
        ...

    def signed_headers(self, method: str, path: str) -> dict[str, str]:
        """Headers that authenticate a body-less request ``method path`` to
        the hub as this agent (``Outpost-Signature``, shared/requestsig.py).
        The agent signs with the device key, which the job never holds;
        ``path`` is the full path the hub sees. The agent signs only ``GET``
        requests under the hub's ``/api/v1/artifacts/`` (``ValueError``
        otherwise); ``RuntimeError`` when it has no usable device key."""
        ...


class JobError(OutpostError):
    """A job failed. ``code`` is stable and machine-readable; ``retryable``
    tells the hub whether another try may succeed."""

    code = "job_error"

    def __init__(self, message: str, code: str = "job_error", retryable: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable


class JobAborted(JobError):
    """The job stopped because ``ctx.should_abort()`` said so. Retryable by
    default: an abort says nothing about the job's inputs, and the runner,
    which knows why it asked, decides what to report."""

    code = "aborted"

    def __init__(self, message: str = "job aborted on request", code: str = "aborted", retryable: bool = True) -> None:
        super().__init__(message, code=code, retryable=retryable)


class Job(abc.ABC):
    """Base of every job type. Subclasses set the class attributes and
    implement :meth:`run`; every job must be idempotent by contract (running
    the same assignment twice has the effect of running it once) and say how
    in its docstring. ``rerunnable`` false tells the runner not to re-run an
    assignment that was interrupted mid-run (it is reported failed instead)."""

    name: ClassVar[str]
    version: ClassVar[str]
    description: ClassVar[str]
    params_schema: ClassVar[dict[str, Any]] = {"type": "object", "properties": {}, "additionalProperties": False}
    rerunnable: ClassVar[bool] = True

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Check ``params`` against ``params_schema``; return a copy with
        defaults filled in. Raises ``InvalidParams`` naming field, value and rule."""
        result: dict[str, Any] = validate(self.params_schema, params)
        return result

    @abc.abstractmethod
    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        """Do the work with validated ``params``; return JSON-serialisable
        output, or raise :class:`JobError`."""


# --- the JSON Schema subset --------------------------------------------------

_TYPE_CHECKS: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
_KEYWORDS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "enum", "minimum", "maximum",
     "minLength", "maxLength", "minItems", "maxItems", "default", "title", "description"}
)


def check_schema(schema: Any, where: str = "params") -> None:
    """Refuse a schema that uses anything outside the supported subset, or
    whose defaults break its own rules. Raises ``ValueError``."""
    if not isinstance(schema, dict):
        raise ValueError(f"schema at {where} must be an object, got {schema!r}")
    unknown = set(schema) - _KEYWORDS
    if unknown:
        raise ValueError(f"schema at {where} uses unsupported keywords {sorted(unknown)}; supported: {sorted(_KEYWORDS)}")
    types = schema.get("type", [])
    for name in [types] if isinstance(types, str) else types:
        if name not in _TYPE_CHECKS:
            raise ValueError(f"schema at {where} has unknown type {name!r}")
    if schema.get("additionalProperties", False) is not False:
        raise ValueError(f"schema at {where}: only 'additionalProperties: false' is supported")
    for key, sub in schema.get("properties", {}).items():
        check_schema(sub, f"{where}.{key}")
        if "default" in sub:
            validate(sub, sub["default"], f"{where}.{key} (default)")
    if "items" in schema:
        check_schema(schema["items"], f"{where}[]")


def validate(schema: dict[str, Any], value: Any, where: str = "params") -> Any:
    """Check ``value`` against ``schema`` (see the module docstring for the
    subset); return it with object defaults filled in, never mutating the
    input. Raises ``InvalidParams`` with a message naming where, what and why."""
    types = schema.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_TYPE_CHECKS[name](value) for name in names):
            _fail(where, value, f"is not of type {' or '.join(names)}")
    if "enum" in schema and not any(value == e and type(value) is type(e) for e in schema["enum"]):
        _fail(where, value, f"is not one of {schema['enum']!r}")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            _fail(where, value, f"is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            _fail(where, value, f"is above the maximum {schema['maximum']}")
    if isinstance(value, str | list):
        unit, low, high = ("characters", "minLength", "maxLength") if isinstance(value, str) else ("items", "minItems", "maxItems")
        if low in schema and len(value) < schema[low]:
            _fail(where, value, f"is shorter than {schema[low]} {unit}")
        if high in schema and len(value) > schema[high]:
            _fail(where, value, f"is longer than {schema[high]} {unit}")
    if isinstance(value, list) and "items" in schema:
        return [validate(schema["items"], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return _validate_object(schema, value, where)
    return value


def _validate_object(schema: dict[str, Any], value: dict[str, Any], where: str) -> dict[str, Any]:
    properties: dict[str, Any] = schema.get("properties", {})
    for name in schema.get("required", []):
        if name not in value:
            raise InvalidParams(f"{where}.{name}: required field is missing")
    if schema.get("additionalProperties", True) is False:
        extra = sorted(set(value) - set(properties))
        if extra:
            raise InvalidParams(f"{where}: unknown field(s) {extra}; allowed: {sorted(properties)}")
    result = {key: validate(properties[key], item, f"{where}.{key}") if key in properties else item for key, item in value.items()}
    for key, sub in properties.items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
    return result


def _fail(where: str, value: Any, rule: str) -> NoReturn:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    raise InvalidParams(f"{where}: {shown} {rule}")
