"""A/B firmware slots on a device root and the state that says which one runs.

``<root>/ota/state.json`` (written only here, always with
``shared.files.atomic_write``, so a crash leaves the old or the new state)::

    {"active": "a",                      # the slot the device runs (or boots next)
     "slots": {"a": {<slot metadata>}, "b": null},
     "rollback_floor": 3,                # highest committed security_version
     "pending": null | {"artifact_id", "slot", "previous", "assignment_id",
                        "since", "phase": "switching" | "trial" | "rolling_back"},
     "last_failure": null | {"artifact_id", "assignment_id", "code", "message"}}

Slot metadata (also ``ota/slots/<slot>/meta.json``): ``artifact_id``,
``name``, ``version``, ``sha256``, ``size``, ``security_version``,
``installed_at``. A slot's ``meta.json`` is written last, after its image is
complete and synced, and removed first before the image is overwritten: a
slot with metadata always holds a complete image. ``active`` only ever names
a slot whose image is complete and verified (or the factory slot of a device
never updated, which has metadata without an image file).

``pending`` is the trial boot: ``active`` already names the new slot, the
previous one is kept untouched until the health check commits (``pending``
cleared, ``rollback_floor`` raised) or fails (``active`` back to
``previous``). Every transition is one atomic write of this file, so the
device is always wholly on the old or wholly on the new image.

Device hooks (``<root>/hooks/<name>``, optional, see docs/fleet.md):
``switch-slot <slot> trial|rollback``, ``reboot``, ``health-check <slot>
<version>`` and ``commit-slot <slot>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from firmware_jobs.base import JobAborted, JobError
from firmware_jobs.devroot import DeviceRoot
from shared.files import atomic_write
from shared.release import Manifest

SLOTS = ("a", "b")
IMAGE = "image"
META = "meta.json"
_CHUNK = 1024 * 1024
#: Longest output of a hook kept for logs and error details.
_HOOK_OUTPUT = 2000


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def slot_dir(root: DeviceRoot, slot: str) -> Path:
    return root.slots_dir / slot


def image_path(root: DeviceRoot, slot: str) -> Path:
    return slot_dir(root, slot) / IMAGE


def load_state(root: DeviceRoot) -> dict[str, Any]:
    """The slot state; for a device never updated, slot ``a`` running the
    factory image (version from device.json). ``JobError`` ``bad_ota_state``
    for a file that is not a slot state (a device must not guess which slot runs)."""
    if not root.ota_state_file.exists():
        return {"active": "a", "slots": {"a": {"version": root.firmware_version(), "factory": True}, "b": None},
                "rollback_floor": 0, "pending": None, "last_failure": None}
    state = root.ota_state()
    slots = state.get("slots")
    if state.get("active") not in SLOTS or not isinstance(slots, dict) or not isinstance(slots.get(state["active"]), dict):
        raise JobError(f"{root.ota_state_file} is not a valid slot state; fix it by hand", "bad_ota_state", retryable=False)
    floor = state.get("rollback_floor", 0)
    state["rollback_floor"] = floor if isinstance(floor, int) and not isinstance(floor, bool) and floor >= 0 else 0
    state["slots"] = {s: slots.get(s) if isinstance(slots.get(s), dict) else None for s in SLOTS}
    pending = state.get("pending")
    state["pending"] = pending if isinstance(pending, dict) and pending.get("previous") in SLOTS and pending.get("slot") in SLOTS else None
    state.setdefault("last_failure", None)
    return state


def save_state(root: DeviceRoot, state: Mapping[str, Any]) -> None:
    atomic_write(root.ota_state_file, json.dumps(state, indent=2, sort_keys=True).encode() + b"\n")


def read_meta(root: DeviceRoot, slot: str) -> dict[str, Any] | None:
    try:
        meta = json.loads((slot_dir(root, slot) / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def sha256_file(path: Path, should_abort: Callable[[], bool] = lambda: False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            if should_abort():
                raise JobAborted()
            digest.update(chunk)
    return digest.hexdigest()


def slot_holds(root: DeviceRoot, slot: str, sha256: str) -> bool:
    """True when ``slot`` holds a complete image with this hash (re-read from disk)."""
    meta = read_meta(root, slot)
    if meta is None or meta.get("sha256") != sha256:
        return False
    try:
        return sha256_file(image_path(root, slot)) == sha256
    except OSError:
        return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def install(root: DeviceRoot, slot: str, source: Path, manifest: Manifest, now: float,
            checkpoint: Callable[[str], None] = lambda step: None) -> dict[str, Any]:
    """Copy the verified image ``source`` into ``slot`` and return its
    metadata; a slot already holding this image is left alone (re-runs)."""
    if slot_holds(root, slot, manifest.sha256):
        meta = read_meta(root, slot)
        assert meta is not None
        return meta
    directory = slot_dir(root, slot)
    directory.mkdir(parents=True, exist_ok=True)
    # Metadata goes first: from here on the slot holds no usable image.
    (directory / META).unlink(missing_ok=True)
    _fsync_dir(directory)
    tmp = directory / f".{IMAGE}.tmp"
    with open(source, "rb") as src, open(tmp, "wb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.replace(tmp, directory / IMAGE)
    _fsync_dir(directory)
    checkpoint("installing")
    if sha256_file(directory / IMAGE) != manifest.sha256:
        raise JobError(f"slot {slot}: the image read back does not match its hash (storage fault?)", "install_failed", retryable=True)
    meta = {
        "artifact_id": manifest.artifact_id, "name": manifest.name, "version": manifest.version,
        "sha256": manifest.sha256, "size": manifest.size, "security_version": manifest.security_version,
        "installed_at": now,
    }
    atomic_write(directory / META, json.dumps(meta, indent=2, sort_keys=True).encode() + b"\n")
    return meta


def run_hook(root: DeviceRoot, name: str, args: list[str], timeout: float, env: Mapping[str, str] | None = None) -> tuple[int, str] | None:
    """Run the device's hook ``name``; (exit status, output tail), status
    124 when it timed out, or None when the device has no such hook."""
    hook = root.hook(name)
    if hook is None:
        return None
    full_env = {**os.environ, "OUTPOST_DEVICE_ROOT": str(root.path), **(env or {})}
    # Output to a file, not a pipe: a hook's background child holding a pipe
    # open would block the wait after a timeout kill.
    with tempfile.TemporaryFile() as out:
        try:
            status = subprocess.run([str(hook), *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=full_env, timeout=max(timeout, 0.1), check=False).returncode
        except subprocess.TimeoutExpired:
            status = 124
        except OSError as exc:
            return 126, f"cannot run {hook}: {exc}"
        out.seek(0)
        text = out.read().decode("utf-8", "replace")[-_HOOK_OUTPUT:]
    return status, text.strip()


def call_hook(root: DeviceRoot, name: str, args: list[str], timeout: float, log: Callable[[str], None]) -> None:
    """Run hook ``name`` if present; ``JobError`` ``hook_failed`` when it fails."""
    outcome = run_hook(root, name, args, timeout)
    if outcome is None:
        return
    status, text = outcome
    log(f"hook {name} {' '.join(args)}: exit {status}" + (f": {text}" if text else ""))
    if status != 0:
        raise JobError(f"hook {name} {' '.join(args)} failed with exit status {status}: {text[-500:]}", "hook_failed", retryable=True)


# --- transitions: each is one atomic write of state.json ---------------------


def begin_switch(root: DeviceRoot, state: dict[str, Any], slot: str, meta: dict[str, Any], assignment_id: str, now: float) -> None:
    """Make ``slot`` (complete and verified) the active one, on trial."""
    previous = state["active"]
    state["slots"][slot] = meta
    state["pending"] = {"artifact_id": meta["artifact_id"], "slot": slot, "previous": previous,
                        "assignment_id": assignment_id, "since": now, "phase": "switching"}
    state["active"] = slot
    save_state(root, state)


def set_phase(root: DeviceRoot, state: dict[str, Any], phase: str) -> None:
    state["pending"]["phase"] = phase
    save_state(root, state)


def commit(root: DeviceRoot, state: dict[str, Any], now: float) -> None:
    """End the trial: the active slot stays, the anti-rollback floor rises."""
    meta = state["slots"][state["active"]]
    state["rollback_floor"] = max(state["rollback_floor"], int(meta.get("security_version", 0)))
    meta["committed_at"] = now
    state["pending"] = None
    state["last_failure"] = None
    save_state(root, state)


def roll_back(root: DeviceRoot, state: dict[str, Any], code: str, message: str) -> None:
    """End the trial the other way: back to the previous slot (untouched
    since the switch), remembering why for a re-run of the same assignment."""
    pending = state["pending"]
    state["active"] = pending["previous"]
    state["pending"] = None
    state["last_failure"] = {"artifact_id": pending["artifact_id"], "assignment_id": pending["assignment_id"], "code": code, "message": message}
    save_state(root, state)


def clear_slot(root: DeviceRoot, state: dict[str, Any], slot: str) -> None:
    """Forget the inactive ``slot`` before it is overwritten."""
    if state["slots"].get(slot) is not None:
        state["slots"][slot] = None
        save_state(root, state)


class UpdateLock:
    """One ``firmware.update`` at a time per device root (``ota/lock``,
    released by the kernel when the process dies, so a killed job never
    leaves it held)."""

    def __init__(self, root: DeviceRoot) -> None:
        self.path = root.ota_dir / "lock"
        self._fd: int | None = None

    def __enter__(self) -> UpdateLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JobError("another firmware.update is running on this device", "update_in_progress", retryable=True) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
