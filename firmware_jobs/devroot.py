"""The device root: the one folder through which jobs touch "the device".

Everything a job changes on the device (firmware slots, configuration files)
and everything the agent reports about it (hardware model, firmware version)
lives under one folder, so the same code runs on a real device (root ``/``
or ``/var/lib/outpost/device``, with hook programs that call the real
bootloader) and in tests and the fleet simulator (a temporary folder per
simulated device). The layout::

    <root>/device.json          {"hardware_model": "...", "serial": "..."}  (optional)
    <root>/ota/state.json       A/B slot state, written only by firmware.update
    <root>/ota/slots/a/, b/     the two firmware slots (image + metadata)
    <root>/ota/downloads/       partial downloads, resumed across restarts
    <root>/hooks/<name>         optional executables a real device provides:
                                switch-slot, reboot, health-check, config-reload
    <root>/config/              files config.apply manages
    <root>/data/                sensor samples data.collect reads

``ota/state.json`` (see firmware_jobs/ota/slots.py for the full contract)
holds at least ``{"active": "a", "slots": {"a": {"version": "1.0.0", ...},
"b": null}}``; :meth:`DeviceRoot.firmware_version` reads the active slot's
version from it, which is what the agent reports in its inventory.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

#: A device that has never been updated reports this.
UNKNOWN_VERSION = "0.0.0"


class DeviceRoot:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def ota_dir(self) -> Path:
        return self.path / "ota"

    @property
    def ota_state_file(self) -> Path:
        return self.ota_dir / "state.json"

    @property
    def slots_dir(self) -> Path:
        return self.ota_dir / "slots"

    @property
    def downloads_dir(self) -> Path:
        return self.ota_dir / "downloads"

    @property
    def hooks_dir(self) -> Path:
        return self.path / "hooks"

    @property
    def config_dir(self) -> Path:
        return self.path / "config"

    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    def hook(self, name: str) -> Path | None:
        """The executable hook ``name`` if the device provides one."""
        path = self.hooks_dir / name
        return path if path.is_file() and os.access(path, os.X_OK) else None

    def identity(self) -> dict[str, Any]:
        try:
            data = json.loads((self.path / "device.json").read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def hardware_model(self) -> str:
        model = self.identity().get("hardware_model")
        return model if isinstance(model, str) and model else platform.machine() or "unknown"

    def ota_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.ota_state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def firmware_version(self) -> str:
        state = self.ota_state()
        slot = (state.get("slots") or {}).get(state.get("active") or "")
        version = slot.get("version") if isinstance(slot, dict) else None
        if isinstance(version, str) and version:
            return version
        baseline = self.identity().get("firmware_version")
        return baseline if isinstance(baseline, str) and baseline else UNKNOWN_VERSION

    def disk_free(self) -> int:
        """Free bytes on the file system holding the root (0 if it is missing)."""
        try:
            return shutil.disk_usage(self.path if self.path.exists() else self.path.parent).free
        except OSError:
            return 0
