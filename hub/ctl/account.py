"""``outpost password``: change the password of the user the API token
belongs to (POST /api/v1/whoami/password)."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from hub.ctl.errors import CtlError, ExitCode
from hub.ctl.http import HubClient
from hub.ctl.parsing import add_command


def register(nouns: Any) -> None:
    cmd = add_command(nouns, "password", "Change your own password (the user of the API token); your other dashboard sessions end, tokens stay.",
                      change_password,
                      ["outpost password", "printf '%s\\n%s\\n' \"$OLD\" \"$NEW\" | outpost password --stdin"])
    cmd.add_argument("--stdin", action="store_true", help="read the current and the new password as two lines from standard input instead of asking")


def change_password(client: HubClient, args: argparse.Namespace) -> None:
    if args.stdin:
        # Passwords never go on the command line: other users of the host can read it.
        lines = sys.stdin.read().splitlines()
        if len(lines) < 2:
            raise CtlError("--stdin needs two lines: the current password, then the new one", ExitCode.USAGE)
        current, new = lines[0], lines[1]
    else:
        current = getpass.getpass("Current password: ")
        new = getpass.getpass("New password: ")
        if getpass.getpass("New password again: ") != new:
            raise CtlError("the two new passwords differ; nothing was changed", ExitCode.USAGE)
    client.post("/whoami/password", {"current_password": current, "new_password": new})
    sys.stdout.write("password changed; your other dashboard sessions were logged out\n")
