"""``outpost``: the operator CLI, a thin client of the hub's REST API.

Commands are ``outpost NOUN VERB``: ``dags`` (``dags.py``), ``runs``
(``runs.py``), ``agents`` and ``import-errors`` (``agents.py``),
``backfills`` and ``assets`` (``backfills.py``), ``pools``,
``deadline-misses`` and the run actions ``runs clear|rerun|mark``
(``operations.py``), ``conflicts`` (``conflicts.py``), ``variables``
and ``connections`` (``vault.py``), ``security-events``
(``security.py``), ``password`` (``account.py``), ``release``
(``releases.py``), ``artifacts`` (``artifacts.py``), ``rollouts``
(``rollouts.py``). Shared
parts: ``output`` (``-o table|json``), ``http`` (the client), ``errors``
(exit codes), ``parsing`` (help, examples, ``--hub``). It imports no
SQLAlchemy or FastAPI, so it runs anywhere httpx does.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from hub.ctl import account, agents, artifacts, backfills, conflicts, dags, operations, releases, rollouts, runs, security, vault
from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.parsing import DEFAULT_HUB_URL, ENV_HUB_URL, add_token_options, epilog, resolve_token


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outpost",
        # No abbreviations here: "--to" of a command must not read as --token.
        allow_abbrev=False,
        description="Operate an Outpost hub: DAGs, runs, agents. Talks to the hub's REST API.",
        epilog=epilog(["outpost dags list", "outpost dags trigger fleet_health --conf '{\"reason\": \"audit\"}'", "outpost runs show 12 --wait", "outpost --hub http://hub.example:8080 agents list --state online -o json"]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hub", metavar="URL", default=os.environ.get(ENV_HUB_URL) or DEFAULT_HUB_URL, help=f"hub base URL (env {ENV_HUB_URL}, default {DEFAULT_HUB_URL})")
    add_token_options(parser)
    parser.add_argument("--version", action="version", version=f"outpost {_version()}")
    nouns = parser.add_subparsers(title="commands", dest="noun", metavar="COMMAND", required=True)
    dags.register(nouns)
    runs.register(nouns)
    agents.register(nouns)
    operations.register(nouns)
    backfills.register(nouns)
    conflicts.register(nouns)
    vault.register(nouns)
    security.register(nouns)
    account.register(nouns)
    releases.register(nouns)
    artifacts.register(nouns)
    rollouts.register(nouns)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (see ``hub.ctl.errors.ExitCode``)."""
    args = build_parser().parse_args(argv)
    try:
        token = resolve_token(args.token, args.token_file, os.environ)
        with HubClient(args.hub, token=token) as client:
            return int(args.handler(client, args) or ExitCode.OK)
    except CtlError as exc:
        print(f"outpost: error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("outpost: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    try:
        return version("outpost")
    except PackageNotFoundError:
        return "unknown"
