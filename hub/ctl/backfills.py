"""``outpost backfills create|list|show|pause|unpause|cancel`` and
``outpost assets list|events``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.output import counts, emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "backfills", "Run a DAG for past data intervals, and follow or stop those backfills.",
                     ["outpost backfills create fleet_health --from 2026-01-01 --to 2026-01-31", "outpost backfills list --active"])
    out = output_parent()

    cmd = add_command(verbs, "create", "Create a run for every interval of the DAG's schedule whose logical date is in [--from, --to].", create,
                      ["outpost backfills create fleet_health --from 2026-01-01 --to 2026-01-31",
                       "outpost backfills create fleet_health --from 2026-01-01 --to 2026-01-07 --max-active-runs 2 --reprocess failed",
                       "outpost backfills create fleet_health --from 2026-01-01T00:00+01:00 --to 2026-01-03 --run-backwards --conf '{\"full\": true}'",
                       "outpost backfills create fleet_health --from 2026-01-01 --to 2026-01-31 --reprocess completed --dry-run"], [out])
    cmd.add_argument("dag_id", metavar="DAG_ID", help="a DAG with a cron or timedelta schedule")
    cmd.add_argument("--from", dest="from_date", required=True, metavar="DATE", help="earliest logical date, ISO 8601 (UTC unless it has an offset)")
    cmd.add_argument("--to", dest="to_date", required=True, metavar="DATE", help="latest logical date, ISO 8601; not in the future")
    cmd.add_argument("--max-active-runs", type=int, default=10, metavar="N", help="how many of its runs run at once (default 10)")
    cmd.add_argument("--reprocess", choices=("none", "failed", "completed"), default="none",
                     help="intervals that already have a run: none skips them (default), failed reruns failed ones, completed reruns all")
    cmd.add_argument("--run-backwards", action="store_true", help="start the newest interval first")
    cmd.add_argument("--conf", default="{}", metavar="JSON", help="run configuration of every run (a JSON object)")
    cmd.add_argument("--dry-run", action="store_true", help="list the intervals it would run and skip; create nothing")

    cmd = add_command(verbs, "list", "List backfills, newest first.", list_backfills,
                      ["outpost backfills list", "outpost backfills list --dag fleet_health --active -o json"], [out, paging_parent()])
    cmd.add_argument("--dag", metavar="DAG_ID", help="only backfills of this DAG")
    cmd.add_argument("--active", action="store_true", help="only backfills not complete yet")

    cmd = add_command(verbs, "show", "Show a backfill and its runs per state.", show, ["outpost backfills show 3", "outpost backfills show 3 -o json"], [out])
    cmd.add_argument("backfill", type=int, metavar="BACKFILL", help="the backfill's id (the ID column of 'outpost backfills list')")

    for verb, summary in (("pause", "Start no more runs of a backfill; running ones go on."), ("unpause", "Start a paused backfill's queued runs again."),
                          ("cancel", "Cancel a backfill: its runs not started yet fail, running ones finish.")):
        cmd = add_command(verbs, verb, summary, change, [f"outpost backfills {verb} 3"], [out])
        cmd.add_argument("backfill", type=int, metavar="BACKFILL", help="the backfill's id")
        cmd.set_defaults(action=verb)

    verbs = add_noun(nouns, "assets", "List assets and their events (what event-driven DAGs run on).",
                     ["outpost assets list", "outpost assets events --uri agent-event://battery_low"])
    cmd = add_command(verbs, "list", "List assets with their events and the DAGs scheduled on them.", list_assets,
                      ["outpost assets list", "outpost assets list --prefix agent-event:// -o json"], [out, paging_parent()])
    cmd.add_argument("--prefix", metavar="TEXT", help="only assets whose URI starts with TEXT")
    cmd = add_command(verbs, "events", "List asset events, newest first.", list_events,
                      ["outpost assets events", "outpost assets events --uri s3://telemetry/daily.parquet", "outpost assets events --agent pump-7 -o json"],
                      [out, paging_parent()])
    cmd.add_argument("--uri", metavar="URI", help="only events of this asset")
    cmd.add_argument("--dag", metavar="DAG_ID", help="only events produced by tasks of this DAG")
    cmd.add_argument("--agent", metavar="AGENT_ID", help="only events from this device")


def create(client: HubClient, args: argparse.Namespace) -> int:
    try:
        conf = json.loads(args.conf)
    except ValueError as exc:
        raise CtlError(f"--conf is not JSON: {exc}", ExitCode.USAGE) from None
    if not isinstance(conf, dict):
        raise CtlError("--conf must be a JSON object, e.g. '{\"full\": true}'", ExitCode.USAGE)
    body = {
        "dag_id": args.dag_id, "from_date": args.from_date, "to_date": args.to_date, "max_active_runs": args.max_active_runs,
        "reprocess_behavior": args.reprocess, "run_backwards": args.run_backwards, "dag_run_conf": conf,
    }
    if args.dry_run:
        plan = client.post("/backfills/dry_run", body)
        emit(args, plan, lambda p: table(
            [*({"logical_date": i["logical_date"], "interval_end": i["data_interval_end"], "action": "run"} for i in p["intervals"]),
             *({"logical_date": s["logical_date"], "interval_end": None, "action": f"skip ({s['reason']})"} for s in p["skipped"])],
            [("LOGICAL_DATE", lambda r: when(r["logical_date"])), ("INTERVAL_END", lambda r: when(r["interval_end"])), ("ACTION", lambda r: r["action"])],
        ))
        return ExitCode.OK
    backfill = client.post("/backfills", body)
    emit(args, backfill, backfill_text)
    if args.output == "table" and backfill.get("skipped"):
        print(f"{len(backfill['skipped'])} interval(s) skipped: " + ", ".join(f"{when(s['logical_date'])} ({s['reason']})" for s in backfill["skipped"]), file=sys.stderr)
    return ExitCode.OK


def list_backfills(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/backfills", dag_id=args.dag, active=True if args.active else None, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("ID", lambda b: b["id"]),
        ("DAG_ID", lambda b: b["dag_id"]),
        ("FROM", lambda b: when(b["from_date"])),
        ("TO", lambda b: when(b["to_date"])),
        ("STATUS", _status),
        ("RUNS", lambda b: counts(b["run_counts"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "backfills")


def show(client: HubClient, args: argparse.Namespace) -> None:
    emit(args, client.get(f"/backfills/{args.backfill}"), backfill_text)


def change(client: HubClient, args: argparse.Namespace) -> None:
    emit(args, client.put(f"/backfills/{args.backfill}/{args.action}"), backfill_text)


def _status(backfill: dict[str, Any]) -> str:
    if backfill["completed_at"]:
        return "complete"
    return "paused" if backfill["is_paused"] else "running"


def backfill_text(backfill: dict[str, Any]) -> str:
    return fields(backfill, [
        ("id", lambda b: b["id"]),
        ("dag_id", lambda b: b["dag_id"]),
        ("from_date", lambda b: when(b["from_date"])),
        ("to_date", lambda b: when(b["to_date"])),
        ("status", _status),
        ("max_active_runs", lambda b: b["max_active_runs"]),
        ("reprocess", lambda b: b["reprocess_behavior"]),
        ("run_backwards", lambda b: b["run_backwards"]),
        ("conf", lambda b: b["dag_run_conf"] or None),
        ("runs", lambda b: counts(b["run_counts"])),
        ("created_at", lambda b: when(b["created_at"])),
        ("completed_at", lambda b: when(b["completed_at"])),
    ])


def list_assets(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/assets", uri_prefix=args.prefix, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("URI", lambda a: a["uri"]),
        ("EVENTS", lambda a: a["event_count"]),
        ("LAST_EVENT", lambda a: when(a["last_event_at"])),
        ("CONSUMING_DAGS", lambda a: ", ".join(a["consuming_dags"]) or None),
        ("WAITING_DAGS", lambda a: ", ".join(a["queued_for"]) or None),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "assets")


def list_events(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/assets/events", uri=args.uri, source_dag_id=args.dag, source_agent_id=args.agent, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("ID", lambda e: e["id"]),
        ("URI", lambda e: e["uri"]),
        ("TIMESTAMP", lambda e: when(e["timestamp"])),
        ("SOURCE", lambda e: e["source_agent_id"] or (f"{e['source_dag_id']}.{e['source_task_id']}" if e["source_dag_id"] else "api")),
        ("EXTRA", lambda e: e["extra"] or None),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "asset events")
