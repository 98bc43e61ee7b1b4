"""``outpost-agent``: run the agent, check its configuration, look at its queues.

Library errors become one-line messages here and nowhere else; exit codes
are the named constants of :class:`ExitCode`.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from enum import IntEnum
from typing import Any

from agent import __version__, fleetsim
from agent.config import ENV_PREFIX, AgentSettings, ConfigError, load_settings
from agent.context import make_agent_event
from agent.queues import Entry, Inbox, Outbox, QueueError
from shared.clock import SystemClock
from shared.hlc import HybridClock


class ExitCode(IntEnum):
    """Every exit status ``outpost-agent`` uses."""

    OK = 0
    FAILURE = 1  # an unexpected error; the log has the traceback
    CONFIG_ERROR = 2  # bad configuration or command-line usage
    BROKER_UNREACHABLE = 3  # check --connect could not reach the broker
    STATE_ERROR = 4  # the queue files in state_dir cannot be opened


_ENV_NOTE = f"Every setting can also be set as an environment variable {ENV_PREFIX}<KEY> (e.g. {ENV_PREFIX}BROKER_HOST); flags win over the environment, which wins over the file."

_RUN_EXAMPLE = """example:
  outpost-agent run --config /etc/outpost/agent.toml
  outpost-agent run --config agent.toml --agent-id pump-7 --broker mqtt.local:1883 --label site=north
"""
_CHECK_EXAMPLE = """example:
  outpost-agent check --config /etc/outpost/agent.toml
  outpost-agent check --config agent.toml --connect    # also try the broker (exit 3 if unreachable)
"""
_EMIT_EXAMPLE = """example:
  outpost-agent emit battery_low --config /etc/outpost/agent.toml
  outpost-agent emit battery_low --data '{"level": 0.08}' --config agent.toml
"""
_ENROLL_EXAMPLE = """example:
  outpost-agent enroll --hub https://hub.example:8080 --token opte_... --ca-file /etc/outpost/ca.pem
  outpost-agent enroll --hub https://hub.example:8080 --token opte_... --agent-id pump-7 --state-dir /var/lib/outpost-agent
then: outpost-agent run --config /etc/outpost/agent.toml   (agent_id and broker_* come from the enrolment)
"""
_KEYGEN_EXAMPLE = """example:
  outpost-agent keygen --config /etc/outpost/agent.toml
  # then on the hub: outpost-hub agents register --id <agent_id> --public-key <the printed key>
"""
_TRUST_EXAMPLE = """example:
  outpost-agent trust add ed25519:... --config /etc/outpost/agent.toml   # a key from 'outpost-hub keys list'
  outpost-agent trust add --release ed25519:... --config /etc/outpost/agent.toml   # a firmware release key
  outpost-agent trust list --config /etc/outpost/agent.toml
"""
_QUEUE_EXAMPLE = """example:
  outpost-agent queue ls --config /etc/outpost/agent.toml
  outpost-agent queue ls --config agent.toml -o json
"""


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"label {text!r} is not key=value")
    return key, value


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"broker {text!r} is not HOST:PORT")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outpost-agent",
        description="The Outpost edge agent: runs assigned jobs from a durable local queue and syncs results to the hub.",
        epilog="example:\n  outpost-agent run --config /etc/outpost/agent.toml\n\n" + _ENV_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"outpost-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, example: str, parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, epilog=example + "\n" + _ENV_NOTE, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        return sub

    run = command("run", "Run the agent until SIGTERM or SIGINT.", _RUN_EXAMPLE)
    run.description = """Run the agent until SIGTERM or SIGINT.

signals:
  SIGTERM, SIGINT  graceful stop: no new work, running jobs get stop_timeout seconds, then are
                   aborted; the retained offline status is published; exit 0
  SIGHUP           re-read the configuration file: labels, concurrency, heartbeat_interval,
                   log_level, command_allowlist and the limits change live; agent_id, state_dir
                   and the broker need a restart (a warning names them); a bad file is ignored

