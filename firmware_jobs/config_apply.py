"""``config.apply``: replace one configuration file on the device, safely.

The file lives under the device root's ``config/`` folder (``path`` is
relative to it; ``..``, absolute paths and symlinks leading out are refused,
and so is a live file that is itself a symlink: replacing the link would
change what it means). The steps, each of which must pass before the next:

1. the candidate is checked *before the live file is touched*: it must parse
   as its ``format`` (``json``, ``toml``, ``ini``; ``text`` is not checked)
   and, when ``validate_command`` is given, that allow-listed program must
   exit 0 with the candidate's path appended (e.g. ``["nginx", "-t", "-c"]``);
2. the live file is backed up (with its mode) in the agent's state dir, next
   to a small journal naming the apply in progress;
3. the new file is written atomically (``shared.files.atomic_write``);
4. ``hooks/config-reload <file>`` runs, if the device has it and
   ``reload_hook`` is true; then ``hooks/health-check``, if present;
5. success drops the journal. A failed reload or health check (or an abort)
   restores the backup atomically (a file that did not exist is removed),
   runs the reload hook again so the application is back on the old file,
   and fails with ``reload_failed`` / ``health_check_failed``, the message
   saying ``rolled_back`` and how the rollback went.

Idempotent: when the live file already has this content (and mode), nothing
is written or reloaded and the output says ``changed: false``. If the agent
died mid-apply, the journal is found by the next apply of the same file,
which first restores the backup and reloads (the interrupted change was never
health-checked), then applies as usual; so re-running an interrupted
assignment does the whole apply once, checks included.

Errors are not retryable: a configuration that does not parse, validate,
reload or pass the health check will not do better on a second try.
"""

from __future__ import annotations

import base64
import binascii
import configparser
import fcntl
import hashlib
import json
import os
import re
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from firmware_jobs.base import Job, JobAborted, JobContext, JobError
from firmware_jobs.command import resolve_program
from firmware_jobs.devroot import DeviceRoot
from firmware_jobs.jobutil import confined, device_root, run_program
from firmware_jobs.registry import register
from shared.errors import InvalidParams
from shared.files import atomic_write

#: Largest configuration file this job writes, in bytes.
MAX_CONTENT = 256 * 1024
#: Largest live file it backs up (the backup is read into memory).
MAX_LIVE = 16 * 1024 * 1024
_MODE_RE = re.compile(r"^0?[0-7]{3}$")
_DEFAULT_MODE = 0o644
_LOCK_POLL = 0.05


