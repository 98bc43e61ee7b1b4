"""``AgentSettings``: the agent's one typed configuration object.

Sources, later ones winning: a TOML file, then ``OUTPOST_AGENT_<KEY>``
environment variables, then command-line flags. Unknown keys (in the file or
as ``OUTPOST_AGENT_*`` variables) are errors, and every bad value stops
start-up with a :class:`ConfigError` naming the key, the value and the reason.

This is a frozen dataclass, not pydantic-settings as STYLE.md suggests: the
agent must stay under ~40 MB RSS on a device, and pydantic (with its compiled
core) costs more memory and install size than the whole check below.
``deploy/agent.example.toml`` documents every key; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import OutpostError
from shared.topics import check_agent_id

ENV_PREFIX = "OUTPOST_AGENT_"
_SECRET_KEYS = frozenset({"broker_password"})
#: Written by ``outpost-agent enroll`` (agent/enrol.py): settings the hub
#: issued (broker credentials, hub URL), relative to state_dir. They fill in
#: what the file, the environment and the flags leave unset.
ENROLMENT_FILE = Path("identity") / "enrolment.json"


class ConfigError(OutpostError):
    """A configuration value is missing or invalid."""

    code = "config_error"

    def __init__(self, key: str, value: Any, reason: str, source: str = "") -> None:
        shown = "***" if key in _SECRET_KEYS and value is not None else repr(value)
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key} = {shown}: {reason}")
        self.key = key
        self.value = value
        self.reason = reason
        self.source = source


Check = Callable[[Any], str | None]


def _setting(kind: str, doc: str, default: Any = dataclasses.MISSING, check: Check | None = None, **kw: Any) -> Any:
    """A field with its value kind, its documentation and an optional check
    returning the reason a value is bad (``None`` when it is fine)."""
    return field(default=default, metadata={"kind": kind, "doc": doc, "check": check}, **kw)


def _between(low: float, high: float) -> Check:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _one_of(*choices: str) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}"


def _agent_id(v: str) -> str | None:
    try:
        check_agent_id(v)
    except ValueError:
        return "use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def _existing_file(v: str | None) -> str | None:
    return None if v is None or Path(v).is_file() else "no such file"


def _counts(low: int, high: int) -> Check:
    def check(v: dict[str, int]) -> str | None:
        bad = sorted(k for k, n in v.items() if not low <= n <= high)
        return f"values must be between {low} and {high} (bad: {', '.join(bad)})" if bad else None
    return check


def _http_url(v: str | None) -> str | None:
    return None if v is None or v.startswith(("http://", "https://")) else "must start with http:// or https://"


def _public_keys(v: tuple[str, ...]) -> str | None:
    from shared.signing import BadKey, PublicKey

    for text in v:
        try:
            PublicKey.from_text(text)
        except BadKey as exc:
            return str(exc)
    return None


def _not_empty(v: Any) -> str | None:
    return None if str(v) else "must not be empty"


@dataclass(frozen=True, slots=True)
class AgentSettings:
    """Everything one agent process is configured with; valid once built."""

    agent_id: str = _setting("str", "This device's id: its MQTT client id and part of its topics.", check=_agent_id)
    state_dir: Path = _setting("path", "Folder for the inbox, the outbox and job work folders.", Path("/var/lib/outpost-agent"), _not_empty)
    device_root: Path = _setting(
        "path", "The device root (firmware_jobs/devroot.py): device.json, OTA slots and state, hooks, config and data folders jobs use and the inventory reads; unset: <state_dir>/device.",
        None)
    broker_host: str = _setting("str", "MQTT broker host name or address.", "127.0.0.1", _not_empty)
    broker_port: int = _setting("int", "MQTT broker port.", 1883, _between(1, 65535))
    broker_username: str | None = _setting("optstr", "MQTT user name (none: anonymous).", None)
    broker_password: str | None = _setting("optstr", "MQTT password.", None)
    broker_tls: bool = _setting("bool", "Connect to the broker over TLS, verified against tls_ca or, when that is unset, the system CA store (tls_ca or tls_cert turn TLS on too).", False)
    tls_ca: str | None = _setting("optstr", "CA bundle file; setting it turns TLS on.", None, _existing_file)
    tls_cert: str | None = _setting("optstr", "Client certificate file for mutual TLS.", None, _existing_file)
    tls_key: str | None = _setting("optstr", "Client private key file for mutual TLS.", None, _existing_file)
    keepalive: int = _setting("int", "MQTT keepalive in seconds.", 30, _between(5, 65535))
    reconnect_max: int = _setting("int", "Longest wait in seconds between two attempts to reach the broker (the wait doubles from 1 s up to this).", 30, _between(1, 3600))
    session_expiry: int = _setting("int", "Seconds the broker keeps this agent's session and queued messages.", 604800, _between(0, 4294967295))
    labels: dict[str, str] = _setting("labels", "Labels the hub targets devices by (table of string to string).", default_factory=dict)
    heartbeat_interval: float = _setting("float", "Seconds between heartbeats.", 10.0, _positive)
    result_resend_after: float = _setting("float", "Seconds to wait for the hub's ack before sending a result again.", 10.0, _positive)
    concurrency: int = _setting("int", "How many jobs run at the same time.", 2, _between(1, 64))
    job_type_concurrency: dict[str, int] = _setting(
        "intmap", "Most jobs of one type running at once, per job type (table, e.g. {\"firmware.update\" = 1}); others wait without blocking other types.",
        default_factory=dict, check=_counts(1, 64))
    job_cpu_seconds: int = _setting("int", "CPU seconds one job may use (RLIMIT_CPU in its process); past it the job fails cpu_limit. 0: no limit.", 3600, _between(0, 10**7))
    job_memory_mb: int = _setting("int", "Memory (data segment and private writable mappings: heap, anonymous mmap, thread stacks) one job's process may use, in MiB (RLIMIT_DATA); past it the job fails memory_limit. 0: no limit.", 1024, _between(0, 10**7))
    job_type_cpu_seconds: dict[str, int] = _setting("intmap", "job_cpu_seconds per job type (table of job type to seconds; 0: no limit).", default_factory=dict, check=_counts(0, 10**7))
    job_type_memory_mb: dict[str, int] = _setting("intmap", "job_memory_mb per job type (table of job type to MiB; 0: no limit).", default_factory=dict, check=_counts(0, 10**7))
    max_log_bytes: int = _setting("int", "Bytes of log (ctx.log lines, stdout, stderr) kept per try; past it one truncation line.", 1048576, _between(1024, 1024**3))
    command_allowlist: tuple[str, ...] = _setting("strlist", "Programs command.run may start (exact argv[0] match).", ())
    max_message_bytes: int = _setting("int", "Largest envelope accepted or sent, in bytes.", 262144, _between(1024, 268435455))
    inbox_retention: float = _setting("float", "Seconds a finished assignment is remembered, so a redelivery never runs twice.", 604800.0, _between(0, 10 * 365 * 86400))
    sqlite_synchronous: str = _setting(
        "choice", "SQLite synchronous mode for both queue files: FULL (for devices that can lose power) survives power loss, NORMAL only process crashes.",
        "FULL", _one_of("NORMAL", "FULL"),
    )
    claim_lease: float = _setting("float", "Seconds a claim (a job running or held, a result in flight) lives unless renewed; a claim left by a dead worker is ready again after it.", 300.0, _between(1, 86400))
    outbox_max_bytes: int = _setting("int", "Outbox disk quota in bytes (pages in use plus WAL); over it the agent refuses new assignments until results drain.", 268435456, _between(65536, 2**50))
    stop_timeout: float = _setting("float", "Seconds running jobs get to finish on SIGTERM before they are aborted.", 20.0, _between(0, 3600))
    hub_url: str | None = _setting("optstr", "Hub API base URL (e.g. https://hub.example:8080) for the HTTP bulk sync of large outbox backlogs and firmware downloads; none: MQTT only.", None, _http_url)
    hub_ca: str | None = _setting("optstr", "CA certificate file the hub's HTTPS certificate must chain to (enrolment and HTTP sync); none: the system CA store.", None, _existing_file)
    http_sync_threshold: int = _setting("int", "Outbox backlog (items) from which the outbox drains over HTTP, when hub_url is set; smaller backlogs go over MQTT.", 200, _between(1, 100_000_000))
    http_sync_batch: int = _setting("int", "Outbox items per HTTP sync batch (the hub's sync_max_batch_items must allow it).", 500, _between(1, 100_000))
    http_sync_timeout: float = _setting("float", "Seconds an HTTP sync request may take before it counts as failed (the outbox then falls back to MQTT for a while).", 60.0, _positive)
    log_level: str = _setting("choice", "Logging level.", "INFO", _one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    hub_public_keys: tuple[str, ...] = _setting(
        "strlist", "Hub signing public keys ('ed25519:...') trusted besides those in <state_dir>/identity/hub-keys.json (outpost-agent trust add); every message from the hub must be signed by one of them.",
        (), _public_keys)
    release_public_keys: tuple[str, ...] = _setting(
        "strlist", "Firmware release public keys ('ed25519:...') trusted besides those in <state_dir>/identity/release-keys.json (outpost-agent trust add --release); firmware.update installs only images whose manifest one of them signed. Not the hub's key.",
        (), _public_keys)
    replay_window: int = _setting("int", "How many of the hub's per-device sequence numbers behind the newest one seen are still accepted (once each); older ones are refused as replayed.", 4096, _between(16, 1_000_000))

    def __post_init__(self) -> None:
        if self.device_root is None or str(self.device_root) == "":
            # Its default follows state_dir, which a dataclass default cannot express.
            object.__setattr__(self, "device_root", Path(self.state_dir) / "device")
        for f in dataclasses.fields(self):
            # Accept the obvious spellings (an int for a float, a str for a
            # path, a list for a tuple) so code and tests can build settings too.
            value = _coerce(f.name, getattr(self, f.name), "")
            object.__setattr__(self, f.name, value)
            check = f.metadata["check"]
            reason = check(value) if check is not None else None
            if reason is not None:
                raise ConfigError(f.name, value, reason)

    @property
    def inbox_path(self) -> Path:
        return self.state_dir / "inbox.sqlite3"

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.sqlite3"

    @property
    def work_dir(self) -> Path:
        """Parent of the per-assignment work folders."""
        return self.state_dir / "work"


_KIND_TYPES = {
    "str": "a string", "optstr": "a string", "choice": "a string", "path": "a path", "int": "an integer",
    "float": "a number", "strlist": "a list of strings", "labels": "a table of string to string",
    "intmap": "a table of string to integer", "bool": "true or false",
}


def _is_kind(value: Any, kind: str) -> bool:
    if kind in ("str", "choice"):
        return isinstance(value, str)
    if kind == "optstr":
        return value is None or isinstance(value, str)
    if kind == "path":
        return isinstance(value, Path)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, float)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "strlist":
        return isinstance(value, tuple) and all(isinstance(v, str) for v in value)
    if kind == "intmap":
        return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in value.items())
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())


FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(AgentSettings)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """A TOML (or flag) value turned into the field's type, or ConfigError."""
    if key not in FIELDS:
        raise ConfigError(key, value, f"unknown setting; known: {', '.join(FIELDS)}", source)
    kind = FIELDS[key].metadata["kind"]
    if kind == "path" and isinstance(value, str | Path):
        return Path(value)
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "strlist" and isinstance(value, list | tuple):
        value = tuple(value)
    if kind in ("labels", "intmap") and isinstance(value, dict):
        value = dict(value)
    if not _is_kind(value, kind):
        raise ConfigError(key, value, f"must be {_KIND_TYPES[kind]}", source)
    if kind == "choice":
        value = value.upper()
    return value


