"""Argument-parser scaffolding shared by the noun modules: every command
gets a description, an example epilog, the environment it reads, and
``--hub`` (accepted before or after the command)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

ENV_HUB_URL = "OUTPOST_HUB_URL"
DEFAULT_HUB_URL = "http://127.0.0.1:8080"
ENV_TOKEN = "OUTPOST_TOKEN"
ENV_TOKEN_FILE = "OUTPOST_TOKEN_FILE"
#: Where ``outpost-hub standalone`` (state folder .outpost) writes its admin token.
DEMO_TOKEN_FILE = ".outpost/hub/admin-token"
ENVIRONMENT = (
    f"environment:\n  {ENV_HUB_URL}  the hub's base URL (default {DEFAULT_HUB_URL}); --hub overrides it\n"
    f"  {ENV_TOKEN}  API token; {ENV_TOKEN_FILE}  file holding one (--token, --token-file override them)"
)

Handler = Callable[[Any, argparse.Namespace], int | None]


def epilog(examples: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + ENVIRONMENT


def hub_parent() -> argparse.ArgumentParser:
    """``--hub`` for leaf commands; SUPPRESS keeps the top-level value
    (flag or environment) unless the flag is given after the command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--hub", metavar="URL", default=argparse.SUPPRESS, help=f"hub base URL (env {ENV_HUB_URL}, default {DEFAULT_HUB_URL})")
    add_token_options(parent, argparse.SUPPRESS)
    return parent


def add_token_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    parser.add_argument("--token", metavar="TOKEN", default=default, help=f"API token (env {ENV_TOKEN}); prefer --token-file: arguments show in ps")
    parser.add_argument("--token-file", metavar="PATH", default=default, help=f"file holding the API token (env {ENV_TOKEN_FILE}; default {DEMO_TOKEN_FILE} if it exists)")


def resolve_token(token: str | None, token_file: str | None, environ: Any) -> str | None:
    """The token to send, first found: --token, $OUTPOST_TOKEN, --token-file,
    $OUTPOST_TOKEN_FILE, then the demo's ./.outpost/hub/admin-token."""
    from pathlib import Path

    from hub.ctl.errors import CtlError, ExitCode

    if token:
        return token.strip()
    if environ.get(ENV_TOKEN, "").strip():
        return str(environ[ENV_TOKEN]).strip()
    path = token_file or environ.get(ENV_TOKEN_FILE) or None
    if path is None and Path(DEMO_TOKEN_FILE).is_file():
        path = DEMO_TOKEN_FILE
    if path is None:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError as exc:
        raise CtlError(f"cannot read the token file {path}: {exc.strerror}", ExitCode.USAGE) from None


def add_command(
    subparsers: Any,
    name: str,
    summary: str,
    handler: Handler,
    examples: Sequence[str],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """Add one runnable command; ``summary`` is its one-line help."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog=epilog(examples),
        parents=[hub_parent(), *parents],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


def add_noun(subparsers: Any, name: str, summary: str, examples: Sequence[str]) -> Any:
    """Add a noun (``dags``, ``runs``, ...) and return its verb subparsers."""
    parser = subparsers.add_parser(name, help=summary, description=summary, epilog=epilog(examples), formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.add_subparsers(title="commands", dest="verb", metavar="COMMAND", required=True)


def paging_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--limit", type=int, default=100, metavar="N", help="at most N items (1-1000, default 100)")
    parent.add_argument("--offset", type=int, default=0, metavar="N", help="skip the first N items")
    return parent


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every runnable command under ``parser`` as (words, parser), e.g.
    (("dags", "list"), ...); for help checks and the docs test."""
    found: list[tuple[tuple[str, ...], argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, (*path, name))
    if not found and path:
        found.append((path, parser))
    return found
