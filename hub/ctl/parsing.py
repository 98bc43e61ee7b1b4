"""Argument-parser scaffolding shared by the noun modules: every command
gets a description, an example epilog, the environment it reads, and
``--hub`` (accepted before or after the command)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

ENV_HUB_URL = "OUTPOST_HUB_URL"
DEFAULT_HUB_URL = "http://127.0.0.1:8080"
ENVIRONMENT = f"environment:\n  {ENV_HUB_URL}  the hub's base URL (default {DEFAULT_HUB_URL}); --hub overrides it"

Handler = Callable[[Any, argparse.Namespace], int | None]


def epilog(examples: Sequence[str]) -> str:
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + ENVIRONMENT


def hub_parent() -> argparse.ArgumentParser:
    """``--hub`` for leaf commands; SUPPRESS keeps the top-level value
    (flag or environment) unless the flag is given after the command."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--hub", metavar="URL", default=argparse.SUPPRESS, help=f"hub base URL (env {ENV_HUB_URL}, default {DEFAULT_HUB_URL})")
    return parent


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
