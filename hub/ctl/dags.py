"""``outpost dags list|show|trigger|pause|unpause``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from hub.ctl import runs
from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.output import emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "dags", "List, inspect, trigger and pause DAGs.", ["outpost dags list", "outpost dags trigger fleet_health"])
    out, paging = output_parent(), paging_parent()

    cmd = add_command(verbs, "list", "List DAGs with their last run and next scheduled run.", list_dags,
                      ["outpost dags list", "outpost dags list --paused", "outpost dags list -o json | jq -r '.items[].dag_id'"], [out, paging])
    state = cmd.add_mutually_exclusive_group()
    state.add_argument("--paused", dest="is_paused", action="store_const", const=True, help="only paused DAGs")
    state.add_argument("--unpaused", dest="is_paused", action="store_const", const=False, help="only unpaused DAGs")

    cmd = add_command(verbs, "show", "Show one DAG: schedule, state and its tasks with their dependencies.", show_dag,
                      ["outpost dags show fleet_health", "outpost dags show fleet_health -o json"], [out])
    cmd.add_argument("dag_id", metavar="DAG_ID")

    cmd = add_command(verbs, "versions", "List a DAG's versions: one per parse that changed its structure.", list_versions,
                      ["outpost dags versions fleet_health", "outpost dags versions fleet_health -o json | jq '.items[0].version_number'"], [out, paging])
    cmd.add_argument("dag_id", metavar="DAG_ID")

    cmd = add_command(verbs, "trigger", "Start a manual run of a DAG now.", trigger_dag,
                      ["outpost dags trigger fleet_health", "outpost dags trigger fleet_health --conf '{\"site\": \"berlin\"}' --wait --timeout 600"], [out])
    cmd.add_argument("dag_id", metavar="DAG_ID")
    cmd.add_argument("--conf", metavar="JSON", default="{}", help="run configuration, a JSON object (default {})")
    runs.add_wait_options(cmd, "wait until the run finishes; exit 0 on success, 1 on failure")

    for verb, paused in (("pause", True), ("unpause", False)):
        summary = "Pause a DAG: the scheduler stops creating scheduled runs." if paused else "Unpause a DAG: scheduled runs resume."
        cmd = add_command(verbs, verb, summary, pause_dag, [f"outpost dags {verb} fleet_health"])
        cmd.add_argument("dag_id", metavar="DAG_ID")
        cmd.set_defaults(is_paused=paused)


def list_dags(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/dags", is_paused=_flag(args.is_paused), limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("DAG_ID", lambda d: d["dag_id"]),
        ("SCHEDULE", lambda d: d["schedule"] or "manual"),
        ("PAUSED", lambda d: d["is_paused"]),
        ("ACTIVE", lambda d: d["is_active"]),
        ("TASKS", lambda d: d["task_count"]),
        ("LAST_RUN", lambda d: d["last_run"] and f"{d['last_run']['id']} {d['last_run']['state']}"),
        ("NEXT_RUN", lambda d: when(d["next_run_at"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "DAGs")


def show_dag(client: HubClient, args: argparse.Namespace) -> None:
    dag = client.get(f"/dags/{_path(args.dag_id)}")
    emit(args, dag, _dag_text)


def list_versions(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get(f"/dags/{_path(args.dag_id)}/versions", limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("VERSION", lambda v: f"{v['version_number']}{' (latest)' if v['is_latest'] else ''}"),
        ("CREATED", lambda v: when(v["created_at"])),
        ("TASKS", lambda v: v["task_count"]),
        ("RUNS", lambda v: v["run_count"]),
        ("HASH", lambda v: v["structure_hash"][:12]),
        ("FILELOC", lambda v: v["fileloc"]),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "versions")


def trigger_dag(client: HubClient, args: argparse.Namespace) -> int:
    try:
        conf = json.loads(args.conf)
    except json.JSONDecodeError as exc:
        raise CtlError(f"--conf is not valid JSON ({exc.msg} at column {exc.colno}); example: --conf '{{\"key\": \"value\"}}'", ExitCode.USAGE) from None
    if not isinstance(conf, dict):
        raise CtlError(f"--conf must be a JSON object like '{{\"key\": \"value\"}}', not {type(conf).__name__}", ExitCode.USAGE)
    run = client.post(f"/dags/{_path(args.dag_id)}/runs", {"conf": conf})
    if args.wait:
        print(f"triggered run {run['id']} of {run['dag_id']}", file=sys.stderr)
        return runs.wait_and_show(client, args, run["id"])
    emit(args, run, lambda r: f"triggered run {r['id']} of {r['dag_id']} ({r['run_id']})\nfollow it with: outpost runs show {r['id']} --wait")
    return ExitCode.OK


def pause_dag(client: HubClient, args: argparse.Namespace) -> None:
    dag = client.patch(f"/dags/{_path(args.dag_id)}", {"is_paused": args.is_paused})
    print(f"{dag['dag_id']} is now {'paused' if dag['is_paused'] else 'unpaused'}")


def _dag_text(dag: dict[str, Any]) -> str:
    head = fields(dag, [
        ("dag_id", lambda d: d["dag_id"]),
        ("description", lambda d: d["description"]),
        ("schedule", lambda d: d["schedule"] or "manual only"),
        ("is_paused", lambda d: d["is_paused"]),
        ("is_active", lambda d: d["is_active"]),
        ("fileloc", lambda d: d["fileloc"]),
        ("tags", lambda d: ", ".join(d["tags"])),
        ("version", lambda d: d.get("latest_version_number")),
        ("last_run", lambda d: d["last_run"] and f"{d['last_run']['id']} {d['last_run']['state']} ({when(d['last_run']['logical_date'])})"),
        ("next_run_at", lambda d: when(d["next_run_at"])),
    ])
    tasks = table(dag["structure"].get("tasks", []), [
        ("TASK_ID", lambda t: t["task_id"]),
        ("KIND", lambda t: t.get("kind")),
        ("RUNS", lambda t: t.get("job_type") or (t.get("callable") and f"{t['callable']}()")),
        ("TARGET", lambda t: _target(t.get("target"))),
        ("UPSTREAM", lambda t: ", ".join(t.get("upstream", []))),
        ("TRIGGER_RULE", lambda t: t.get("trigger_rule")),
    ])
    return f"{head}\n\n{tasks}"


def _target(target: dict[str, Any] | None) -> str:
    if not target:
        return "hub"
    labels = "".join(f" {k}={v}" for k, v in (target.get("labels") or {}).items())
    mode = target.get("mode")
    if mode == "agent":
        return f"agent {target.get('agent_id')}"
    return ("every agent" if mode == "all" else "any agent") + labels


def _flag(value: bool | None) -> str | None:
    return None if value is None else str(value).lower()


def _path(segment: str) -> str:
    return quote(segment, safe="")

