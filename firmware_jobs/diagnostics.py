"""``diagnostics.collect``: a snapshot of the device's health.

Reports disk usage of a path, memory, load averages, uptime, the agent's
version, hostname, Python version and platform. Reads ``/proc`` where it
exists; a value the platform does not provide is ``null`` rather than an
error, so the job works on any POSIX device. Idempotent: it only reads.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
from pathlib import Path
from typing import Any

from firmware_jobs.base import Job, JobContext, JobError
from firmware_jobs.registry import register

PROC = Path("/proc")


@register
class CollectDiagnostics(Job):
    """Return a JSON object of device health figures (bytes and seconds)."""

    name = "diagnostics.collect"
    version = "1.0"
    description = "Disk, memory, load, uptime, agent version, hostname, Python and platform of the device."
    params_schema = {
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1, "default": "/", "description": "Report disk usage of the filesystem holding this path."},
        },
        "additionalProperties": False,
    }

    def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
        return {
            "collected_at": ctx.clock.now(),
            "disk": disk_usage(params["path"]),
            "memory": memory(),
            "load": load_average(),
            "uptime_seconds": uptime(),
            "agent_version": ctx.settings.get("agent_version"),
            "hostname": socket.gethostname(),
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
        }


def disk_usage(path: str) -> dict[str, Any]:
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        raise JobError(f"cannot read disk usage of {path!r}: {exc.strerror or exc}", code="path_unavailable", retryable=False) from exc
    return {"path": path, "total_bytes": usage.total, "used_bytes": usage.used, "free_bytes": usage.free}


def memory() -> dict[str, int | None]:
    """Total and available bytes: ``/proc/meminfo`` when readable, else the
    total from ``sysconf`` and no figure for available memory."""
    fields = _meminfo()
    total = fields.get("MemTotal")
    available = fields.get("MemAvailable", fields.get("MemFree"))
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            total = None
    return {"total_bytes": total, "available_bytes": available}


def _meminfo() -> dict[str, int]:
    try:
        text = (PROC / "meminfo").read_text()
    except OSError:
        return {}
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields


def load_average() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def uptime() -> float | None:
    try:
        return float((PROC / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