@register
class ApplyConfig(Job):
    """Validate, back up, atomically write, reload and health-check one config file."""

    name = "config.apply"
    version = "1.0"
    description = "Atomically replace a configuration file under config/, validated first, rolled back if reload or health check fail."
    params_schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1, "maxLength": 512, "description": "File path relative to the device root's config/ folder."},
            "content": {"type": "string", "maxLength": MAX_CONTENT, "description": "The new content as text (UTF-8); or give content_b64."},
            "content_b64": {"type": "string", "maxLength": (MAX_CONTENT + 2) // 3 * 4, "description": "The new content, base64-encoded."},
            "format": {"type": "string", "enum": ["text", "json", "toml", "ini"], "default": "text", "description": "Syntax the content must parse as (text: no check)."},
            "mode": {"type": "string", "minLength": 3, "maxLength": 4, "description": "Octal permissions such as '0640'; default: the live file's, or 0644."},
            "validate_command": {
                "type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 64,
                "description": "Allow-listed program and arguments; must exit 0 with the candidate file's path appended.",
            },
            "validate_timeout": {"type": "number", "minimum": 0.1, "maximum": 600, "default": 30, "description": "Seconds the validate_command may take."},
            "reload_hook": {"type": "boolean", "default": True, "description": "Run hooks/config-reload after writing (and after a rollback)."},
            "health_timeout": {"type": "number", "minimum": 0.1, "maximum": 600, "default": 30, "description": "Seconds the reload and health-check hooks may each take."},
        },
        "required": ["path"],
        "additionalProperties": False,
    }

    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        result = super().validate(params)
        if ("content" in result) == ("content_b64" in result):
            raise InvalidParams("params: give exactly one of content and content_b64")
        size = len(content_bytes(result))
        if size > MAX_CONTENT:
            raise InvalidParams(f"params: the content is {size} bytes, more than the {MAX_CONTENT} allowed")
        if "mode" in result and not _MODE_RE.match(result["mode"]):
            raise InvalidParams(f"params.mode: {result['mode']!r} is not octal permissions like '0644'")
        return result

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        root = device_root(ctx)
        data = content_bytes(params)
        root.config_dir.mkdir(exist_ok=True)
        target = confined(root.config_dir, params["path"], "path")
        if target.is_symlink():
            raise JobError(f"config/{params['path']} is a symlink; config.apply replaces regular files only", code="invalid_path", retryable=False)
        if target.exists() and not target.is_file():
            raise JobError(f"config/{params['path']} exists and is not a regular file", code="invalid_path", retryable=False)
        for parent in target.relative_to(root.config_dir.resolve()).parents:
            folder = root.config_dir.resolve() / parent
            if folder.exists() and not folder.is_dir():
                raise JobError(f"config/{parent} is a file, not a folder", code="invalid_path", retryable=False)
        check_format(data, params["format"])
        new_sha = _sha(data)
        journal = Journal(ctx, target)
        with journal.locked(ctx):
            journal.recover(ctx, lambda: self._reload(ctx, root, target, params, abortable=False))
            live, live_mode = _read_live(target)
            mode = int(params["mode"], 8) if "mode" in params else (live_mode if live is not None else _DEFAULT_MODE)
            previous_sha = _sha(live) if live is not None else None
            output = {"path": params["path"], "changed": False, "sha256": new_sha, "previous_sha256": previous_sha}
            if live == data and live_mode == mode:
                ctx.log(f"config/{params['path']} already has this content (sha256 {new_sha}); nothing to do")
                return output
            if "validate_command" in params:
                self._run_validator(ctx, target, data, mode, params)
            ctx.progress(0.3, "validated")
            try:
                journal.begin(live, live_mode, previous_sha, new_sha)
            except OSError as exc:
                journal.finish()
                raise JobError(f"cannot back up {target} in {journal.folder}: {exc.strerror or exc}", code="write_failed", retryable=True) from exc
            try:
                self._write(target, data, mode)
                ctx.log(f"wrote config/{params['path']} (sha256 {new_sha}, was {previous_sha})")
                ctx.progress(0.5, "written")
                failure = self._reload(ctx, root, target, params)
                code = "reload_failed"
                if failure is None:
                    ctx.progress(0.7, "reloaded")
                    failure, code = self._health(ctx, root, target, params), "health_check_failed"
            except BaseException:
                journal.rollback(ctx, lambda: self._reload(ctx, root, target, params, abortable=False))
                raise
            if failure is not None:
                note = journal.rollback(ctx, lambda: self._reload(ctx, root, target, params, abortable=False))
                raise JobError(f"{failure}; {note}", code=code, retryable=False)
            journal.finish()
        output["changed"] = True
        return output

    def _write(self, target: Path, data: bytes, mode: int) -> None:
        try:
            atomic_write(target, data, mode)
        except OSError as exc:
            raise JobError(f"cannot write {target}: {exc.strerror or exc}", code="write_failed", retryable=True) from exc

    def _run_validator(self, ctx: JobContext, target: Path, data: bytes, mode: int, params: dict[str, Any]) -> None:
        argv: list[str] = params["validate_command"]
        program = resolve_program(argv[0], ctx.settings.get("command_allowlist") or ())
        folder = ctx.work_dir / "candidate"
        folder.mkdir(exist_ok=True)
        candidate = folder / target.name  # same name: validators often go by the extension
        atomic_write(candidate, data, mode)
        outcome = run_program(ctx, [program, *argv[1:], str(candidate)], params["validate_timeout"])
        ctx.log(f"validate_command {argv[0]!r} {outcome.describe()}")
        if not outcome.ok:
            raise JobError(f"validate_command {argv[0]!r} refused the new file ({outcome.describe()}); the live file was not touched",
                           code="validation_failed", retryable=False)

    def _reload(self, ctx: JobContext, root: DeviceRoot, target: Path, params: dict[str, Any], abortable: bool = True) -> str | None:
        """None when the application reloaded (or there is nothing to run), else
        why not. A reload that puts the old file back is not abortable: an abort
        is what may have caused the rollback."""
        hook = root.hook("config-reload")
        if not params["reload_hook"] or hook is None:
            ctx.log("no config-reload hook run" + ("" if params["reload_hook"] else " (reload_hook is false)"))
            return None
        outcome = run_program(ctx, [str(hook), str(target)], params["health_timeout"], env=_hook_env(root, target), cwd=root.path, abortable=abortable)
        ctx.log(f"hooks/config-reload {outcome.describe()}")
        return None if outcome.ok else f"hooks/config-reload {outcome.describe()}"

    def _health(self, ctx: JobContext, root: DeviceRoot, target: Path, params: dict[str, Any]) -> str | None:
        hook = root.hook("health-check")
        if hook is None:
            ctx.log("the device has no health-check hook; the reload is the last check")
            return None
        outcome = run_program(ctx, [str(hook)], params["health_timeout"], env=_hook_env(root, target), cwd=root.path)
        ctx.log(f"hooks/health-check {outcome.describe()}")
        return None if outcome.ok else f"hooks/health-check {outcome.describe()}"


