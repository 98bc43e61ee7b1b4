"""``outpost agents list|show|groups`` and ``outpost import-errors``."""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import quote

from hub.ctl.http import HubClient
from hub.ctl.output import emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent


def register(nouns: Any) -> None:
    verbs = add_noun(nouns, "agents", "List and inspect agents (edge devices).", ["outpost agents list --state online", "outpost agents show edge-1"])
    out, paging = output_parent(), paging_parent()

    cmd = add_command(verbs, "list", "List agents with hardware, firmware, groups, state and when they were last seen, filtered by the device registry.", list_agents,
                      ["outpost agents list", "outpost agents list --state online --label site=berlin",
                       "outpost agents list --group canary --hardware rpi4 --firmware '>=1.2,<2.0'", "outpost agents list --offline -q pump -o json"],
                      [out, paging])
    cmd.add_argument("--state", choices=("online", "offline"), help="only online or offline agents")
    online = cmd.add_mutually_exclusive_group()
    online.add_argument("--online", dest="online", action="store_const", const="true", help="only online agents")
    online.add_argument("--offline", dest="online", action="store_const", const="false", help="only offline agents")
    cmd.add_argument("--label", action="append", metavar="KEY=VALUE", help="only agents with this label; repeat to require several")
    cmd.add_argument("--group", action="append", metavar="GROUP", help="only agents in this group; repeat for any of several")
    cmd.add_argument("--hardware", action="append", metavar="MODEL", help="only this hardware model; repeat for any of several")
    cmd.add_argument("--firmware", metavar="RANGE", help="only firmware versions in this range, e.g. '>=1.2,<2.0'")
    cmd.add_argument("--job-type", metavar="NAME", help="only agents that advertise this job type")
    cmd.add_argument("-q", "--search", dest="q", metavar="TEXT", help="only agents whose id or hostname contains TEXT")

    cmd = add_command(verbs, "show", "Show one agent: labels, job types, last heartbeat, recent task instances.", show_agent,
                      ["outpost agents show edge-1", "outpost agents show edge-1 -o json"], [out])
    cmd.add_argument("agent_id", metavar="AGENT_ID")

    groups = add_noun(verbs, "groups", "Set the fleet groups of an agent (operator or admin); rollouts and filters select by them.",
                      ["outpost agents groups set edge-1 canary berlin", "outpost agents groups add edge-1 canary", "outpost agents groups remove edge-1 canary"])
    for verb, summary, handler in (
        ("set", "Replace the agent's groups (none given: no groups).", set_groups),
        ("add", "Add the agent to groups.", add_groups),
        ("remove", "Remove the agent from groups.", remove_groups),
    ):
        cmd = add_command(groups, verb, summary, handler, [f"outpost agents groups {verb} edge-1 canary"], [out])
        cmd.add_argument("agent_id", metavar="AGENT_ID")
        cmd.add_argument("groups", metavar="GROUP", nargs="*" if verb == "set" else "+")

    add_command(nouns, "import-errors", "List DAG files the hub could not load, with the reason.", list_import_errors,
                ["outpost import-errors", "outpost import-errors -o json"], [out, paging])


