"""What the agent reports about its device: the inventory.

Sent in every heartbeat and in the retained ``online`` status
(:data:`shared.messages.INVENTORY_KEYS`); the hub keeps it in its device
registry, where operators filter by it and rollouts select by it. The
hardware model and firmware version come from the device root
(:class:`firmware_jobs.devroot.DeviceRoot`), so an OTA update that switches
slots shows in the next heartbeat. Collecting it reads two small JSON files,
one ``statvfs`` and ``/proc/meminfo``: cheap enough for every heartbeat. The
job types are fixed for the life of the process and read once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from firmware_jobs.devroot import DeviceRoot

log = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")

#: The parts of the inventory that change only with the device's software
#: (not from one heartbeat to the next): when one does, the retained
#: ``online`` status is republished so a hub that subscribes later sees it.
STABLE_KEYS = ("hardware_model", "firmware_version", "agent_version", "job_types")


def memory(meminfo: Path = MEMINFO) -> tuple[int, int]:
    """(free, total) bytes of memory, from ``/proc/meminfo``; free is
    ``MemAvailable`` (what a new process can get without swapping), or
    ``MemFree`` on old kernels. (0, 0) when the file is missing or odd:
    not every device is Linux."""
    values: dict[str, int] = {}
    try:
        with meminfo.open("rb") as f:
            for raw in f:
                name, _, rest = raw.decode("ascii", "replace").partition(":")
                fields = rest.split()
                if name in ("MemTotal", "MemFree", "MemAvailable") and fields and fields[0].isdigit():
                    scale = 1024 if len(fields) > 1 and fields[1].lower() == "kb" else 1
                    values[name] = int(fields[0]) * scale
    except OSError:
        return 0, 0
    return values.get("MemAvailable", values.get("MemFree", 0)), values.get("MemTotal", 0)


class Inventory:
    """Collects the inventory of one device (see the module docstring)."""

    def __init__(self, device_root: Path, agent_version: str, job_types: Iterable[Mapping[str, Any]], meminfo: Path = MEMINFO) -> None:
        self.root = DeviceRoot(device_root)
        self.agent_version = agent_version
        self.job_types = {str(entry["name"]): str(entry["version"]) for entry in job_types}
        self.meminfo = meminfo

    def collect(self) -> dict[str, Any]:
        """The inventory now. Never raises: a part that cannot be read is
        reported as unknown ("" or 0), so a broken device.json or a vanished
        device root cannot stop heartbeats."""
        try:
            hardware, firmware = self.root.hardware_model(), self.root.firmware_version()
        except Exception:  # a device root that is not what it should be must not stop heartbeats
            log.exception("reading the device root %s failed", self.root.path)
            hardware, firmware = "", ""
        mem_free, mem_total = memory(self.meminfo)
        return {
            "hardware_model": hardware,
            "firmware_version": firmware,
            "agent_version": self.agent_version,
            "job_types": dict(self.job_types),
            "disk_free_bytes": self.root.disk_free(),
            "mem_free_bytes": mem_free,
            "mem_total_bytes": mem_total,
        }


def stable_part(inventory: Mapping[str, Any]) -> tuple[Any, ...]:
    """The values of :data:`STABLE_KEYS`, comparable between two inventories."""
    return tuple(repr(inventory.get(key)) for key in STABLE_KEYS)
