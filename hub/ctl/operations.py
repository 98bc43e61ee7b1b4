"""Operator actions: ``outpost runs clear|rerun|mark``, ``outpost pools
list|show|set|delete`` and ``outpost deadline-misses``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.output import emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent


def register_run_actions(verbs: Any) -> None:
    """``clear``, ``rerun`` and ``mark`` under ``outpost runs``."""
    out = output_parent()
    cmd = add_command(verbs, "clear", "Clear task instances of a run so they run again with a new try number.", clear,
                      ["outpost runs clear 12 --task collect --downstream", "outpost runs clear 12 --only-failed",
                       "outpost runs clear 12 --task collect --map-index 3 --dry-run"], [out])
    cmd.add_argument("run", type=int, metavar="RUN", help="the run's numeric id")
    cmd.add_argument("--task", dest="tasks", action="append", metavar="TASK_ID", help="a task to clear (repeat for several; default: every task)")
    cmd.add_argument("--map-index", dest="map_indexes", action="append", type=int, metavar="N", help="only this map index of the named tasks (repeatable)")
    cmd.add_argument("--downstream", action="store_true", help="also clear every task downstream of the named ones")
    cmd.add_argument("--upstream", action="store_true", help="also clear every task upstream of the named ones")
    cmd.add_argument("--only-failed", action="store_true", help="only instances in state failed or upstream_failed")
    cmd.add_argument("--dry-run", action="store_true", help="show what would be cleared; change nothing")

    cmd = add_command(verbs, "rerun", "Run a whole run again: every task instance cleared.", rerun,
                      ["outpost runs rerun 12", "outpost runs rerun 12 --only-failed"], [out])
    cmd.add_argument("run", type=int, metavar="RUN", help="the run's numeric id")
    cmd.add_argument("--only-failed", action="store_true", help="only rerun failed and upstream_failed instances")

    cmd = add_command(verbs, "mark", "Set task instances (or, without --task, the whole run) to success, failed or skipped without running them.", mark,
                      ["outpost runs mark 12 --task reboot --state success", "outpost runs mark 12 --task collect --state failed --downstream",
                       "outpost runs mark 12 --state failed"], [out])
    cmd.add_argument("run", type=int, metavar="RUN", help="the run's numeric id")
    cmd.add_argument("--task", dest="tasks", action="append", metavar="TASK_ID", help="a task to mark (repeat for several); without it, the whole run")
    cmd.add_argument("--state", required=True, choices=("success", "failed", "skipped"), help="the new state")
    cmd.add_argument("--map-index", dest="map_indexes", action="append", type=int, metavar="N", help="only this map index of the named tasks (repeatable)")
    cmd.add_argument("--downstream", action="store_true", help="also mark every task downstream of the named ones")
    cmd.add_argument("--upstream", action="store_true", help="also mark every task upstream of the named ones")


def register(nouns: Any) -> None:
    out = output_parent()
    verbs = add_noun(nouns, "pools", "List and set pools: limits on how many task slots run at once.", ["outpost pools list", "outpost pools set modem_uplink 4"])
    add_command(verbs, "list", "List pools with the slots in use.", list_pools, ["outpost pools list", "outpost pools list -o json"], [out, paging_parent()])
    cmd = add_command(verbs, "show", "Show one pool.", show_pool, ["outpost pools show default_pool"], [out])
    cmd.add_argument("name", metavar="NAME", help="the pool's name")
    cmd = add_command(verbs, "set", "Create a pool or change its slots (-1: unlimited).", set_pool,
                      ["outpost pools set modem_uplink 4 --description 'cellular uplinks'", "outpost pools set default_pool 32"], [out])
    cmd.add_argument("name", metavar="NAME", help="the pool's name")
    cmd.add_argument("slots", type=int, metavar="SLOTS", help="how many slots; -1 is unlimited")
    cmd.add_argument("--description", help="what the pool protects")
    cmd = add_command(verbs, "delete", "Delete a pool (not default_pool, not while in use).", delete_pool, ["outpost pools delete modem_uplink"])
    cmd.add_argument("name", metavar="NAME", help="the pool's name")

    verbs = add_noun(nouns, "deadline-misses", "Missed SLAs and timed-out runs.", ["outpost deadline-misses list --dag fleet_health"])
    cmd = add_command(verbs, "list", "List missed SLAs and timed-out runs, newest first.", list_misses,
                      ["outpost deadline-misses list", "outpost deadline-misses list --dag fleet_health --kind task_sla", "outpost deadline-misses list --run 12 -o json"],
                      [out, paging_parent()])
    cmd.add_argument("--dag", metavar="DAG_ID", help="only misses of this DAG")
    cmd.add_argument("--run", type=int, metavar="RUN", help="only misses of this run")
    cmd.add_argument("--kind", choices=("task_sla", "dagrun_timeout"), help="only this kind")


# --- runs ---------------------------------------------------------------------


def clear(client: HubClient, args: argparse.Namespace) -> None:
    body = {"task_ids": args.tasks, "map_indexes": args.map_indexes, "include_downstream": args.downstream,
            "include_upstream": args.upstream, "only_failed": args.only_failed, "dry_run": args.dry_run}
    result = client.post(f"/runs/{args.run}/clear", body)
    verb = "would clear" if args.dry_run else "cleared"
    emit(args, result, lambda r: _affected(r, verb))


def rerun(client: HubClient, args: argparse.Namespace) -> None:
    result = client.post(f"/runs/{args.run}/rerun", {"only_failed": args.only_failed})
    emit(args, result, lambda r: _affected(r, "cleared"))


def mark(client: HubClient, args: argparse.Namespace) -> None:
    if not args.tasks:
        if args.state == "skipped" or args.map_indexes or args.downstream or args.upstream:
            raise CtlError("without --task the whole run is marked: only --state success or failed, no --map-index, --downstream or --upstream", ExitCode.USAGE)
        result = client.patch(f"/runs/{args.run}", {"state": args.state})
        emit(args, result, lambda r: _affected(r, f"marked {args.state}"))
        return
    body = {"task_ids": args.tasks, "state": args.state, "map_indexes": args.map_indexes,
            "include_downstream": args.downstream, "include_upstream": args.upstream}
    result = client.post(f"/runs/{args.run}/mark", body)
    emit(args, result, lambda r: _affected(r, f"marked {args.state}"))


def _affected(result: dict[str, Any], verb: str) -> str:
    run = result["run"]
    items = result["affected"]
    head = f"run {run['id']} ({run['dag_id']}): {verb} {len(items)} task instance(s); run is {run['state']}"
    if not items:
        return head
    return head + "\n\n" + table(items, [
        ("TASK_ID", lambda t: t["task_id"]),
        ("MAP_INDEX", lambda t: None if t["map_index"] < 0 else t["map_index"]),
        ("WAS", lambda t: t["state"]),
        ("TRIES", lambda t: t["try_number"]),
    ])


# --- pools --------------------------------------------------------------------

_POOL_COLUMNS = [
    ("NAME", lambda p: p["name"]),
    ("SLOTS", lambda p: "unlimited" if p["slots"] == -1 else p["slots"]),
    ("RUNNING", lambda p: p["running_slots"]),
    ("QUEUED", lambda p: p["queued_slots"]),
    ("WAITING", lambda p: p["scheduled_slots"]),
    ("OPEN", lambda p: "unlimited" if p["open_slots"] is None else p["open_slots"]),
    ("DESCRIPTION", lambda p: p["description"]),
]


def list_pools(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/pools", limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], _POOL_COLUMNS) if p["items"] else "")
    if args.output == "table":
        page_note(page, "pools")


def show_pool(client: HubClient, args: argparse.Namespace) -> None:
    emit(args, client.get(f"/pools/{args.name}"), _pool_text)


def set_pool(client: HubClient, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"slots": args.slots}
    if args.description is not None:
        body["description"] = args.description
    try:
        pool = client.patch(f"/pools/{args.name}", body)
    except CtlError as exc:
        if exc.exit_code != ExitCode.NOT_FOUND:
            raise
        pool = client.post("/pools", {"name": args.name, "slots": args.slots, "description": args.description or ""})
    emit(args, pool, _pool_text)


def delete_pool(client: HubClient, args: argparse.Namespace) -> None:
    client.delete(f"/pools/{args.name}")
    print(f"pool {args.name} deleted", file=sys.stdout)


def _pool_text(pool: dict[str, Any]) -> str:
    return fields(pool, [(name.lower(), get) for name, get in _POOL_COLUMNS])


# --- deadline misses ------------------------------------------------------------


def list_misses(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/deadline-misses", dag_id=args.dag, run_pk=args.run, kind=args.kind, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("DAG_ID", lambda m: m["dag_id"]),
        ("RUN", lambda m: m["run_pk"]),
        ("TASK_ID", lambda m: m["task_id"]),
        ("KIND", lambda m: m["kind"]),
        ("DEADLINE", lambda m: when(m["deadline"])),
        ("DETECTED", lambda m: when(m["detected_at"])),
        ("DESCRIPTION", lambda m: m["description"]),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "deadline misses")
