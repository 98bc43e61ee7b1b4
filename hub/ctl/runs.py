"""``outpost runs list|show``, and waiting for a run to finish."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl import operations
from hub.ctl.http import HubClient
from hub.ctl.output import counts, emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent
from shared.states import RunState

FINISHED = frozenset({RunState.SUCCESS.value, RunState.FAILED.value})


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "runs", "List and inspect DAG runs.", ["outpost runs list --state running", "outpost runs show 12 --wait"])
    out = output_parent()

    cmd = add_command(verbs, "list", "List runs, newest first.", list_runs,
                      ["outpost runs list", "outpost runs list --dag fleet_health --state failed", "outpost runs list -o json --limit 1000"],
                      [out, paging_parent()])
    cmd.add_argument("--dag", metavar="DAG_ID", help="only runs of this DAG")
    cmd.add_argument("--state", choices=[s.value for s in RunState], help="only runs in this state")

    cmd = add_command(verbs, "show", "Show a run and its task instances; --wait follows it to the end.", show_run,
                      ["outpost runs show 12", "outpost runs show 12 --wait --timeout 600 && echo deployed", "outpost runs show 12 -o json"], [out])
    cmd.add_argument("run", type=int, metavar="RUN", help="the run's numeric id (the ID column of 'outpost runs list')")
    add_wait_options(cmd, "poll until the run finishes; exit 0 on success, 1 on failure")

    cmd = add_command(verbs, "log", "Print what one try of a device task logged (ctx.log lines, stdout, stderr).", show_log,
                      ["outpost runs log 12 flash", "outpost runs log 12 health --map-index 3 --try 1", "outpost runs log 12 flash -o json", "outpost runs log 12 flash --try 2"], [out])
    cmd.add_argument("run", type=int, metavar="RUN", help="the run's numeric id")
    cmd.add_argument("task", metavar="TASK_ID", help="the task's id in the DAG")
    cmd.add_argument("--map-index", type=int, default=None, metavar="N", help="which instance of a fan-out (the MAP_INDEX column); needed when there are several")
    cmd.add_argument("--try", dest="try_number", type=int, default=None, metavar="N", help="which try (default: the latest try that has a log, else the current one)")
    operations.register_run_actions(verbs)


def add_wait_options(cmd: argparse.ArgumentParser, wait_help: str) -> None:
    cmd.add_argument("--wait", action="store_true", help=wait_help)
    cmd.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after SECONDS (exit 6); default: wait forever")
    cmd.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="with --wait: seconds between polls (default 2)")


def list_runs(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/runs", dag_id=args.dag, state=args.state, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("ID", lambda r: r["id"]),
        ("DAG_ID", lambda r: r["dag_id"]),
        ("STATE", lambda r: r["state"]),
        ("TYPE", lambda r: r["run_type"]),
        ("LOGICAL_DATE", lambda r: when(r["logical_date"])),
        ("ENDED", lambda r: when(r["ended_at"])),
        ("TASKS", lambda r: counts(r["task_counts"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "runs")


def show_run(client: HubClient, args: argparse.Namespace) -> int:
    if args.wait:
        return wait_and_show(client, args, args.run)
    emit(args, client.get(f"/runs/{args.run}"), run_text)
    return ExitCode.OK


def show_log(client: HubClient, args: argparse.Namespace) -> int:
    run = client.get(f"/runs/{args.run}")
    tis = [t for t in run["task_instances"] if t["task_id"] == args.task and (args.map_index is None or t["map_index"] == args.map_index)]
    if not tis:
        raise CtlError(f"run {args.run} has no task {args.task!r}" + ("" if args.map_index is None else f" with map index {args.map_index}"), ExitCode.NOT_FOUND)
    if len(tis) > 1:
        raise CtlError(f"task {args.task!r} has {len(tis)} instances in run {args.run}; pick one with --map-index (0-{len(tis) - 1})", ExitCode.USAGE)
    ti = tis[0]
    try_number = args.try_number if args.try_number is not None else latest_logged_try(client, args.run, ti)
    emit(args, client.get(f"/runs/{args.run}/tasks/{ti['id']}/tries/{try_number}/log"), log_text)
    return ExitCode.OK


def latest_logged_try(client: HubClient, run_pk: int, ti: dict[str, Any]) -> int:
    """The latest try of ``ti`` that has a stored log; the current try when
    none has (its log may be on its way). Says so on stderr when that is an
    earlier try than the current one (a retry that has logged nothing yet)."""
    current = max(ti["try_number"], 1)
    logged = [entry["try_number"] for entry in client.get(f"/runs/{run_pk}/tasks/{ti['id']}/logs")["logs"]]
    if not logged:
        return current
    latest = max(logged)
    if latest < current:
        print(f"(try {current} has no log yet; showing try {latest}, the latest with one; --try {current} for the current try)", file=sys.stderr)
    return latest


def log_text(doc: dict[str, Any]) -> str:
    if not doc["logs"]:
        return f"(try {doc['try_number']} of {doc['task_id']} has no log yet)"
    parts = []
    for entry in doc["logs"]:
        state = "" if entry["complete"] else ", incomplete: more chunks are on their way"
        parts.append(f"--- {entry['agent_id']} (assignment {entry['assignment_id']}{state}) ---\n{entry['text'].rstrip(chr(10))}")
    return "\n".join(parts)


def wait_and_show(client: HubClient, args: argparse.Namespace, run_pk: int) -> int:
    """Poll the run until it finishes (progress on stderr), print it, and
    return OK or RUN_FAILED; WAIT_TIMEOUT as a ``CtlError`` after --timeout."""
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    last: tuple[str, dict[str, int]] | None = None
    while True:
        run = client.get(f"/runs/{run_pk}")
        progress = (run["state"], run["task_counts"])
        if progress != last:
            print(f"run {run_pk} {run['state']}: {counts(run['task_counts'])}", file=sys.stderr)
            last = progress
        if run["state"] in FINISHED:
            emit(args, run, run_text)
            return ExitCode.OK if run["state"] == RunState.SUCCESS else ExitCode.RUN_FAILED
        if deadline is not None and time.monotonic() >= deadline:
            raise CtlError(f"run {run_pk} is still {run['state']} after {args.timeout:g} s; wait longer with --timeout or check it with 'outpost runs show {run_pk}'", ExitCode.WAIT_TIMEOUT)
        pause = max(0.05, args.interval)
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - time.monotonic()))
        time.sleep(pause)


def run_text(run: dict[str, Any]) -> str:
    head = fields(run, [
        ("id", lambda r: r["id"]),
        ("dag_id", lambda r: r["dag_id"]),
        ("run_id", lambda r: r["run_id"]),
        ("state", lambda r: r["state"]),
        ("run_type", lambda r: r["run_type"]),
        ("dag_version", lambda r: r.get("dag_version_number")),
        ("logical_date", lambda r: when(r["logical_date"])),
        ("started_at", lambda r: when(r["started_at"])),
        ("ended_at", lambda r: when(r["ended_at"])),
        ("conf", lambda r: r["conf"] or None),
        ("tasks", lambda r: counts(r["task_counts"])),
    ])
    tis = table(run["task_instances"], [
        ("TASK_ID", lambda t: t["task_id"]),
        ("MAP_INDEX", lambda t: None if t["map_index"] < 0 else t["map_index"]),
        ("STATE", lambda t: t["state"]),
        ("TRY", lambda t: f"{t['try_number']}/{t['max_tries']}"),
        ("AGENT_ID", lambda t: t["agent_id"]),
        ("STARTED", lambda t: when(t["started_at"])),
        ("ENDED", lambda t: when(t["ended_at"])),
        ("ERROR", lambda t: t["error"] and (t["error"].get("message") or t["error"])),
    ])
    return f"{head}\n\n{tis}" if run["task_instances"] else head
