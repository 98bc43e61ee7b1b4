"""systemd's notify protocol (``sd_notify(3)``): readiness, status, watchdog.

With ``Type=notify`` systemd passes ``$NOTIFY_SOCKET``, an ``AF_UNIX``
datagram socket (a path, or ``@name`` for one in the abstract namespace), and
reads ``KEY=VALUE`` lines from each datagram: ``READY=1`` once start-up
recovery is done, ``STATUS=...`` for ``systemctl status``, ``STOPPING=1``,
and ``WATCHDOG=1``, which must arrive at least every ``$WATCHDOG_USEC``
microseconds (``WatchdogSec=``) or systemd kills and restarts the service.

This is the whole protocol, in a few lines of socket code: no well-kept
library exists for it (the PyPI ``sdnotify`` package is unmaintained and has
no watchdog logic). Without ``$NOTIFY_SOCKET`` every call does nothing, so
the agent runs the same outside systemd.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """Sends notify lines to systemd, when systemd asked for them."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        # "@name" is the abstract namespace: a leading NUL byte on the wire.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval: float | None = None
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        # WATCHDOG_PID names the process the watchdog is meant for; a child
        # that inherited the variables must not ping for its parent.
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` in one datagram. False (and a debug log) when not
        under systemd or the socket is gone: notification is never fatal."""
        if not self._address:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, self._address)
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", lines, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")