def list_agents(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get(
        "/agents", state=args.state, online=args.online, label=args.label, group=args.group, hardware=args.hardware, firmware=args.firmware,
        job_type=args.job_type, q=args.q, limit=args.limit, offset=args.offset,
    )
    emit(args, page, lambda p: table(p["items"], [
        ("AGENT_ID", lambda a: a["agent_id"]),
        ("HOSTNAME", lambda a: a["hostname"]),
        ("STATE", lambda a: a["state"]),
        ("LAST_SEEN", lambda a: when(a["last_seen"])),
        ("HARDWARE", lambda a: a.get("hardware_model") or None),
        ("FIRMWARE", lambda a: a.get("firmware_version") or None),
        ("GROUPS", lambda a: ",".join(a.get("groups") or []) or None),
        ("VERSION", lambda a: a["version"]),
        ("SKEW", _skew),
        ("LABELS", lambda a: ",".join(f"{k}={v}" for k, v in a["labels"].items())),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "agents")


def show_agent(client: HubClient, args: argparse.Namespace) -> None:
    emit(args, client.get(f"/agents/{quote(args.agent_id, safe='')}"), _agent_text)


def set_groups(client: HubClient, args: argparse.Namespace) -> None:
    _put_groups(client, args, list(args.groups))


def add_groups(client: HubClient, args: argparse.Namespace) -> None:
    current = client.get(_path(args.agent_id)).get("groups") or []
    _put_groups(client, args, sorted({*current, *args.groups}))


def remove_groups(client: HubClient, args: argparse.Namespace) -> None:
    current = client.get(_path(args.agent_id)).get("groups") or []
    _put_groups(client, args, [g for g in current if g not in set(args.groups)])


def _put_groups(client: HubClient, args: argparse.Namespace, groups: list[str]) -> None:
    agent = client.put(f"{_path(args.agent_id)}/groups", {"groups": groups})
    emit(args, agent, lambda a: f"{a['agent_id']}: groups {', '.join(a['groups']) or '(none)'}")


def _path(agent_id: str) -> str:
    return f"/agents/{quote(agent_id, safe='')}"


def list_import_errors(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/import-errors", limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: "\n\n".join(
        fields(e, [("fileloc", lambda e: e["fileloc"]), ("kind", lambda e: e["kind"]), ("recorded_at", lambda e: when(e["recorded_at"])), ("error", lambda e: e["error"])])
        for e in p["items"]
    ))
    if args.output == "table":
        page_note(page, "import errors")


def _skew(agent: dict[str, Any]) -> str | None:
    """The device clock's offset; ``!`` while it is flagged (not trusted)."""
    skew = agent.get("clock_skew")
    if skew is None:
        return None
    return f"{skew:+.1f}s" + ("" if agent.get("clock_trusted", True) else " ! flagged")


def _agent_text(agent: dict[str, Any]) -> str:
    head = fields(agent, [
        ("agent_id", lambda a: a["agent_id"]),
        ("hostname", lambda a: a["hostname"]),
        ("state", lambda a: a["state"]),
        ("version", lambda a: a["version"]),
        ("labels", lambda a: ", ".join(f"{k}={v}" for k, v in a["labels"].items())),
        ("groups", lambda a: ", ".join(a.get("groups") or []) or None),
        ("hardware", lambda a: a.get("hardware_model") or None),
        ("firmware", lambda a: a.get("firmware_version") or None),
        ("job_types", lambda a: ", ".join(_job_type(j) for j in a["job_types"])),
        ("first_seen", lambda a: when(a["first_seen"])),
        ("last_seen", lambda a: when(a["last_seen"])),
        ("clock_skew", _skew),
        ("last_heartbeat", lambda a: a["last_heartbeat"] or None),
        ("inventory", lambda a: a.get("inventory") or None),
    ])
    recent = agent["recent_task_instances"]
    if not recent:
        return head + "\n\nno task instances yet"
    tis = table(recent, [
        ("RUN", lambda t: t["run_pk"]),
        ("DAG_ID", lambda t: t["dag_id"]),
        ("TASK_ID", lambda t: t["task_id"]),
        ("MAP_INDEX", lambda t: None if t["map_index"] < 0 else t["map_index"]),
        ("STATE", lambda t: t["state"]),
        ("TRY", lambda t: f"{t['try_number']}/{t['max_tries']}"),
        ("ENDED", lambda t: when(t["ended_at"])),
    ])
    return f"{head}\n\n{tis}"


def _job_type(job: Any) -> str:
    if isinstance(job, dict):
        return f"{job.get('name')} {job.get('version', '')}".strip()
    return str(job)
