"""``outpost-hub users ...`` and ``outpost-hub tokens ...``: manage hub users
and API tokens on the database directly (like ``db upgrade``), for the first
admin and for recovery when nobody can log in. Changes are audited with the
actor ``cli``."""

from __future__ import annotations

import argparse
import getpass
import json
import secrets
import sys
from datetime import timedelta
from typing import Any

EPILOG = {
    "users": (
        "examples:\n"
        "  outpost-hub users create alice --role operator          # asks for the password\n"
        "  outpost-hub users create bob --role viewer --scope-tag fleet --scope-group berlin\n"
        "  echo \"$PW\" | outpost-hub users passwd alice              # password from stdin\n"
        "  outpost-hub users set-role alice admin\n"
        "  outpost-hub users disable bob"
    ),
    "tokens": (
        "examples:\n"
        "  outpost-hub tokens create alice --name laptop --role viewer --expires-days 30\n"
        "  outpost-hub tokens list --user alice\n"
        "  outpost-hub tokens revoke 7"
    ),
}


def register(command: Any) -> None:
    """Add the two commands; ``command(name, help)`` makes a subparser with ``--config``."""
    p = command("users", "Hub users: create, list, set-role, disable, enable, passwd.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    v = verbs.add_parser("create", help="create a user")
    v.add_argument("name")
    v.add_argument("--role", default="viewer", choices=["admin", "operator", "viewer"], help="default viewer")
    v.add_argument("--scope-tag", action="append", help="limit the user to DAGs with this tag (repeat for several)")
    v.add_argument("--scope-group", action="append", help="limit the user to agents with label group=VALUE (repeat for several)")
    v.add_argument("--generate-password", action="store_true", help="make a random password and print it")
    verbs.add_parser("list", help="list users").add_argument("-o", "--output", choices=["table", "json"], default="table")
    v = verbs.add_parser("set-role", help="change a user's role")
    v.add_argument("name")
    v.add_argument("role", choices=["admin", "operator", "viewer"])
    for verb, text in (("disable", "disable a user: no login, sessions end, tokens stop working"), ("enable", "enable a disabled user")):
        verbs.add_parser(verb, help=text).add_argument("name")
    v = verbs.add_parser("passwd", help="set a user's password (ends their sessions)")
    v.add_argument("name")
    v.add_argument("--generate-password", action="store_true", help="make a random password and print it")

    p = command("tokens", "API tokens: create (shown once), list, revoke.")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    v = verbs.add_parser("create", help="create a token for a user and print it (only this once)")
    v.add_argument("user")
    v.add_argument("--name", default="cli", help="what the token is for (default cli)")
    v.add_argument("--role", choices=["admin", "operator", "viewer"], help="at most the user's role (default: the user's role)")
    v.add_argument("--expires-days", type=float, default=90.0, help="days until it expires (default 90; 0: never)")
    v.add_argument("--file", help="write the token to this file (mode 0600) instead of printing it")
    v = verbs.add_parser("list", help="list tokens (never their secrets)")
    v.add_argument("--user")
    v.add_argument("-o", "--output", choices=["table", "json"], default="table")
    verbs.add_parser("revoke", help="revoke a token by id").add_argument("id", type=int)


def run(args: argparse.Namespace, settings: Any) -> int:
    from hub.db import make_engine, make_sessionmaker, upgrade

    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    try:
        sessions = make_sessionmaker(engine)
        return _users(args, settings, sessions) if args.command == "users" else _tokens(args, sessions)
    finally:
        engine.dispose()


def _users(args: argparse.Namespace, settings: Any, sessions: Any) -> int:
    from hub import audit
    from hub.auth import users
    from hub.auth.bootstrap import PASSWORD_FILE
    from hub.db import transaction
    from shared.clock import utcnow

    now = utcnow()
    if args.verb == "list":
        with sessions() as session:
            rows = [users.user_dict(u) for u in users.list_users(session)]
        if args.output == "json":
            print(json.dumps(rows, default=str, indent=2))
        else:
            print(f"{'NAME':20} {'ROLE':9} {'STATE':9} SCOPE")
            for r in rows:
                scope = "; ".join(f"{k}={','.join(r[k])}" for k in ("scope_tags", "scope_groups") if r[k] is not None) or "-"
                print(f"{r['name']:20} {r['role']:9} {'disabled' if r['disabled'] else 'active':9} {scope}")
        return 0
    if args.verb in ("create", "passwd"):
        password = _password(args.generate_password)
    with transaction(sessions) as session:
        if args.verb == "create":
            user = users.create_user(session, args.name, password, args.role, now, scope_tags=args.scope_tag, scope_groups=args.scope_group)
            audit.record(session, "cli", "user.create", user.name, at=now, role=user.role, scope_tags=user.scope_tags, scope_groups=user.scope_groups)
            message = f"created {user.role} {user.name}"
        else:
            user = users.get_user(session, args.name)
            if args.verb == "set-role":
                before = user.role
                users.set_role(session, user, args.role)
                audit.record(session, "cli", "user.set_role", user.name, at=now, before=before, after=user.role)
                message = f"{user.name} is now {user.role}"
            elif args.verb in ("disable", "enable"):
                users.set_disabled(session, user, args.verb == "disable", now)
                audit.record(session, "cli", f"user.{args.verb}", user.name, at=now)
                message = f"{user.name} {args.verb}d"
            else:
                users.set_password(session, user, password, now)
                audit.record(session, "cli", "user.set_password", user.name, at=now)
                message = f"password of {user.name} changed; their dashboard sessions ended"
                # standalone's first-run password file would now be wrong.
                first = settings.state_dir / PASSWORD_FILE
                if user.name == "admin" and first.exists():
                    first.unlink()
    if getattr(args, "generate_password", False):
        print(f"password: {password}")
    print(message)
    return 0


def _password(generate: bool) -> str:
    if generate:
        return secrets.token_urlsafe(15)
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        from hub.errors import InvalidRequest

        raise InvalidRequest("the two passwords differ")
    return first


def _tokens(args: argparse.Namespace, sessions: Any) -> int:
    from pathlib import Path

    from hub import audit
    from hub.auth import tokens, users
    from hub.auth.keys import write_private
    from hub.db import transaction
    from shared.clock import utcnow

    now = utcnow()
    if args.verb == "list":
        with sessions() as session:
            user_id = users.get_user(session, args.user).id if args.user else None
            rows = [tokens.token_dict(t, n, now) for t, n in tokens.list_tokens(session, user_id)]
        if args.output == "json":
            print(json.dumps(rows, default=str, indent=2))
        else:
            print(f"{'ID':>5} {'USER':16} {'NAME':16} {'ROLE':9} {'STATE':8} {'PREFIX':11} {'EXPIRES':20} LAST USED")
            for r in rows:
                expires = r["expires_at"].strftime("%Y-%m-%d %H:%M") if r["expires_at"] else "never"
                used = r["last_used_at"].strftime("%Y-%m-%d %H:%M") if r["last_used_at"] else "never"
                print(f"{r['id']:>5} {r['user']:16} {r['name']:16} {r['role']:9} {r['state']:8} {r['prefix']:11} {expires:20} {used}")
        return 0
    with transaction(sessions) as session:
        if args.verb == "revoke":
            tokens.revoke(session, args.id, now)
            audit.record(session, "cli", "token.revoke", f"token:{args.id}", at=now)
            print(f"token {args.id} revoked")
            return 0
        user = users.get_user(session, args.user)
        expires = now + timedelta(days=args.expires_days) if args.expires_days > 0 else None
        secret, row = tokens.create_token(session, user, args.name, now, role=args.role, expires_at=expires)
        audit.record(session, "cli", "token.create", f"token:{row.id}", at=now, user=user.name, name=row.name, role=row.role)
        token_id = row.id
    if args.file:
        write_private(Path(args.file), secret + "\n")
        print(f"token {token_id} for {args.user} written to {args.file}")
    else:
        print(secret)
        print(f"token {token_id} for {args.user}; it is shown only now", file=sys.stderr)
    return 0
