"""Which job types this install has, and the catalog the agent advertises.

Built-in job types register themselves with :func:`register` when their
module is imported; this module imports them on first use (job modules have
no side effects beyond that decorator, so the hub can read the catalog
without running anything). ``catalog()`` is what an agent advertises when it
connects and what the hub validates DAG parameters against.
"""

from __future__ import annotations

import copy
import re
from typing import Any, TypeVar

from firmware_jobs.base import Job, check_schema
from shared.errors import UnknownJobType

J = TypeVar("J", bound=type[Job])

#: Job type names: dotted lowercase words, e.g. ``firmware.update``.
NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")


class Registry:
    """A set of job types by name. The module-level functions use one
    default instance holding the built-ins; tests may build their own."""

    def __init__(self) -> None:
        self._jobs: dict[str, type[Job]] = {}

    def register(self, cls: J) -> J:
        """Class decorator: add ``cls`` under ``cls.name``. Refuses a bad
        name, a missing attribute, an unsupported schema or a name clash."""
        for attr in ("name", "version", "description", "params_schema"):
            if not hasattr(cls, attr):
                raise TypeError(f"job class {cls.__qualname__} lacks the class attribute {attr!r}")
        if not NAME_RE.match(cls.name):
            raise ValueError(f"job type name {cls.name!r} is invalid: use dotted lowercase words like 'firmware.update'")
        if cls.params_schema.get("type") != "object":
            raise ValueError(f"job type {cls.name!r}: params_schema must have type 'object'")
        check_schema(cls.params_schema)
        existing = self._jobs.get(cls.name)
        if existing is not None and existing is not cls:
            raise ValueError(f"job type {cls.name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        self._jobs[cls.name] = cls
        return cls

    def get(self, name: str) -> Job:
        """A fresh instance of the job type ``name``; raises ``UnknownJobType``
        listing what is installed."""
        cls = self._jobs.get(name)
        if cls is None:
            installed = ", ".join(self.names()) or "none"
            raise UnknownJobType(f"job type {name!r} is not installed on this agent; installed: {installed}")
        return cls()

    def names(self) -> list[str]:
        return sorted(self._jobs)

    def catalog(self) -> list[dict[str, Any]]:
        """Name, version, description, parameter schema and ``rerunnable``
        of every job type, sorted by name; the schemas are copies."""
        return [
            {
                "name": cls.name,
                "version": cls.version,
                "description": cls.description,
                "params_schema": copy.deepcopy(cls.params_schema),
                "rerunnable": cls.rerunnable,
            }
            for cls in (self._jobs[name] for name in self.names())
        ]


_default = Registry()
register = _default.register


def _load_builtins() -> None:
    # Imported here, not at the top: the job modules import ``register`` from
    # this module. After the first call these are dictionary lookups.
    from firmware_jobs import command, config_apply, data_collect, diagnostics, noop  # noqa: F401
    from firmware_jobs.ota import job as _ota  # noqa: F401


def get(name: str) -> Job:
    _load_builtins()
    return _default.get(name)


def names() -> list[str]:
    _load_builtins()
    return _default.names()


def catalog() -> list[dict[str, Any]]:
    _load_builtins()
    return _default.catalog()