class Journal:
    """The backup and the record of an apply in progress, in the agent's
    state dir (never in ``config/``, where an application reading every file
    of a folder would pick the backup up). One lock per target file keeps
    two applies of the same file from interleaving."""

    def __init__(self, ctx: JobContext, target: Path) -> None:
        state_dir = ctx.settings.get("state_dir")
        if not state_dir:
            raise JobError("this agent gives jobs no state_dir, where config.apply keeps its backups", code="no_state_dir", retryable=False)
        self.folder = Path(state_dir) / "config-apply"
        self.folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(str(target).encode()).hexdigest()[:32]
        self.record = self.folder / f"{key}.json"
        self.backup = self.folder / f"{key}.backup"
        self.lock_file = self.folder / f"{key}.lock"
        self.target = target

    def locked(self, ctx: JobContext) -> _Lock:
        return _Lock(self.lock_file, ctx)

    def begin(self, live: bytes | None, mode: int, previous_sha: str | None, new_sha: str) -> None:
        if live is not None:
            atomic_write(self.backup, live, 0o600)
        record = {"path": str(self.target), "existed": live is not None, "mode": mode, "previous_sha256": previous_sha, "new_sha256": new_sha}
        atomic_write(self.record, json.dumps(record).encode(), 0o600)

    def finish(self) -> None:
        self.record.unlink(missing_ok=True)  # first: a backup without a record is ignored
        self.backup.unlink(missing_ok=True)

    def rollback(self, ctx: JobContext, reload: Callable[[], str | None]) -> str:
        """Put the previous file back and reload; say how it went."""
        record = json.loads(self.record.read_text())
        if record["existed"]:
            previous = self.backup.read_bytes()
            if _sha(previous) != record["previous_sha256"]:
                return f"rolled_back failed: the backup in {self.backup} is damaged; the new file stays in place"
            atomic_write(self.target, previous, record["mode"])
            note = f"rolled_back: the previous file (sha256 {record['previous_sha256']}) was restored"
        else:
            self.target.unlink(missing_ok=True)
            note = "rolled_back: the new file was removed (there was none before)"
        failure = reload()
        note += "; reload after the rollback failed too: " + failure if failure else ""
        ctx.log(note)
        self.finish()
        return note

    def recover(self, ctx: JobContext, reload: Callable[[], str | None]) -> None:
        """Undo an apply that was interrupted before it was health-checked."""
        if not self.record.exists():
            return
        try:
            json.loads(self.record.read_text())
        except ValueError:
            self.finish()  # written atomically, so this was never a record of ours
            return
        ctx.log(f"an earlier apply of {self.target} was interrupted; restoring the file it replaced")
        self.rollback(ctx, reload)


class _Lock:
    def __init__(self, path: Path, ctx: JobContext) -> None:
        self.path, self.ctx = path, ctx
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if self.ctx.should_abort():
                    os.close(self.fd)
                    raise JobAborted("stopped while waiting for another apply of the same file") from None
                time.sleep(_LOCK_POLL)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # releases the lock


def content_bytes(params: dict[str, Any]) -> bytes:
    if "content_b64" in params:
        try:
            return base64.b64decode(params["content_b64"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidParams(f"params.content_b64: not valid base64 ({exc})") from exc
    try:
        return str(params["content"]).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParams(f"params.content: not encodable as UTF-8 ({exc.reason})") from exc


def check_format(data: bytes, fmt: str) -> None:
    """Raise ``invalid_config`` unless ``data`` parses as ``fmt``."""
    if fmt == "text":
        return
    try:
        text = data.decode("utf-8")
        if fmt == "json":
            json.loads(text)
        elif fmt == "toml":
            tomllib.loads(text)
        elif fmt == "ini":
            configparser.ConfigParser(interpolation=None).read_string(text)
    except (UnicodeDecodeError, ValueError, configparser.Error) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise JobError(f"the new content is not valid {fmt}: {message}; the live file was not touched", code="invalid_config", retryable=False) from exc


def _read_live(target: Path) -> tuple[bytes | None, int]:
    try:
        stat = target.stat()
    except FileNotFoundError:
        return None, _DEFAULT_MODE
    if stat.st_size > MAX_LIVE:
        raise JobError(f"the live file {target} is {stat.st_size} bytes, more than config.apply backs up ({MAX_LIVE})", code="invalid_path", retryable=False)
    return target.read_bytes(), stat.st_mode & 0o7777


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hook_env(root: DeviceRoot, target: Path) -> dict[str, str]:
    return {"OUTPOST_DEVICE_ROOT": str(root.path), "OUTPOST_CONFIG_PATH": str(target), "OUTPOST_JOB": "config.apply"}
