"""Output of every read command: ``-o table`` (aligned columns for people)
or ``-o json`` (the API's answer unchanged, for scripts and jq)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

#: (header, value of a row as text)
Column = tuple[str, Callable[[dict[str, Any]], Any]]


def output_parent() -> argparse.ArgumentParser:
    """The shared ``-o/--output`` option, as an argparse parent."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table (default) or json (the API's answer, for scripts)")
    return parent


def emit(args: argparse.Namespace, data: Any, table: Callable[[Any], str]) -> None:
    """Print ``data`` as JSON or as the text ``table(data)`` renders."""
    if args.output == "json":
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    else:
        text = table(data)
        if text:
            sys.stdout.write(text.rstrip("\n") + "\n")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Rows as left-aligned columns under upper-case headers."""
    cells = [[_text(get(row)) for _, get in columns] for row in rows]
    headers = [name for name, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def fields(record: dict[str, Any], pairs: Sequence[Column]) -> str:
    """One record as ``label: value`` lines."""
    width = max(len(label) for label, _ in pairs) + 1
    return "\n".join(f"{(label + ':').ljust(width)} {_text(get(record))}".rstrip() for label, get in pairs)


def page_note(page: dict[str, Any], noun: str) -> None:
    """Tell (on stderr) when a list is empty or only one page of more."""
    shown, total = len(page["items"]), page["total"]
    if total == 0:
        print(f"no {noun}", file=sys.stderr)
    elif shown < total:
        print(f"showing {page['offset'] + 1}-{page['offset'] + shown} of {total} {noun}; use --limit/--offset for more", file=sys.stderr)


def when(value: str | None) -> str:
    """``2026-01-01T00:00:00.123+00:00`` → ``2026-01-01 00:00:00Z``."""
    if not value:
        return "-"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return value
    return (parsed.astimezone(UTC) if parsed.tzinfo else parsed).strftime("%Y-%m-%d %H:%M:%SZ")


def counts(task_counts: dict[str, int]) -> str:
    """``{"success": 2, "running": 1}`` → ``2 success, 1 running``."""
    return ", ".join(f"{n} {state}" for state, n in task_counts.items()) or "-"


def _text(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value).replace("\n", " ")
