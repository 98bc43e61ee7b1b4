"""``outpost security-events``: signed messages that did not verify, and
hub messages devices refused (docs/security-signing.md)."""

from __future__ import annotations

import argparse
from typing import Any

from hub.ctl.http import HubClient
from hub.ctl.output import emit, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, paging_parent

SOURCES = ("mqtt", "http", "agent")


def register(nouns: Any) -> None:
    cmd = add_command(nouns, "security-events", "List security events, newest first, with counts per code: device messages that did not verify, hub messages devices refused.",
                      list_security_events,
                      ["outpost security-events", "outpost security-events --code bad_signature --agent edge-7",
                       "outpost security-events --source agent --since 2026-01-01T00:00:00Z -o json"],
                      [output_parent(), paging_parent()])
    cmd.add_argument("--code", help="only this code (e.g. bad_signature, unknown_agent, replayed)")
    cmd.add_argument("--agent", metavar="AGENT_ID", help="only events of this agent")
    cmd.add_argument("--source", choices=SOURCES, help="mqtt or http: refused by the hub; agent: refused by a device")
    cmd.add_argument("--since", metavar="TIME", help="only events at or after this ISO 8601 time")
    cmd.add_argument("--until", metavar="TIME", help="only events before this ISO 8601 time")


def list_security_events(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/security-events", code=args.code, agent_id=args.agent, source=args.source, since=args.since, until=args.until,
                      limit=args.limit, offset=args.offset)
    emit(args, page, _text)
    if args.output == "table":
        page_note(page, "security events")


def _text(page: dict[str, Any]) -> str:
    counts = ", ".join(f"{code} {n}" for code, n in page["counts"].items()) or "none"
    rows = table(page["items"], [
        ("AT", lambda e: when(e["at"])),
        ("AGENT", lambda e: e["agent_id"] or "-"),
        ("SOURCE", lambda e: e["source"]),
        ("CODE", lambda e: e["code"]),
        ("DETAIL", lambda e: e["detail"][:100]),
    ]) if page["items"] else ""
    return f"{rows}\ncounts: {counts}" if rows else f"counts: {counts}"
