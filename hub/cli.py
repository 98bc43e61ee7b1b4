"""``outpost-hub``: run the hub (standalone, scheduler, api) and maintain it."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from types import FrameType

from hub import cli_auth
from shared.errors import OutpostError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BROKER = 3

_EPILOG = {
    "standalone": "example:\n  outpost-hub standalone                 # broker, hub, 3 agents, runs fleet_health\n  outpost-hub standalone --agents 5 --port 9000 --no-demo\n\nenvironment: OUTPOST_HUB_<SETTING> overrides any setting (see docs/configuration.md)",
    "scheduler": "example:\n  outpost-hub scheduler --config /etc/outpost/hub.toml",
    "api": "example:\n  outpost-hub api --config /etc/outpost/hub.toml --port 8080",
    "db": "example:\n  outpost-hub db upgrade --config /etc/outpost/hub.toml",
    "dags": "example:\n  outpost-hub dags check ./dags     # exit 1 and the reasons if any file fails",
    "secrets": (
        "examples:\n  outpost-hub secrets generate-key                 # print a new Fernet key\n"
        "  OUTPOST_HUB_FERNET_KEYS=NEW,OLD outpost-hub secrets rotate --config /etc/outpost/hub.toml\n\n"
        "rotation: put the new key first in fernet_keys (keep the old one after it), restart the hub,\n"
        "run 'secrets rotate' (re-encrypts every stored value with the first key), then remove the old key."
    ),
    "agents": (
        "example:\n  outpost-hub agents token create --expires 24h --labels site=north --config /etc/outpost/hub.toml\n"
        "  outpost-hub agents register --id pump-7 --public-key ed25519:... --config hub.toml\n"
        "  outpost-hub agents revoke pump-7 --config hub.toml\n"
        "  outpost-hub agents reinstate pump-7 --config hub.toml"
    ),
    "broker": "example:\n  outpost-hub broker setup --config /etc/outpost/hub.toml   # roles and the hub's client, once per broker",
    **cli_auth.EPILOG,
}


def _security_epilog() -> dict[str, str]:
    from hub.cli_security import EPILOG

    return EPILOG


def build_parser() -> argparse.ArgumentParser:
    _EPILOG.update(_security_epilog())
    parser = argparse.ArgumentParser(
        prog="outpost-hub",
        description="The Outpost hub: schedules DAGs and dispatches work to edge agents over MQTT.",
        epilog="example:\n  outpost-hub standalone\n\nSee 'outpost-hub COMMAND --help'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG[name], formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", type=Path, help="hub TOML settings file")
        return p

    p = command("standalone", "Run everything on this machine: private Mosquitto, hub, API, dashboard and local agents.")
    p.add_argument("--state-dir", type=Path, default=Path(".outpost"), help="folder for the broker, hub and agent state (default .outpost)")
    p.add_argument("--agents", type=int, default=3, help="local agents to start (default 3)")
    p.add_argument("--port", type=int, default=8080, help="API and dashboard port (default 8080; another free port if taken)")
    p.add_argument("--dag", action="append", help="DAG to trigger once the agents are online; repeat for several, run one after the other (default: fleet_health, then firmware_rollout)")
    p.add_argument("--no-demo", action="store_true", help="start everything but trigger nothing")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo run finished; exit 1 if it failed")
    p.add_argument("--dags-folder", type=Path, help="DAG folder (default: the bundled examples)")

    for name, text in (("scheduler", "Run the scheduler, dispatcher, event ingestion and outbox publisher."), ("api", "Run the REST API and dashboard.")):
        p = command(name, text)
        p.add_argument("--host", help="listen address (api)")
        p.add_argument("--port", type=int, help="listen port (api)")

    p = command("db", "Database maintenance.")
    p.add_argument("action", choices=["upgrade"], help="upgrade: apply all migrations")

    p = command("dags", "DAG file maintenance.")
    p.add_argument("action", choices=["check"], help="check: load every DAG file and report errors")
    p.add_argument("folder", nargs="?", type=Path, help="DAG folder (default: the configured dags_folder)")

    p = command("secrets", "Encryption keys of variables and connections.")
    p.add_argument("action", choices=["rotate", "reencrypt", "generate-key"], help="rotate (or reencrypt): re-encrypt every stored value with the first key of fernet_keys; generate-key: print a new key")
    p.add_argument("--batch", type=int, default=500, help="values re-encrypted per transaction (default 500)")
    p = command("agents", "Device enrolment, pre-registration and revocation.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = actions.add_parser("token", help="enrolment tokens").add_subparsers(dest="token_action", required=True, metavar="ACTION")
    c = t.add_parser("create", help="an expiring enrolment token (one-time unless --uses), printed once")
    c.add_argument("--expires", default="24h", help="lifetime: a number and s, m, h or d (default 24h, at most 30d)")
    c.add_argument("--labels", action="append", default=[], metavar="K=V", help="label the enrolled agent starts with (repeat, or k=v,k2=v2)")
    c.add_argument("--agent-id", help="the id the device must enrol as (default: the device chooses a new id)")
    c.add_argument("--uses", type=int, default=1, help="how many devices may enrol with it (default 1; more: a fleet provisioning token, not with --agent-id)")
    r = actions.add_parser("register", help="pre-register a device: its id and a public key made on it")
    r.add_argument("--id", required=True, dest="agent_id", help="the agent id")
    r.add_argument("--public-key", required=True, help="the device's public key, ed25519:<base64url> (outpost-agent keygen prints it)")
    r.add_argument("--replace", action="store_true", help="replace a different key already registered (a device that lost its key)")
    v = actions.add_parser("revoke", help="revoke a device: refuse its messages and API calls, delete its broker client")
    v.add_argument("agent_id", help="the agent id")
    i = actions.add_parser("reinstate", help="lift a revocation; the device then enrols again with a token made for its id")
    i.add_argument("agent_id", help="the agent id")
    for sub_parser in (c, r, v, i):
        sub_parser.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="hub TOML settings file")

    p = command("broker", "Set up the broker's dynamic security for Outpost (needs broker_admin_username).")
    p.add_argument("action", choices=["setup"], help="setup: create the outpost-hub role and the hub's client (broker_username/password), deny by default")
    cli_auth.register(command)
    from hub.cli_security import add_commands

    add_commands(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        if args.command == "standalone":
            return _standalone(args)
        if args.command in ("scheduler", "api"):
            return _serve(args)
        if args.command == "db":
            return _db(args)
        if args.command == "secrets":
            return _secrets(args)
        if args.command == "agents":
            return _agents(args)
        if args.command == "broker":
            return _broker(args)
        if args.command in ("users", "tokens"):
            return cli_auth.run(args, _settings(args))
        if args.command == "keys":
            from hub.cli_security import run

            return run(args, _settings(args))
        return _dags(args)
    except OutpostError as exc:
        print(f"outpost-hub: {exc}", file=sys.stderr)
        return EXIT_CONFIG if exc.code == "config_error" else EXIT_FAILED


def _settings(args: argparse.Namespace, **overrides: object):  # type: ignore[no-untyped-def]
    from hub.config import HubSettings

    return HubSettings.load(args.config, **overrides)


def _stop_on_signals() -> None:
    """SIGTERM (systemd, kill) stops as cleanly as Ctrl-C does."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    # Also SIGINT: a process started in the background by a shell inherits
    # SIGINT ignored, and Python then installs no Ctrl-C handler of its own.
    signal.signal(signal.SIGINT, handler)


