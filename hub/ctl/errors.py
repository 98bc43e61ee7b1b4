"""Exit codes of ``outpost`` and the one error type its commands raise.

Scripts can rely on these numbers; ``docs/cli.md`` lists them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: ``runs show --wait``: the run finished in state failed.
    RUN_FAILED = 1
    #: Bad command line (argparse uses 2 too), e.g. --conf that is not JSON.
    USAGE = 2
    #: The DAG, run or agent does not exist.
    NOT_FOUND = 3
    #: The hub refused the request or failed (any other HTTP error).
    API_ERROR = 4
    #: No answer from the hub: connection refused, DNS, timeout.
    HUB_UNREACHABLE = 5
    #: ``--wait`` gave up before the run finished.
    WAIT_TIMEOUT = 6
    #: No token, a bad one (401), or the token's role does not allow it (403).
    AUTH = 7


class CtlError(Exception):
    """A failure to report as one line on stderr, exiting with ``exit_code``."""

    def __init__(self, message: str, exit_code: ExitCode) -> None:
        super().__init__(message)
        self.exit_code = exit_code
