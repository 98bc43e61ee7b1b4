"""``outpost variables ...`` and ``outpost connections ...``: the secrets
DAG tasks read. Write-only: the hub never sends a value back, so ``get``
shows whether a value is set, never the value. Prefer ``--stdin`` /
``--password-stdin`` to a value on the command line (shell history, ps)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.output import emit, fields, output_parent, page_note, table, when
from hub.ctl.parsing import add_command, add_noun, paging_parent


def register(nouns: Any) -> None:
    _register_variables(nouns)
    _register_connections(nouns)


def _register_variables(nouns: Any) -> None:
    verbs = add_noun(nouns, "variables", "Variables: named values DAGs read (var.value.NAME, Variable.get), stored encrypted, never shown.",
                     ["outpost variables list", "printf %s \"$TOKEN\" | outpost variables set api_token --stdin"])
    add_command(verbs, "list", "List variables (keys, descriptions, whether set; never values).", list_variables,
                ["outpost variables list", "outpost variables list -o json"], [output_parent(), paging_parent()])
    cmd = add_command(verbs, "get", "Show one variable (not its value).", get_variable, ["outpost variables get region"], [output_parent()])
    cmd.add_argument("key")
    cmd = add_command(verbs, "set", "Create or replace a variable's value.", set_variable,
                      ["outpost variables set region eu-west-1", "outpost variables set limits '{\"max\": 5}' --description 'read with var.json.limits'",
                       "printf %s \"$TOKEN\" | outpost variables set api_token --stdin"], [output_parent()])
    cmd.add_argument("key")
    cmd.add_argument("value", nargs="?", help="the value (or --stdin)")
    cmd.add_argument("--stdin", action="store_true", help="read the value from standard input (kept out of shell history)")
    cmd.add_argument("--description", help="a description (default: keep the current one)")
    cmd = add_command(verbs, "delete", "Delete a variable.", delete_variable, ["outpost variables delete region"])
    cmd.add_argument("key")


def _connection_options(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("conn_id", metavar="CONN_ID")
    cmd.add_argument("--type", dest="conn_type", help="connection type: http, postgres, mqtt, ... (free text)")
    cmd.add_argument("--description")
    cmd.add_argument("--host")
    cmd.add_argument("--login")
    cmd.add_argument("--port", type=int)
    cmd.add_argument("--schema")
    cmd.add_argument("--password", help="the password (prefer --password-stdin)")
    cmd.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    cmd.add_argument("--extra", metavar="JSON", help="extra fields, a JSON object, stored encrypted")


def _register_connections(nouns: Any) -> None:
    verbs = add_noun(nouns, "connections", "Connections: how tasks reach other systems (conn.ID.host, Connection.get); password and extra stored encrypted.",
                     ["outpost connections list", "printf %s \"$PW\" | outpost connections add warehouse --type postgres --host db.example --login etl --password-stdin"])
    add_command(verbs, "list", "List connections (passwords as ***).", list_connections,
                ["outpost connections list", "outpost connections list -o json"], [output_parent(), paging_parent()])
    cmd = add_command(verbs, "get", "Show one connection (password as ***).", get_connection, ["outpost connections get warehouse"], [output_parent()])
    cmd.add_argument("conn_id", metavar="CONN_ID")
    cmd = add_command(verbs, "add", "Create a connection.", add_connection,
                      ["outpost connections add weather_api --type http --host api.example --extra '{\"units\": \"metric\"}'",
                       "printf %s \"$PW\" | outpost connections add warehouse --type postgres --host db.example --port 5432 --login etl --password-stdin"],
                      [output_parent()])
    _connection_options(cmd)
    cmd = add_command(verbs, "update", "Change the fields given; the others (the password too) stay.", update_connection,
                      ["outpost connections update warehouse --host db2.example", "outpost connections update warehouse --clear-password"], [output_parent()])
    _connection_options(cmd)
    cmd.add_argument("--clear-password", action="store_true", help="remove the stored password")
    cmd = add_command(verbs, "delete", "Delete a connection.", delete_connection, ["outpost connections delete warehouse"])
    cmd.add_argument("conn_id", metavar="CONN_ID")


# --- variables ------------------------------------------------------------------

_VARIABLE = [("key", lambda v: v["key"]), ("description", lambda v: v["description"]), ("set", lambda v: v["is_set"]),
             ("sensitive", lambda v: v["sensitive"]), ("created", lambda v: when(v["created_at"])), ("updated", lambda v: when(v["updated_at"]))]


def list_variables(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/variables", limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("KEY", lambda v: v["key"]), ("SET", lambda v: v["is_set"]), ("SENSITIVE", lambda v: v["sensitive"]),
        ("UPDATED", lambda v: when(v["updated_at"])), ("DESCRIPTION", lambda v: v["description"]),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "variables")


def get_variable(client: HubClient, args: argparse.Namespace) -> None:
    found = client.get(f"/variables/{_segment(args.key)}")
    emit(args, found, lambda v: fields(v, _VARIABLE))


def set_variable(client: HubClient, args: argparse.Namespace) -> None:
    if args.stdin == (args.value is not None):
        raise CtlError("give the value either as an argument or with --stdin (one of the two)", ExitCode.USAGE)
    value = sys.stdin.read() if args.stdin else args.value
    body: dict[str, Any] = {"value": value}
    if args.description is not None:
        body["description"] = args.description
    found = client.put(f"/variables/{_segment(args.key)}", body)
    emit(args, found, lambda v: f"variable {v['key']} set")


def delete_variable(client: HubClient, args: argparse.Namespace) -> None:
    client.delete(f"/variables/{_segment(args.key)}")
    print(f"variable {args.key} deleted")


# --- connections ----------------------------------------------------------------

_CONNECTION = [("conn_id", lambda c: c["conn_id"]), ("type", lambda c: c["conn_type"]), ("description", lambda c: c["description"]),
               ("host", lambda c: c["host"]), ("port", lambda c: c["port"]), ("login", lambda c: c["login"]), ("schema", lambda c: c["schema"]),
               ("password", lambda c: c["password"]), ("extra", lambda c: c["extra"]), ("updated", lambda c: when(c["updated_at"]))]


def list_connections(client: HubClient, args: argparse.Namespace) -> None:
    page = client.get("/connections", limit=args.limit, offset=args.offset)
    emit(args, page, lambda p: table(p["items"], [
        ("CONN_ID", lambda c: c["conn_id"]), ("TYPE", lambda c: c["conn_type"]), ("HOST", lambda c: c["host"]), ("PORT", lambda c: c["port"]),
        ("LOGIN", lambda c: c["login"]), ("PASSWORD", lambda c: c["password"]), ("UPDATED", lambda c: when(c["updated_at"])),
    ]) if p["items"] else "")
    if args.output == "table":
        page_note(page, "connections")


def get_connection(client: HubClient, args: argparse.Namespace) -> None:
    found = client.get(f"/connections/{_segment(args.conn_id)}")
    emit(args, found, lambda c: fields(c, _CONNECTION))


def _connection_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in ("conn_type", "description", "host", "login", "port", "schema"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.password is not None and args.password_stdin:
        raise CtlError("give --password or --password-stdin, not both", ExitCode.USAGE)
    if args.password_stdin:
        body["password"] = sys.stdin.read().rstrip("\n")
    elif args.password is not None:
        body["password"] = args.password
    if getattr(args, "clear_password", False):
        if "password" in body:
            raise CtlError("--clear-password and a new password contradict each other", ExitCode.USAGE)
        body["password"] = None
    if args.extra is not None:
        try:
            extra = json.loads(args.extra)
        except ValueError as exc:
            raise CtlError(f"--extra is not JSON: {exc}", ExitCode.USAGE) from None
        if not isinstance(extra, dict):
            raise CtlError("--extra must be a JSON object, e.g. '{\"region\": \"eu\"}'", ExitCode.USAGE)
        body["extra"] = extra
    return body


def add_connection(client: HubClient, args: argparse.Namespace) -> None:
    found = client.post("/connections", {"conn_id": args.conn_id, **_connection_body(args)})
    emit(args, found, lambda c: f"connection {c['conn_id']} added")


def update_connection(client: HubClient, args: argparse.Namespace) -> None:
    body = _connection_body(args)
    if not body:
        raise CtlError("nothing to change: give at least one of --type, --host, --port, --login, --schema, --password(-stdin), --clear-password, --extra, --description", ExitCode.USAGE)
    found = client.patch(f"/connections/{_segment(args.conn_id)}", body)
    emit(args, found, lambda c: f"connection {c['conn_id']} updated")


def delete_connection(client: HubClient, args: argparse.Namespace) -> None:
    client.delete(f"/connections/{_segment(args.conn_id)}")
    print(f"connection {args.conn_id} deleted")


def _segment(name: str) -> str:
    return quote(name, safe="")