def _standalone(args: argparse.Namespace) -> int:
    from hub.standalone import BrokerMissing, Standalone

    overrides = {"dags_folder": args.dags_folder} if args.dags_folder else {}
    app = Standalone(args.state_dir, agents=args.agents, api_port=args.port, config_file=args.config, overrides=overrides)
    _stop_on_signals()
    try:
        try:
            runtime = app.start()
        except BrokerMissing as exc:
            print(f"outpost-hub: {exc}", file=sys.stderr)
            return EXIT_BROKER
        url = runtime.api_url
        print(f"Outpost hub running. Dashboard: {url}/   API: {url}/api/v1/   OpenAPI: {url}/api/v1/openapi.json", flush=True)
        if app.admin is not None:
            pw = app.admin.password_file
            where = f"password {pw.read_text().strip()} (kept in {pw}; change it with 'outpost-hub users passwd admin')" if pw else "with the password set for it"
            print(f"Log in as {app.admin.name}, {where}.", flush=True)
            if app.admin.token_file is not None:
                print(f"The outpost CLI uses the admin token in {app.admin.token_file}.", flush=True)
        print(f"State in {app.state_dir}; broker on 127.0.0.1:{app.broker.port}; {args.agents} agent(s) starting.", flush=True)
        outcome = EXIT_OK
        if not args.no_demo:
            for dag_id in args.dag or DEMO_DAGS:
                outcome = max(outcome, _demo(app, dag_id, url))
        if args.exit_after_demo:
            return outcome
        print("Press Ctrl-C to stop.", flush=True)
        runtime.wait()
        return EXIT_OK
    except KeyboardInterrupt:
        print("\nStopping agents, hub and broker...", flush=True)
        return EXIT_OK
    finally:
        app.stop()


