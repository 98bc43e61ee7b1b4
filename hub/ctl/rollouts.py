"""``outpost rollouts list|show|devices|pause|resume|abort``: staged
rollouts of fleet tasks (docs/fleet.md, "Rollouts")."""

from __future__ import annotations

import argparse
from typing import Any

from hub.ctl.http import HubClient
from hub.ctl.output import emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent

STATES = ("running", "paused", "aborted", "failed", "completed")
DEVICE_STATES = ("pending", "notified", "succeeded", "failed", "timed_out", "skipped")


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "rollouts", "Staged rollouts of fleet tasks: progress, devices, pause, resume, abort.",
                     ["outpost rollouts list --state running", "outpost rollouts show 3", "outpost rollouts abort 3 --reason 'bad build'"])
    cmd = add_command(verbs, "list", "List rollouts, newest first: state, phase, batch, devices per state, failure rate.", list_rollouts,
                      ["outpost rollouts list", "outpost rollouts list --state paused --dag firmware_update -o json"], [output_parent(), paging_parent()])
    cmd.add_argument("--state", choices=STATES, help="only rollouts in this state")
    cmd.add_argument("--dag", metavar="DAG_ID", help="only rollouts of this DAG")
    cmd = add_command(verbs, "show", "Show one rollout: policy, phase, batch, devices per state, failure rate against the threshold.", show,
                      ["outpost rollouts show 3", "outpost rollouts show 3 -o json"], [output_parent()])
    cmd.add_argument("rollout_id", type=int, metavar="ROLLOUT")
    cmd = add_command(verbs, "devices", "List a rollout's devices in rollout order: state, batch, try, task instance, error.", devices,
                      ["outpost rollouts devices 3 --state failed", "outpost rollouts devices 3 --limit 500 -o json"], [output_parent(), paging_parent()])
    cmd.add_argument("rollout_id", type=int, metavar="ROLLOUT")
    cmd.add_argument("--state", choices=DEVICE_STATES, help="only devices in this state")
    for verb, summary in (
        ("pause", "Pause a rollout: no new device is notified; devices in flight finish."),
        ("resume", "Resume a paused rollout."),
        ("abort", "Abort a rollout: pending devices are skipped, in-flight ones finish, the run fails."),
    ):
        cmd = add_command(verbs, verb, summary + " Needs the operator role; audited.", _action(verb),
                          [f"outpost rollouts {verb} 3", f"outpost rollouts {verb} 3 --reason 'night shift'"], [output_parent()])
        cmd.add_argument("rollout_id", type=int, metavar="ROLLOUT")
        cmd.add_argument("--reason", default="", help="why (kept in the rollout and the audit log)")


def _counts(r: dict[str, Any]) -> str:
    return " ".join(f"{n} {s}" for s, n in r["counts"].items() if n) or "-"


def _rate(r: dict[str, Any]) -> str:
    return f"{r['failure_rate']:.1%} / {r['failure_threshold']:.1%}"


def list_rollouts(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/rollouts", state=args.state, dag_id=args.dag, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("ID", lambda r: r["id"]),
        ("DAG_ID", lambda r: r["dag_id"]),
        ("RUN", lambda r: r["run_pk"]),
        ("TASK", lambda r: r["task_id"]),
        ("STATE", lambda r: r["state"]),
        ("PHASE", lambda r: r["phase"]),
        ("BATCH", lambda r: r["batch"]),
        ("DEVICES", _counts),
        ("FAILED/THRESHOLD", _rate),
        ("STARTED", lambda r: when(r["started_at"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "rollouts")


def _detail(r: dict[str, Any]) -> str:
    return fields(r, [
        ("id", lambda r: r["id"]), ("dag", lambda r: r["dag_id"]), ("run", lambda r: f"{r['run_pk']} ({r['run_id']})"), ("task", lambda r: r["task_id"]),
        ("state", lambda r: r["state"]), ("phase", lambda r: r["phase"]), ("batch", lambda r: f"{r['batch']} (takes {r['batch_target']})"),
        ("devices", lambda r: f"{r['total']}: {_counts(r)}"), ("failure rate", _rate),
        ("success threshold", lambda r: f"{r['success_threshold']:.1%} of a batch"),
        ("started", lambda r: when(r["started_at"])), ("deadline", lambda r: when(r["deadline"])), ("finished", lambda r: when(r["finished_at"])),
        ("reason", lambda r: r["reason"] or "-"), ("last change by", lambda r: r["actor"]),
        ("selector", lambda r: " ".join(f"{k}={v}" for k, v in r["selector"].items() if v) or "every device"),
        ("policy", lambda r: " ".join(f"{k}={v}" for k, v in r["policy"].items() if v not in (None, [], False))),
    ])


def show(client: HubClient, args: argparse.Namespace) -> None:
    emit(args, client.get(f"/rollouts/{args.rollout_id}"), _detail)


def devices(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get(f"/rollouts/{args.rollout_id}/devices", state=args.state, limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("AGENT", lambda d: d["agent_id"]),
        ("STATE", lambda d: d["state"]),
        ("BATCH", lambda d: "-" if d["batch"] is None else d["batch"]),
        ("TRY", lambda d: d["try_number"]),
        ("TASK_INSTANCE", lambda d: f"run {d['run_pk']} ti {d['ti_id']}"),
        ("ERROR", lambda d: d["error"] or "-"),
        ("NOTIFIED", lambda d: when(d["notified_at"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "devices")


def _action(verb: str) -> Any:
    def run(client: HubClient, args: argparse.Namespace) -> None:
        emit(args, client.post(f"/rollouts/{args.rollout_id}/{verb}", {"reason": args.reason}), _detail)

    return run
