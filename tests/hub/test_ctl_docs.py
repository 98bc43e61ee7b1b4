"""docs/cli.md documents every command and every exit code of `outpost`."""

from __future__ import annotations

import re
from pathlib import Path

from hub.ctl import build_parser
from hub.ctl.errors import ExitCode
from hub.ctl.parsing import commands

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_every_command_has_a_section_in_cli_md() -> None:
    text = CLI_MD.read_text()
    headings = re.findall(r"^#{2,4} .*$", text, flags=re.MULTILINE)
    missing = [" ".join(words) for words, _ in commands(build_parser()) if not any(f"`outpost {' '.join(words)}" in h for h in headings)]
    assert missing == [], f"docs/cli.md has no section for: {', '.join(missing)}"


def test_every_command_has_an_example_in_cli_md() -> None:
    examples = "\n".join(re.findall(r"```(?:console|sh)\n(.*?)```", CLI_MD.read_text(), flags=re.DOTALL))
    missing = [" ".join(words) for words, _ in commands(build_parser()) if not re.search(rf"outpost (?:--hub \S+ )?{' '.join(words)}\b", examples)]
    assert missing == [], f"docs/cli.md has no example for: {', '.join(missing)}"


def test_every_exit_code_is_in_cli_md() -> None:
    text = CLI_MD.read_text()
    missing = [code.name for code in ExitCode if f"| {code.value} | `{code.name}` |" not in text]
    assert missing == [], f"docs/cli.md does not list exit codes: {', '.join(missing)}"