#: What the demo runs: diagnostics from every device, then a staged firmware update.
DEMO_DAGS = ("fleet_health", "firmware_rollout")


def _demo(app: object, dag_id: str, url: str) -> int:
    from hub.standalone import Standalone

    assert isinstance(app, Standalone)
    online = app.wait_for_agents()
    print(f"{online} agent(s) online. Triggering {dag_id}...", flush=True)
    run_pk = app.trigger(dag_id)
    print(f"Run {run_pk}: {url}/runs/{run_pk}", flush=True)
    run = app.wait_for_run(run_pk)
    for ti in app.describe_run(run_pk):
        where = f" on {ti.agent_id}" if ti.agent_id else ""
        print(f"  {ti.task_id}[{ti.map_index}]{where}: {ti.state}", flush=True)
        if ti.kind == "hub" and ti.output is not None:
            print("    " + json.dumps(ti.output), flush=True)
        if ti.error:
            print(f"    error: {ti.error.get('message')}", flush=True)
    for rollout in app.rollouts_of(run_pk):
        counts = ", ".join(f"{n} {state}" for state, n in sorted(rollout["counts"].items()) if n)
        print(f"Rollout {rollout['id']} ({rollout['task_id']}): {rollout['state']}; {counts}; "
              f"failure rate {rollout['failure_rate']:.0%} (threshold {rollout['failure_threshold']:.0%}): {url}/rollouts/{rollout['id']}", flush=True)
    print(f"Run {run_pk} of {dag_id}: {run.state}", flush=True)
    return EXIT_OK if run.state == "success" else EXIT_FAILED


def _serve(args: argparse.Namespace) -> int:
    from hub.runtime import HubRuntime

    overrides = {"api_host": args.host, "api_port": args.port}
    runtime = HubRuntime(_settings(args, **overrides), run_scheduler=args.command == "scheduler", run_api=args.command == "api")
    _stop_on_signals()
    try:
        runtime.start()
        if args.command == "api":
            print(f"Outpost API at {runtime.api_url}/api/v1/", flush=True)
        runtime.wait()
    except KeyboardInterrupt:
        pass
    finally:
        runtime.stop()
    return EXIT_OK


def _db(args: argparse.Namespace) -> int:
    from hub.db import upgrade

    settings = _settings(args)
    upgrade(settings.db_url)
    print(f"database at {settings.db_url} is up to date")
    return EXIT_OK