def _parse_env(key: str, text: str, source: str) -> Any:
    """An environment string turned into the field's TOML-like value."""
    kind = FIELDS[key].metadata["kind"] if key in FIELDS else "str"
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.strip().lower()]
    except (ValueError, KeyError):
        raise ConfigError(key, text, f"must be {_KIND_TYPES[kind]}", source) from None
    if kind == "optstr":
        return text or None
    if kind == "strlist":
        return [item.strip() for item in text.split(",") if item.strip()]
    if kind in ("labels", "intmap"):
        pairs = [item.strip() for item in text.split(",") if item.strip()]
        if not all("=" in p for p in pairs):
            raise ConfigError(key, text, "must be comma-separated key=value pairs", source)
        value = dict(p.split("=", 1) for p in pairs)
        if kind == "intmap":
            try:
                return {k.strip(): int(v) for k, v in value.items()}
            except ValueError:
                raise ConfigError(key, text, "must be comma-separated name=integer pairs", source) from None
        return value
    return text


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    enrolment: bool = True,
) -> AgentSettings:
    """Build settings from ``path`` (TOML), ``env`` (default ``os.environ``)
    and ``overrides`` (command-line flags). Labels from ``overrides`` are
    added to the file's labels rather than replacing them. Raises ConfigError."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        source = str(path)
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError("config", source, f"cannot read the file: {exc.strerror}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError("config", source, f"not valid TOML: {exc}") from exc
        for key, value in document.items():
            values[key], sources[key] = _coerce(key, value, source), source
    for name, text in sorted((os.environ if env is None else env).items()):
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX):].lower()
            values[key], sources[key] = _coerce(key, _parse_env(key, text, name), name), name
    for key, value in (overrides or {}).items():
        value = _coerce(key, value, "command line")
        values[key] = {**values.get(key, {}), **value} if key == "labels" else value
        sources[key] = "command line"
    if enrolment:
        _fill_from_enrolment(values, sources)
    if "agent_id" not in values:
        raise ConfigError("agent_id", None, f"is required: set it in the config file, {ENV_PREFIX}AGENT_ID or --agent-id, or run 'outpost-agent enroll'")
    try:
        return AgentSettings(**values)
    except ConfigError as exc:
        # The range checks run in the dataclass, which cannot know where a
        # value came from; say it here so the user knows what to edit.
        raise ConfigError(exc.key, exc.value, exc.reason, sources.get(exc.key, "")) from None


def _fill_from_enrolment(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Settings from the enrolment file fill the gaps (labels merge under the
    configured ones). An agent_id other than the enrolled one is an error:
    the credentials and the key belong to the enrolled id."""
    state_dir = values.get("state_dir", FIELDS["state_dir"].default)
    path = Path(state_dir) / ENROLMENT_FILE
    try:
        document = json.loads(path.read_bytes())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise ConfigError("enrolment", str(path), f"cannot read the enrolment file: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError("enrolment", str(path), "the enrolment file must hold a JSON object")
    enrolled = document.get("agent_id")
    if "agent_id" in values and enrolled is not None and values["agent_id"] != enrolled:
        raise ConfigError("agent_id", values["agent_id"], f"this device is enrolled as {enrolled!r} ({path}); remove agent_id from the configuration or enrol again", sources.get("agent_id", ""))
    for key, value in document.items():
        value = _coerce(key, value, str(path))
        if key == "labels":
            values[key] = {**value, **values.get(key, {})}
        elif key not in values:
            values[key], sources[key] = value, str(path)


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, documentation) of every setting, for docs and checks."""
    out = []
    for f in dataclasses.fields(AgentSettings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        out.append((f.name, None if default is dataclasses.MISSING else default, f.metadata["doc"]))
    return out
