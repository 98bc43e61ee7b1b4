"""No code-carrying format on the wire, in the DB or in queues, and no
shell strings: a scan of the source of every package (hub, agent, shared,
firmware_jobs).

Unpickling runs arbitrary code, so pickle, marshal, shelve, dill,
cloudpickle, jsonpickle, SQLAlchemy's PickleType and YAML's unsafe loaders
are banned outright. Messages are JSON (shared/envelope.py), DB columns are
JSON/text, the agent's queues hold JSON text.

Allowed, and why: nothing in the source names them. The one place pickle
is still used is *implicit*: ``multiprocessing`` (hub/executor.py's worker
pipes and the fork server, hub/dagprocessor.py's parse processes) pickles
the arguments and answers it passes between processes of the same hub, over
process-local pipes and a Unix socket only the hub's user can open. That is
not the wire, the DB or a queue, and no untrusted party can write to those
pipes; this scan does not (and cannot) see it, and it needs no allow-list
entry because the source never imports pickle for it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hub", "agent", "shared", "firmware_jobs")
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "jsonpickle", "joblib"}
BANNED_NAMES = {"PickleType"}
#: (file relative to ROOT, banned name) pairs that are truly needed. Empty.
ALLOWED: set[tuple[str, str]] = set()


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in BANNED_MODULES:
                found.append(f"from {node.module} import ...")
            found += [f"from {node.module} import {a.name}" for a in node.names if a.name in BANNED_NAMES]
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_NAMES:
            found.append(node.attr)
        elif isinstance(node, ast.Name) and node.id in BANNED_NAMES:
            found.append(node.id)
        elif isinstance(node, ast.Call):
            found += _bad_call(node)
    return found


def _bad_call(node: ast.Call) -> list[str]:
    func = ast.unparse(node.func)
    found = []
    if func in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "asyncio.create_subprocess_shell", "commands.getoutput"):
        found.append(f"{func}(...)")
    for kw in node.keywords:
        if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
            found.append(f"{func}(..., shell=...)")
    if func in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all"):
        safe = any(kw.arg == "Loader" and "Safe" in ast.unparse(kw.value) for kw in node.keywords)
        if not safe:
            found.append(f"{func}(...) without SafeLoader")
    if func.startswith("subprocess.") and func.rsplit(".", 1)[1] in ("run", "Popen", "call", "check_call", "check_output") and node.args:
        if isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
            found.append(f"{func}(<a string command>)")  # a list argv is never parsed by a shell
    return found


def test_the_scan_sees_every_package() -> None:
    files = _sources()
    for package in PACKAGES:
        assert any(p.is_relative_to(ROOT / package) for p in files), package
    assert len(files) > 50


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_code_carrying_format_or_shell_string(path: Path) -> None:
    relative = str(path.relative_to(ROOT))
    problems = [v for v in _violations(path) if (relative, v) not in ALLOWED]
    assert problems == [], f"{relative}: {problems}"


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle", "from pickle import loads", "import marshal", "import shelve", "import dill", "from sqlalchemy import PickleType",
        "x = sa.PickleType()", "yaml.load(text)", "yaml.unsafe_load(text)", "os.system('id')", "subprocess.run('ls', shell=True)",
        "subprocess.Popen(f'echo {x}')", "asyncio.create_subprocess_shell(cmd)",
    ],
)
def test_the_scan_catches_what_it_bans(tmp_path: Path, snippet: str) -> None:
    path = tmp_path / "sample.py"
    path.write_text(snippet + "\n")
    assert _violations(path), snippet


def test_safe_forms_pass(tmp_path: Path) -> None:
    path = tmp_path / "ok.py"
    path.write_text("yaml.load(text, Loader=yaml.SafeLoader)\nsubprocess.run(['ls', '-l'], shell=False)\nsubprocess.Popen(argv)\n")
    assert _violations(path) == []