def _secrets(args: argparse.Namespace) -> int:
    from hub import vault
    from hub.db import make_engine, make_sessionmaker
    from hub.encryption import generate_key, parse_keys

    if args.action == "generate-key":
        print(generate_key())
        return EXIT_OK
    settings = _settings(args)
    cipher = parse_keys(settings.fernet_keys)
    engine = make_engine(settings.db_url, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        counts = vault.reencrypt(make_sessionmaker(engine), cipher, batch=max(1, args.batch))
    finally:
        engine.dispose()
    print(f"re-encrypted {counts['rotated']} stored value(s) with the first key; {counts['unchanged']} already used it")
    if cipher.key_count > 1:
        print(f"every value now uses the first key: the other {cipher.key_count - 1} key(s) can be removed from fernet_keys")
    return EXIT_OK


def _dags(args: argparse.Namespace) -> int:
    from hub.dagprocessor import DagFileProcessor, SerializedDagBag

    settings = _settings(args)
    folder = args.folder or settings.dags_folder
    # The same separate-process parse as the hub's, so the verdict is the hub's.
    processor = DagFileProcessor(timeout=settings.dag_file_processor_timeout, parallelism=settings.dag_parsing_processes, memory_mb=settings.dag_file_processor_memory_mb)
    bag = SerializedDagBag(folder, processor)
    bag.collect()
    for dag_id, dag in sorted(bag.dags.items()):
        print(f"ok     {dag_id} ({len(dag.structure.get('tasks', []))} tasks) {dag.fileloc}")
    for err in bag.errors.values():
        print(f"error  {err.fileloc}: {err.kind}: {err.error}")
    return EXIT_FAILED if bag.errors else EXIT_OK


def _labels(values: list[str]) -> dict[str, str]:
    from hub.errors import InvalidRequest

    labels: dict[str, str] = {}
    for value in values:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            key, sep, val = pair.partition("=")
            if not sep or not key:
                raise InvalidRequest(f"label {pair!r} is not key=value")
            labels[key] = val
    return labels


def _agents(args: argparse.Namespace) -> int:
    from hub import enrolment
    from hub.brokeradmin import BrokerAdmin
    from hub.db import make_engine, make_sessionmaker, transaction, upgrade
    from shared.clock import SystemClock, utcnow

    settings = _settings(args)
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = make_sessionmaker(engine)
    now = utcnow(SystemClock())
    broker = BrokerAdmin.from_settings(settings)
    try:
        if args.action == "token":
            with transaction(sessions) as session:
                issued = enrolment.create_token(session, now, enrolment.parse_duration(args.expires), "cli", args.agent_id, _labels(args.labels), args.uses)
            print(issued.token)
            bound = f" for agent {issued.agent_id}" if issued.agent_id else ""
            kind = "one-time enrolment token" if issued.uses == 1 else f"enrolment token for {issued.uses} devices"
            print(f"{kind} {issued.id}{bound}, expires {issued.expires_at:%Y-%m-%d %H:%M UTC}; it is not shown again", file=sys.stderr)
            return EXIT_OK
        if args.action == "register":
            credentials = enrolment.preregister(sessions, broker, now, args.agent_id, args.public_key, "cli", replace=args.replace)
            print(f"registered {args.agent_id}")
            if credentials is not None:
                print(f"broker_username = {json.dumps(credentials.username)}\nbroker_password = {json.dumps(credentials.password)}")
                print("(put these in the device's agent.toml; the password is not shown again)", file=sys.stderr)
            return EXIT_OK
        if args.action == "reinstate":
            enrolment.reinstate(sessions, now, args.agent_id, "cli")
            print(f"reinstated {args.agent_id}; enrol it again: outpost-hub agents token create --agent-id {args.agent_id}")
            return EXIT_OK
        done = enrolment.revoke(sessions, broker, now, args.agent_id, "cli")
        where = "its broker client is deleted" if done.broker == "removed" else "broker credentials are managed outside Outpost: remove its broker client there"
        print(f"revoked {done.agent_id} at {done.revoked_at:%Y-%m-%d %H:%M:%S UTC}; {where}")
        return EXIT_OK
    finally:
        engine.dispose()


def _broker(args: argparse.Namespace) -> int:
    from hub.brokeradmin import BrokerAdmin

    settings = _settings(args)
    broker = BrokerAdmin.from_settings(settings)
    if broker is None:
        print("outpost-hub: broker_admin_username is empty: broker credentials are managed outside Outpost, nothing to set up", file=sys.stderr)
        return EXIT_CONFIG
    broker.setup(settings.broker_username or "", settings.broker_password or "")
    print(f"broker at {settings.broker_host}:{settings.broker_port}: role outpost-hub and client {settings.broker_username!r} ready")
    return EXIT_OK
