"""Registration, lookup and the advertised catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from firmware_jobs import registry
from firmware_jobs.base import Job, JobContext
from firmware_jobs.registry import Registry
from shared.errors import UnknownJobType


def make_job(job_name: str, schema: dict[str, Any] | None = None) -> type[Job]:
    class Sample(Job):
        name = job_name
        version = "2.1"
        description = "a sample"
        params_schema = schema or {"type": "object", "properties": {}, "additionalProperties": False}

        def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
            return None

    return Sample


def test_builtin_job_types_are_installed() -> None:
    assert registry.names() == ["command.run", "config.apply", "data.collect", "diagnostics.collect", "firmware.update", "noop"]
    assert registry.get("noop").name == "noop"


def test_get_returns_a_fresh_instance() -> None:
    assert registry.get("noop") is not registry.get("noop")


def test_unknown_job_type_names_the_installed_ones() -> None:
    with pytest.raises(UnknownJobType) as info:
        registry.get("firmware.frobnicate")
    message = str(info.value)
    assert "'firmware.frobnicate' is not installed" in message
    assert "command.run, config.apply, data.collect, diagnostics.collect, firmware.update, noop" in message
    assert info.value.code == "unknown_job_type"


def test_catalog_is_sorted_json_and_complete() -> None:
    catalog = registry.catalog()
    assert [entry["name"] for entry in catalog] == registry.names()
    for entry in catalog:
        assert set(entry) == {"name", "version", "description", "params_schema", "rerunnable"}
        assert entry["params_schema"]["type"] == "object"
    assert json.loads(json.dumps(catalog)) == catalog
    assert {e["name"]: e["rerunnable"] for e in catalog} == {
        "command.run": False, "config.apply": True, "data.collect": True, "diagnostics.collect": True, "firmware.update": True, "noop": True,
    }


def test_catalog_schemas_are_copies() -> None:
    registry.catalog()[0]["params_schema"]["properties"].clear()
    assert registry.catalog()[0]["params_schema"]["properties"]


def test_a_private_registry_registers_and_refuses_clashes() -> None:
    jobs = Registry()
    sample = jobs.register(make_job("test.sample"))
    assert jobs.names() == ["test.sample"] and isinstance(jobs.get("test.sample"), sample)
    jobs.register(sample)  # registering the same class again is harmless
    with pytest.raises(ValueError, match="already registered"):
        jobs.register(make_job("test.sample"))


@pytest.mark.parametrize("bad_name", ["Noop", "no op", "firmware.", ".x", "x..y", "1x", ""])
def test_invalid_names_are_refused(bad_name: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        Registry().register(make_job(bad_name))


def test_unsupported_schemas_are_refused_at_registration() -> None:
    with pytest.raises(ValueError, match="pattern"):
        Registry().register(make_job("test.bad", {"type": "object", "properties": {"x": {"pattern": "y"}}}))
    with pytest.raises(ValueError, match="type 'object'"):
        Registry().register(make_job("test.bad", {"type": "array"}))


def test_importing_the_package_runs_no_job_module() -> None:
    code = "import sys, firmware_jobs; print(sorted(m for m in sys.modules if m.startswith('firmware_jobs')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]).stdout
    assert "firmware_jobs.command" not in out and "firmware_jobs.registry" in out
