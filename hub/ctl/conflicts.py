"""``outpost conflicts list``: where a device's late report and a hub or
operator decision disagreed, and the rule that settled it (docs/conflicts.md)."""

from __future__ import annotations

import argparse
from typing import Any

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.output import emit, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent

RULES = ("operator_wins", "device_success_wins", "duplicate_success")


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "conflicts", "Late device reports the conflict rule overrode or that overrode a hub decision.",
                     ["outpost conflicts list", "outpost conflicts list --rule device_success_wins"])
    cmd = add_command(verbs, "list", "List conflict records, newest first: the rule, what was kept, what was overridden.", list_conflicts,
                      ["outpost conflicts list --dag fleet_health", "outpost conflicts list --agent edge-7 --rule duplicate_success",
                       "outpost conflicts list --run 12 --task collect --map-index 3 -o json"],
                      [output_parent(), paging_parent()])
    cmd.add_argument("--dag", metavar="DAG_ID", help="only conflicts of this DAG")
    cmd.add_argument("--run", type=int, metavar="RUN", help="only conflicts of this run (its numeric id)")
    cmd.add_argument("--task", metavar="TASK_ID", help="only this task of --run")
    cmd.add_argument("--map-index", type=int, metavar="N", help="only this map index of --task")
    cmd.add_argument("--agent", metavar="AGENT_ID", help="only conflicts involving this device's result")
    cmd.add_argument("--rule", choices=RULES, help="only this rule")


def list_conflicts(client: HubClient, args: argparse.Namespace) -> None:
    if args.task is not None and args.run is None:
        raise CtlError("--task needs --run: a task id names a task instance only within a run", ExitCode.USAGE)
    page = client.get("/conflicts", dag_id=args.dag, run=args.run, task_id=args.task, map_index=args.map_index,
                      agent_id=args.agent, rule=args.rule, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("ID", lambda c: c["id"]),
        ("DAG_ID", lambda c: c["dag_id"]),
        ("RUN", lambda c: c["run_pk"]),
        ("TASK", lambda c: c["task_id"] if c["map_index"] < 0 else f"{c['task_id']}[{c['map_index']}]"),
        ("AGENT", lambda c: c["agent_id"] or "-"),
        ("RULE", lambda c: c["rule"]),
        ("KEPT", lambda c: side(c["kept"])),
        ("OVERRIDDEN", lambda c: side(c["overridden"])),
        ("RECORDED", lambda c: when(c["created_at"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "conflicts")


def side(report: dict[str, Any]) -> str:
    """One side of a conflict in a few words."""
    kind = report.get("type")
    if kind == "result":
        return f"{report.get('agent_id')} {report.get('status')} try {report.get('try_number')}"
    if kind == "hub_decision":
        return f"hub {report.get('kind')} try {report.get('try_number')}"
    if kind == "operator_action":
        what = f"mark {report.get('state')}" if report.get("kind") == "mark" else report.get("kind")
        return f"{report.get('actor')} {what}"
    return str(kind)
