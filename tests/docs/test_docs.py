"""Docs are part of the product: every setting and every command is documented,
and every command's --help carries an example."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import AgentSettings
from hub.config import HubSettings

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DOC = (ROOT / "docs" / "configuration.md").read_text()


@pytest.mark.parametrize("name", sorted(HubSettings.model_fields))
def test_every_hub_setting_is_documented(name: str) -> None:
    assert f"| `{name}` |" in CONFIG_DOC


@pytest.mark.parametrize("name", sorted(f.name for f in dataclasses.fields(AgentSettings)))
def test_every_agent_setting_is_documented(name: str) -> None:
    assert f"| `{name}` |" in CONFIG_DOC


HUB_COMMANDS = [[], ["standalone"], ["scheduler"], ["api"], ["db"], ["dags"], ["secrets"], ["agents"], ["broker"], ["users"], ["tokens"]]


@pytest.mark.parametrize("command", HUB_COMMANDS, ids=lambda c: " ".join(c) or "outpost-hub")
def test_hub_help_has_an_example(command: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "hub", *command, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "example" in out.stdout.lower()


def test_readme_names_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "./dev demo" in readme and "./dev test" in readme
    assert "./dev test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", ["concepts.md", "conflicts.md", "dags.md", "porting.md", "configuration.md", "api.md", "cli.md"])
def test_docs_pages_linked_from_the_readme_exist(page: str) -> None:
    assert (ROOT / "docs" / page).exists()
    assert f"docs/{page}" in (ROOT / "README.md").read_text()
