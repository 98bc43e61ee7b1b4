"""The architecture's rules, checked on every test run: import contracts
(import-linter, configured in pyproject.toml), no wall-clock reads outside
``shared/clock.py``, and import-light packages."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hub", "agent", "shared", "firmware_jobs")
CLOCK_MODULE = ROOT / "shared" / "clock.py"

#: Calls that read the wall clock. ``time.monotonic`` and sleeping are fine.
WALL_CLOCK_CALLS = {
    ("time", "time"),
    ("time", "time_ns"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}
#: These read the wall clock only when called without an argument.
WALL_CLOCK_WITHOUT_ARGS = {("time", "localtime"), ("time", "gmtime"), ("time", "ctime"), ("time", "asctime")}


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    assert lint.exists(), f"{lint} is missing: run ./dev setup (import-linter is in the dev extra)"
    proc = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"lint-imports failed:\n{proc.stdout}\n{proc.stderr}"


def wall_clock_reads(source: str, name: str) -> list[str]:
    """``name:line: code`` for every wall-clock read in one module's source."""
    found = []
    for node in ast.walk(ast.parse(source, filename=name)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else None
            call = (owner_name, node.func.attr)
            if call in WALL_CLOCK_CALLS or (call in WALL_CLOCK_WITHOUT_ARGS and not node.args):
                found.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            # ``from time import time`` would hide the call from the check above.
            found += [f"{name}:{node.lineno}: from time import {a.name}" for a in node.names if a.name in ("time", "time_ns")]
    return found


def test_wall_clock_is_read_only_in_shared_clock() -> None:
    files = sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if p != CLOCK_MODULE)
    assert any(p.parent.name == "shared" for p in files), "found no source files: wrong ROOT?"
    reads = [hit for path in files for hit in wall_clock_reads(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))]
    assert not reads, "wall-clock reads outside shared/clock.py (take a Clock or a `now` argument instead):\n" + "\n".join(reads)


@pytest.mark.parametrize(
    "source",
    [
        "import time\nx = time.time()",
        "import time\nx = time.time_ns()",
        "from datetime import datetime\nx = datetime.now()",
        "import datetime\nx = datetime.datetime.utcnow()",
        "from datetime import date\nx = date.today()",
        "import time\nx = time.gmtime()",
        "from time import time",
    ],
    ids=lambda source: source.splitlines()[-1],
)
def test_the_wall_clock_check_catches_each_form(source: str) -> None:
    assert wall_clock_reads(source, "probe.py")


def test_monotonic_time_and_conversions_of_given_times_are_allowed() -> None:
    source = "import time\nfrom datetime import datetime\na = time.monotonic()\nb = time.gmtime(0)\nc = datetime.fromtimestamp(0)\n"
    assert wall_clock_reads(source, "ok.py") == []


def imported_after(statement: str) -> set[str]:
    code = f"import sys, json\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return {name.split(".")[0] for name in json.loads(proc.stdout)}


def test_importing_hub_and_shared_loads_no_web_or_database_library() -> None:
    loaded = imported_after("import shared, hub")
    assert not loaded & {"fastapi", "sqlalchemy", "starlette", "uvicorn", "alembic"}


def test_agent_side_imports_no_server_library() -> None:
    loaded = imported_after("import shared, agent, firmware_jobs\nfrom firmware_jobs import registry\nregistry.catalog()")
    assert not loaded & {"hub", "fastapi", "sqlalchemy", "starlette", "uvicorn", "alembic", "croniter", "jinja2"}
