"""``config.apply`` on a real device-root folder with real hook programs.

The hooks are shell scripts in ``<root>/hooks``: ``config-reload`` records
each call (and the content it saw) in ``calls.log`` and exits with the code
in ``reload.rc``; ``health-check`` fails when the live file contains
``broken``, as a real service started on a bad configuration would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from firmware_jobs import registry
from firmware_jobs.base import JobAborted, JobError
from firmware_jobs.config_apply import Journal
from shared.errors import InvalidParams

if TYPE_CHECKING:
    from tests.firmware_jobs.conftest import RecordingContext

RELOAD = """#!/bin/sh
echo "reload $1 $(cat "$1" 2>/dev/null | tr '\\n' ' ')" >> "$OUTPOST_DEVICE_ROOT/calls.log"
exit "$(cat "$OUTPOST_DEVICE_ROOT/reload.rc" 2>/dev/null || echo 0)"
"""
HEALTH = """#!/bin/sh
echo "health" >> "$OUTPOST_DEVICE_ROOT/calls.log"
[ -e "$OUTPOST_DEVICE_ROOT/health.sleep" ] && sleep "$(cat "$OUTPOST_DEVICE_ROOT/health.sleep")"
if grep -q broken "$OUTPOST_CONFIG_PATH" 2>/dev/null; then echo "service down: broken setting" >&2; exit 3; fi
exit 0
"""
VALIDATOR = """#!/bin/sh
for candidate; do :; done
echo "$@" >> "$(dirname "$0")/validator.log"
if grep -q forbidden "$candidate"; then echo "forbidden key" >&2; exit 1; fi
exit 0
"""


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def root(tmp_path: Path, ctx: RecordingContext) -> Path:
    root = tmp_path / "device"
    (root / "config").mkdir(parents=True)
    _script(root / "hooks" / "config-reload", RELOAD)
    _script(root / "hooks" / "health-check", HEALTH)
    validator = _script(tmp_path / "bin" / "check-config", VALIDATOR)
    ctx.settings = {**ctx.settings, "device_root": str(root), "command_allowlist": [str(validator)]}
    return root


def apply(ctx: RecordingContext, **params: Any) -> dict[str, Any]:
    job = registry.get("config.apply")
    return job.run(ctx, job.validate(dict(params)))


def failure(ctx: RecordingContext, **params: Any) -> JobError:
    with pytest.raises(JobError) as info:
        apply(ctx, **params)
    return info.value


def calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_new_file_is_written_reloaded_and_health_checked(ctx: RecordingContext, root: Path) -> None:
    out = apply(ctx, path="app/settings.json", content='{"rate": 5}', format="json")
    live = root / "config" / "app" / "settings.json"
    assert live.read_text() == '{"rate": 5}' and (live.stat().st_mode & 0o777) == 0o644
    assert out == {"path": "app/settings.json", "changed": True, "sha256": sha(b'{"rate": 5}'), "previous_sha256": None}
    assert calls(root) == [f"reload {live} {{\"rate\": 5}}", "health"]
    assert not list((Path(ctx.settings["state_dir"]) / "config-apply").glob("*.json"))  # no journal left


def test_same_content_again_changes_nothing_and_reloads_nothing(ctx: RecordingContext, root: Path) -> None:
    first = apply(ctx, path="a.toml", content="x = 1\n", format="toml")
    mtime = (root / "config" / "a.toml").stat().st_mtime_ns
    second = apply(ctx, path="a.toml", content="x = 1\n", format="toml")
    assert first["changed"] is True and second["changed"] is False
    assert second["sha256"] == second["previous_sha256"] == first["sha256"]
    assert (root / "config" / "a.toml").stat().st_mtime_ns == mtime
    assert len(calls(root)) == 2  # one reload, one health check: from the first apply only


def test_replacing_a_file_reports_the_previous_hash_and_keeps_its_mode(ctx: RecordingContext, root: Path) -> None:
    live = root / "config" / "a.ini"
    live.write_text("[main]\nrate = 1\n")
    live.chmod(0o600)
    out = apply(ctx, path="a.ini", content="[main]\nrate = 2\n", format="ini")
    assert out["previous_sha256"] == sha(b"[main]\nrate = 1\n") and out["changed"] is True
    assert live.read_text() == "[main]\nrate = 2\n" and (live.stat().st_mode & 0o777) == 0o600


def test_mode_and_base64_content(ctx: RecordingContext, root: Path) -> None:
    data = b"\x00\x01binary\xff"
    out = apply(ctx, path="blob.bin", content_b64=base64.b64encode(data).decode(), mode="0640")
    live = root / "config" / "blob.bin"
    assert live.read_bytes() == data and (live.stat().st_mode & 0o777) == 0o640 and out["sha256"] == sha(data)
    # a mode change alone is a change
    assert apply(ctx, path="blob.bin", content_b64=base64.b64encode(data).decode(), mode="0600")["changed"] is True
    assert (live.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("path", ["../outside", "/etc/passwd", "a/../../outside", "a//b", "./a", "a/./b", "x/.."])
def test_paths_escaping_config_are_refused(ctx: RecordingContext, root: Path, path: str) -> None:
    error = failure(ctx, path=path, content="x")
    assert error.code == "invalid_path" and error.retryable is False
    assert calls(root) == [] and not (root / "outside").exists()


def test_symlinks_out_of_config_and_symlinked_files_are_refused(ctx: RecordingContext, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "f").write_text("keep")
    (root / "config" / "link").symlink_to(outside)
    assert failure(ctx, path="link/f", content="x").code == "invalid_path"
    assert failure(ctx, path="link/new", content="x").code == "invalid_path"
    (root / "config" / "real").write_text("keep too")
    (root / "config" / "alias").symlink_to(root / "config" / "real")
    error = failure(ctx, path="alias", content="x")
    assert error.code == "invalid_path" and "symlink" in str(error)
    assert (outside / "f").read_text() == "keep" and (root / "config" / "real").read_text() == "keep too"
    assert not (outside / "new").exists()


def test_a_directory_is_not_replaced_nor_a_file_used_as_a_folder(ctx: RecordingContext, root: Path) -> None:
    (root / "config" / "d").mkdir()
    assert failure(ctx, path="d", content="x").code == "invalid_path"
    (root / "config" / "f").write_text("keep")
    assert failure(ctx, path="f/x", content="x").code == "invalid_path"
    assert (root / "config" / "f").read_text() == "keep" and calls(root) == []


@pytest.mark.parametrize(("fmt", "bad", "good"), [
    ("json", '{"rate": ', '{"rate": 1}'),
    ("toml", "rate = = 1", "rate = 1"),
    ("ini", "rate = 1 without a section", "[s]\nrate = 1"),
])
def test_content_that_does_not_parse_leaves_the_live_file_untouched(ctx: RecordingContext, root: Path, fmt: str, bad: str, good: str) -> None:
    live = root / "config" / f"c.{fmt}"
    live.write_text(good)
    error = failure(ctx, path=f"c.{fmt}", content=bad, format=fmt)
    assert error.code == "invalid_config" and error.retryable is False and fmt in str(error)
    assert live.read_text() == good and calls(root) == []
    assert apply(ctx, path=f"c.{fmt}", content=good + "\n", format=fmt)["changed"] is True


def test_invalid_utf8_is_not_json(ctx: RecordingContext, root: Path) -> None:
    error = failure(ctx, path="c.json", content_b64=base64.b64encode(b'{"a": "\xff"}').decode(), format="json")
    assert error.code == "invalid_config" and not (root / "config" / "c.json").exists()


def test_failed_validate_command_leaves_the_live_file_untouched(ctx: RecordingContext, root: Path, tmp_path: Path) -> None:
    live = root / "config" / "svc.conf"
    live.write_text("ok = 1\n")
    validator = ctx.settings["command_allowlist"][0]
    error = failure(ctx, path="svc.conf", content="forbidden = 1\n", validate_command=[validator, "--strict"])
    assert error.code == "validation_failed" and "forbidden key" in str(error) and "not touched" in str(error)
    assert live.read_text() == "ok = 1\n" and calls(root) == []
    args = (tmp_path / "bin" / "validator.log").read_text().split()
    assert args[0] == "--strict" and args[1].endswith("/svc.conf") and args[1] != str(live)  # the candidate, not the live file
    assert apply(ctx, path="svc.conf", content="ok = 2\n", validate_command=[validator, "--strict"])["changed"] is True
    assert live.read_text() == "ok = 2\n"


def test_validate_command_must_be_allow_listed(ctx: RecordingContext, root: Path) -> None:
    error = failure(ctx, path="svc.conf", content="x", validate_command=["true"])
    assert error.code == "command_not_allowed" and not (root / "config" / "svc.conf").exists()


def test_failed_health_check_restores_the_previous_file_and_reloads_it(ctx: RecordingContext, root: Path) -> None:
    live = root / "config" / "svc.conf"
    live.write_text("mode = fine\n")
    live.chmod(0o640)
    error = failure(ctx, path="svc.conf", content="mode = broken\n")
    assert error.code == "health_check_failed" and error.retryable is False
    assert "rolled_back" in str(error) and "service down" in str(error)
    assert live.read_text() == "mode = fine\n" and (live.stat().st_mode & 0o777) == 0o640
    assert calls(root) == [f"reload {live} mode = broken ", "health", f"reload {live} mode = fine "]
    assert not list((Path(ctx.settings["state_dir"]) / "config-apply").glob("*.backup"))


def test_failed_health_check_of_a_new_file_removes_it(ctx: RecordingContext, root: Path) -> None:
    error = failure(ctx, path="new.conf", content="broken\n")
    assert error.code == "health_check_failed" and "removed" in str(error)
    assert not (root / "config" / "new.conf").exists()


def test_failed_reload_restores_and_reports_a_failing_second_reload(ctx: RecordingContext, root: Path) -> None:
    live = root / "config" / "svc.conf"
    live.write_text("old\n")
    (root / "reload.rc").write_text("4")
    error = failure(ctx, path="svc.conf", content="new\n")
    assert error.code == "reload_failed" and "exited 4" in str(error)
    assert "rolled_back" in str(error) and "reload after the rollback failed too" in str(error)
    assert live.read_text() == "old\n"
    assert "health" not in calls(root)


def test_a_hanging_health_check_times_out_and_rolls_back(ctx: RecordingContext, root: Path) -> None:
    (root / "config" / "svc.conf").write_text("old\n")
    (root / "health.sleep").write_text("30")
    error = failure(ctx, path="svc.conf", content="new\n", health_timeout=0.3)
    assert error.code == "health_check_failed" and "timed out" in str(error)
    assert (root / "config" / "svc.conf").read_text() == "old\n"


def test_abort_during_the_health_check_rolls_back(ctx: RecordingContext, root: Path) -> None:
    (root / "config" / "svc.conf").write_text("old\n")
    (root / "health.sleep").write_text("30")

    def abort_when_checking() -> None:
        for _ in range(500):
            if "health" in calls(root):
                ctx.abort.set()
                return
            threading.Event().wait(0.01)

    watcher = threading.Thread(target=abort_when_checking)
    watcher.start()
    with pytest.raises(JobAborted):
        apply(ctx, path="svc.conf", content="new\n")
    watcher.join()
    assert (root / "config" / "svc.conf").read_text() == "old\n"
    assert calls(root)[-1].endswith("old ")  # reloaded on the old file despite the abort


def test_without_hooks_or_with_reload_hook_false(ctx: RecordingContext, root: Path) -> None:
    assert apply(ctx, path="a", content="1", reload_hook=False)["changed"] is True
    assert calls(root) == ["health"]
    for hook in (root / "hooks").iterdir():
        hook.unlink()
    assert apply(ctx, path="a", content="2")["changed"] is True
    assert (root / "config" / "a").read_text() == "2"


def test_an_interrupted_apply_is_undone_then_redone_with_its_checks(ctx: RecordingContext, root: Path) -> None:
    live = root / "config" / "svc.conf"
    live.write_text("old\n")
    # the agent died after writing the new file, before reload and health check
    journal = Journal(ctx, live)
    journal.begin(b"old\n", 0o644, sha(b"old\n"), sha(b"new\n"))
    live.write_text("new\n")
    out = apply(ctx, path="svc.conf", content="new\n")
    assert out == {"path": "svc.conf", "changed": True, "sha256": sha(b"new\n"), "previous_sha256": sha(b"old\n")}
    assert calls(root) == [f"reload {live} old ", f"reload {live} new ", "health"]
    assert not journal.record.exists() and not journal.backup.exists()


def test_an_interrupted_apply_of_a_bad_file_ends_on_the_old_one(ctx: RecordingContext, root: Path) -> None:
    live = root / "config" / "svc.conf"
    live.write_text("old\n")
    Journal(ctx, live).begin(b"old\n", 0o644, sha(b"old\n"), sha(b"broken\n"))
    live.write_text("broken\n")
    assert failure(ctx, path="svc.conf", content="broken\n").code == "health_check_failed"
    assert live.read_text() == "old\n"


@pytest.mark.parametrize(("params", "message"), [
    ({"path": "a"}, "exactly one of content and content_b64"),
    ({"path": "a", "content": "x", "content_b64": "eA=="}, "exactly one"),
    ({"path": "a", "content_b64": "not base64!"}, "not valid base64"),
    ({"path": "a", "content": "x", "mode": "rw-r--r--"}, "mode"),
    ({"path": "a", "content": "x", "mode": "0999"}, "mode"),
    ({"path": "a", "content": "é" * (200 * 1024)}, "bytes, more than"),
    ({"path": "a", "content": "x", "format": "yaml"}, "is not one of"),
    ({"path": "a", "content": "x", "validate_command": []}, "shorter than"),
])
def test_bad_params_are_refused_before_running(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidParams, match=message):
        registry.get("config.apply").validate(params)


def test_without_a_device_root_the_job_fails_clearly(ctx: RecordingContext) -> None:
    error = failure(ctx, path="a", content="x")
    assert error.code == "no_device_root" and error.retryable is False


def test_output_is_json(ctx: RecordingContext, root: Path) -> None:
    out = apply(ctx, path="a.json", content="[]", format="json")
    assert json.loads(json.dumps(out)) == out
    assert os.path.exists(root / "config" / "a.json")