Under systemd (Type=notify) it sends READY=1 after start-up recovery, STATUS= lines,
STOPPING=1, and WATCHDOG=1 every WatchdogSec/2 while its threads are healthy."""
    run.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    run.add_argument("--agent-id", metavar="ID", help="this device's id (overrides agent_id)")
    run.add_argument("--state-dir", metavar="DIR", help="folder for queues and work folders (overrides state_dir)")
    run.add_argument("--broker", type=_broker, metavar="HOST:PORT", help="MQTT broker (overrides broker_host and broker_port)")
    run.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE", help="add a label (repeatable; added to the file's labels)")
    run.add_argument("--stop-timeout", type=float, metavar="SECONDS", help="how long running jobs get to finish on SIGTERM before they are aborted (overrides stop_timeout, default 20)")

    check_help = "Validate the configuration; exit 0 when it is good, 2 with the key and reason when not."
    config = command("config", "Configuration commands (config check is the same as check).", _CHECK_EXAMPLE.replace("agent check", "agent config check"))
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    for check in (command("check", check_help, _CHECK_EXAMPLE), command("check", check_help, _CHECK_EXAMPLE, config_commands)):
        check.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
        check.add_argument("--connect", action="store_true", help="also open a TCP connection to the broker (credentials are not tried, so a running agent is not disturbed)")

    emit = command("emit", "Queue an agent event (a condition of this device) in the outbox; the agent sends it to the hub, where it triggers the DAGs scheduled on AgentEvent(NAME).", _EMIT_EXAMPLE)
    emit.add_argument("name", metavar="NAME", help="the event name: 1-128 letters, digits, '.', '_' or '-'")
    emit.add_argument("--data", default="{}", metavar="JSON", help="the event's payload, a JSON object of at most 16 KiB (default {})")
    emit.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file (for agent_id and state_dir)")

    enroll = command("enroll", "Enrol this device with a hub: make its key pair (the private key stays here), register the public key with a one-time token, store the broker credentials the hub issues.", _ENROLL_EXAMPLE)
    enroll.add_argument("--hub", required=True, metavar="URL", help="the hub's base URL, https://...")
    enroll.add_argument("--token", required=True, metavar="TOKEN", help="the one-time enrolment token (outpost-hub agents token create)")
    enroll.add_argument("--agent-id", metavar="ID", help="this device's id (may be left out when the token names one)")
    enroll.add_argument("--ca-file", metavar="FILE", help="CA certificate the hub's HTTPS certificate chains to; also used for the broker's TLS (default: the system CA store)")
    enroll.add_argument("--config", metavar="FILE", help="TOML configuration file (for state_dir)")
    enroll.add_argument("--state-dir", metavar="DIR", help="folder for the device's identity and queues (overrides state_dir)")
    enroll.add_argument("--force", action="store_true", help="enrol again with a new key, replacing this device's identity")
    keygen = command("keygen", "Create this device's signing key if it has none (mode 0600 in state_dir/identity) and print its public key, for pre-registration on the hub.", _KEYGEN_EXAMPLE)
    keygen.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file (for state_dir)")
    trust = command("trust", "The hub signing keys this device accepts messages from, and the firmware release keys it accepts images from.", _TRUST_EXAMPLE)
    trust_commands = trust.add_subparsers(dest="trust_command", required=True, metavar="COMMAND")
    trust_add = command("add", "Trust a hub public key (ed25519:...), or with --release a firmware release key.", _TRUST_EXAMPLE, trust_commands)
    trust_add.add_argument("key", metavar="KEY", help="the hub's public key, ed25519:...")
    trust_add.add_argument("--release", action="store_true", help="KEY is a firmware release key (firmware.update), not a hub key")
    trust_add.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    trust_list = command("list", "List the trusted hub keys and firmware release keys.", _TRUST_EXAMPLE, trust_commands)
    trust_list.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")

    queue = command("queue", "Inspect the agent's queues.", _QUEUE_EXAMPLE)
    queue_commands = queue.add_subparsers(dest="queue_command", required=True, metavar="COMMAND")
    ls = command("ls", "List inbox and outbox depth and items.", _QUEUE_EXAMPLE, queue_commands)
    ls.add_argument("--config", required=True, metavar="FILE", help="TOML configuration file")
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format (default table)")
    ls.add_argument("--limit", type=int, default=100, help="at most this many items per queue (default 100)")

    fleetsim.add_arguments(command("simulate", fleetsim.HELP, fleetsim.EXAMPLE))
    return parser


def setup_logging(level: str, agent_id: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{agent_id}] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if getattr(args, "agent_id", None):
        values["agent_id"] = args.agent_id
    if getattr(args, "state_dir", None):
        values["state_dir"] = args.state_dir
    if getattr(args, "broker", None):
        values["broker_host"], values["broker_port"] = args.broker
    if getattr(args, "label", None):
        values["labels"] = dict(args.label)
    if getattr(args, "stop_timeout", None) is not None:
        values["stop_timeout"] = args.stop_timeout
    return values


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        return fleetsim.main(args, list(sys.argv[1:] if argv is None else argv))
    if args.command == "enroll":
        return _enroll(args)
    try:
        settings = load_settings(args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"outpost-agent: configuration error: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if args.command in ("check", "config"):
        return _check(settings, args.connect)
    if args.command == "queue":
        return _queue_ls(settings, args.output, args.limit)
    if args.command == "emit":
        return _emit(settings, args.name, args.data)
    if args.command in ("keygen", "trust"):
        return _identity(settings, args)
    return _run(settings, lambda: load_settings(args.config, overrides=_overrides(args)))


def _run(settings: AgentSettings, reload: Callable[[], AgentSettings]) -> int:
    setup_logging(settings.log_level, settings.agent_id)
    from agent.daemon import Agent  # imported here: check and queue ls need no MQTT client

    try:
        agent = Agent(settings)
    except QueueError as exc:
        logging.getLogger("agent").error("%s", exc)
        return ExitCode.STATE_ERROR
    agent.run_forever(reload=reload)
    return ExitCode.OK


def _identity(settings: AgentSettings, args: argparse.Namespace) -> int:
    from agent import identity
    from agent.trust import TrustStore, add_release_key, release_keys
    from shared.signing import BadKey, PublicKey

    try:
        if args.command == "keygen":
            existed = identity.device_key_path(settings).exists()
            key = identity.device_key(settings)
            print(key.public.to_text())
            print(f"{'existing' if existed else 'new'} device key {key.kid} in {identity.device_key_path(settings)}", file=sys.stderr)
            return ExitCode.OK
        if args.trust_command == "add" and args.release:
            key = PublicKey.from_text(args.key)
            added = add_release_key(settings, key)
            print(f"release key {key.kid} {'trusted' if added else 'was already trusted'} (takes effect at the agent's next start or reload)")
            return ExitCode.OK
        store = TrustStore(settings)
        if args.trust_command == "add":
            key = PublicKey.from_text(args.key)
            added = store.add(key)
            print(f"hub key {key.kid} {'trusted' if added else 'was already trusted'}")
            return ExitCode.OK
        retired = store.retired()
        for kid, key in sorted(store.keys().items()):
            print(f"{kid}  {key.to_text()}")
        for kid in sorted(retired):
            print(f"{kid}  retired by the hub")
        for text in release_keys(settings):
            print(f"{PublicKey.from_text(text).kid}  {text}  firmware release key")
        return ExitCode.OK
    except BadKey as exc:
        print(f"outpost-agent: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR


def _check(settings: AgentSettings, connect: bool) -> int:
    print(f"configuration OK: agent {settings.agent_id}, broker {settings.broker_host}:{settings.broker_port}, state in {settings.state_dir}")
    if connect:
        try:
            with socket.create_connection((settings.broker_host, settings.broker_port), timeout=5.0):
                pass
        except OSError as exc:
            print(f"outpost-agent: broker {settings.broker_host}:{settings.broker_port} is unreachable: {exc}", file=sys.stderr)
            return ExitCode.BROKER_UNREACHABLE
        print(f"broker {settings.broker_host}:{settings.broker_port} accepts connections")
    return ExitCode.OK


def _emit(settings: AgentSettings, name: str, data_text: str) -> int:
    """Store the event in the outbox file the running agent drains (or will
    drain when it starts): it reaches the hub exactly like a job's results."""
    try:
        data = json.loads(data_text)
    except ValueError as exc:
        print(f"outpost-agent: --data is not JSON: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    if not isinstance(data, dict):
        print("outpost-agent: --data must be a JSON object, e.g. '{\"level\": 0.08}'", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    clock = SystemClock()
    try:
        event = make_agent_event(name, data, clock.now())
    except ValueError as exc:
        print(f"outpost-agent: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR
    stamp = HybridClock(settings.agent_id, lambda: int(clock.now() * 1000)).now()
    try:
        outbox = Outbox(settings.outbox_path, settings.sqlite_synchronous)
        try:
            outbox.put_event(event, stamp)
        finally:
            outbox.close()
    except QueueError as exc:
        print(f"outpost-agent: {exc}", file=sys.stderr)
        return ExitCode.STATE_ERROR
    print(f"queued agent event {name} ({event.event_id}) in {settings.outbox_path}; the agent sends it to the hub when connected")
    return ExitCode.OK


_OUTBOX_STATUS = {"ready": "waiting", "claimed": "in_flight", "done": "acked", "failed": "failed"}


def _inbox_row(entry: Entry) -> dict[str, Any]:
    return {"assignment_id": entry.key, "status": entry.status, "job_type": entry.data.get("job_type"),
            "not_before": entry.data.get("not_before"), "deadline": entry.data.get("deadline")}


def _outbox_row(entry: Entry) -> dict[str, Any]:
    if "event" in entry.data:
        return {"assignment_id": entry.key, "status": _OUTBOX_STATUS[entry.status], "result": f"event {entry.data['event'].get('name')}",
                "error": None, "hlc": entry.data.get("hlc")}
    if "log" in entry.data:
        chunk = entry.data["log"]
        return {"assignment_id": entry.key, "status": _OUTBOX_STATUS[entry.status],
                "result": f"log chunk {chunk.get('seq')}{' (last)' if chunk.get('final') else ''}, {len(chunk.get('data', ''))} chars",
                "error": None, "hlc": entry.data.get("hlc")}
    result = entry.data.get("result", {})
    error = result.get("error") or {}
    return {"assignment_id": entry.key, "status": _OUTBOX_STATUS[entry.status], "result": result.get("status"),
            "error": error.get("code"), "hlc": entry.data.get("hlc")}


def _queue_ls(settings: AgentSettings, output: str, limit: int) -> int:
    report: dict[str, Any] = {}
    for name, cls, row in (("inbox", Inbox, _inbox_row), ("outbox", Outbox, _outbox_row)):
        path = settings.inbox_path if name == "inbox" else settings.outbox_path
        if not path.exists():  # do not create queue files just by looking
            report[name] = {"path": str(path), "depth": 0, "items": []}
            continue
        try:
            queue = cls(path, settings.sqlite_synchronous)
            try:
                report[name] = {"path": str(path), "depth": queue.depth(), "items": [row(e) for e in queue.items(limit)]}
            finally:
                queue.close()
        except QueueError as exc:
            print(f"outpost-agent: {exc}", file=sys.stderr)
            return ExitCode.STATE_ERROR
    if output == "json":
        print(json.dumps(report, indent=2))
    else:
        _print_tables(report)
    return ExitCode.OK


def _print_tables(report: dict[str, Any]) -> None:
    titles = {"inbox": "not finished", "outbox": "not acknowledged"}
    for name in ("inbox", "outbox"):
        section = report[name]
        print(f"{name}: {section['depth']} {titles[name]} ({section['path']})")
        items = section["items"]
        if not items:
            print("  (empty)\n")
            continue
        columns = list(items[0])
        cells = [[("-" if item[c] is None else str(item[c])) for c in columns] for item in items]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
        print("  " + "  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
        for row in cells:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        print()


def _enroll(args: argparse.Namespace) -> int:
    from agent.enrol import EnrolmentFailed, enrol
    from shared.signing import BadKey

    overrides = {k: v for k, v in _overrides(args).items() if k == "state_dir"}
    # Without the enrolment file: enrolling needs state_dir, and the agent id
    # the file names (unless --agent-id gives one) is the one to enrol as.
    agent_id = args.agent_id
    try:
        settings = load_settings(args.config, overrides=overrides, enrolment=False)
        agent_id = agent_id or settings.agent_id
    except ConfigError as exc:
        if exc.key != "agent_id":
            print(f"outpost-agent: configuration error: {exc}", file=sys.stderr)
            return ExitCode.CONFIG_ERROR
        settings = load_settings(args.config, overrides={"agent_id": "enrolling", **overrides}, enrolment=False)
    try:
        done = enrol(settings, args.hub, args.token, agent_id, args.ca_file, force=args.force)
    except (EnrolmentFailed, BadKey, OSError) as exc:
        print(f"outpost-agent: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    broker = f"broker {done.broker['host']}:{done.broker['port']}{' (TLS)' if done.broker.get('tls') else ''} as {done.broker['username']}" if done.broker else "broker credentials are managed outside Outpost"
    print(f"enrolled as {done.agent_id} (device key {done.key_id}); {broker}; settings in {done.enrolment_file}")
    return ExitCode.OK
