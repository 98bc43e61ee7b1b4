"""Assets, in Airflow 3's words: the data a task produces, and the
condition on which an event-driven DAG runs.

A task declares what it updates with ``outlets=[Asset("s3://bucket/x")]``;
a DAG scheduled with ``schedule=[Asset("s3://bucket/x"), Asset("s3://b/y")]``
runs once every one of those assets was updated since its last
asset-triggered run. ``Asset(a) | Asset(b)`` and ``Asset(a) & Asset(b)``
build any-of and all-of conditions (``AssetAny``, ``AssetAll``). ``Dataset``
is Airflow 2's name for the same thing.

``AgentEvent("battery_low")`` is an asset too, with the URI
``agent-event://battery_low``: a device that reports that event (a job's
``ctx.emit_event``, or ``outpost-agent emit``) updates it, so a DAG scheduled
on it runs when a device reports the condition.

This module is pure (no database): the DAG file, the DAG processor and the
scheduler all use it. Recording events is ``hub.asset_events``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

from hub.errors import InvalidDag
from shared.messages import AGENT_EVENT_NAME_RE

AGENT_EVENT_SCHEME = "agent-event"
#: Printable ASCII without spaces: URIs are keys, shown in logs and URLs.
_URI_RE = re.compile(r"^[!-~]{1,1000}$")


def check_uri(uri: Any) -> str:
    """The URI if it is a valid asset URI; raises ``InvalidDag`` naming the problem."""
    if not isinstance(uri, str) or not _URI_RE.fullmatch(uri):
        raise InvalidDag(f"asset URI {uri!r} is invalid: use 1-1000 printable ASCII characters without spaces, e.g. 's3://bucket/key'")
    scheme = uri.partition("://")[0] if "://" in uri else ""
    if scheme.lower() == "airflow":
        raise InvalidDag(f"asset URI {uri!r}: the 'airflow' scheme is reserved")
    if scheme == AGENT_EVENT_SCHEME and not AGENT_EVENT_NAME_RE.fullmatch(uri.partition("://")[2]):
        raise InvalidDag(f"asset URI {uri!r}: an agent event name is 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return uri


class BaseAsset:
    """Something a schedule can wait for: one asset or a condition on several."""

    def __and__(self, other: BaseAsset) -> AssetAll:
        if not isinstance(other, BaseAsset):
            return NotImplemented
        return AssetAll(self, other)

    def __or__(self, other: BaseAsset) -> AssetAny:
        if not isinstance(other, BaseAsset):
            return NotImplemented
        return AssetAny(self, other)

    def evaluate(self, updated: set[str]) -> bool:
        """True when the condition holds given the URIs updated since the last run."""
        raise NotImplementedError

    def iter_uris(self) -> Iterator[str]:
        raise NotImplementedError

    def serialize(self) -> dict[str, Any]:
        raise NotImplementedError


class Asset(BaseAsset):
    """An asset, known by its URI. Like Airflow 3, ``Asset("s3://b/k")``
    uses the one argument as both name and URI."""

    def __init__(self, name: str | None = None, uri: str | None = None, *, group: str = "asset", extra: dict[str, Any] | None = None) -> None:
        if name is None and uri is None:
            raise InvalidDag("Asset() needs a name or a uri")
        self.uri = check_uri(uri if uri is not None else name)
        self.name = name if name is not None else self.uri
        self.group = group
        self.extra = dict(extra or {})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Asset) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"

    def evaluate(self, updated: set[str]) -> bool:
        return self.uri in updated

    def iter_uris(self) -> Iterator[str]:
        yield self.uri

    def serialize(self) -> dict[str, Any]:
        return {"asset": self.uri}


#: Airflow 2's name.
Dataset = Asset


class AgentEvent(Asset):
    """The asset a device's event updates: ``AgentEvent("battery_low")`` is
    ``Asset("agent-event://battery_low")``."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not AGENT_EVENT_NAME_RE.fullmatch(name):
            raise InvalidDag(f"agent event name {name!r} is invalid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        super().__init__(uri=agent_event_uri(name))
        self.name = name


def agent_event_uri(name: str) -> str:
    return f"{AGENT_EVENT_SCHEME}://{name}"


class _Condition(BaseAsset):
    kind = ""

    def __init__(self, *objects: BaseAsset) -> None:
        if not objects:
            raise InvalidDag(f"{type(self).__name__}() needs at least one asset")
        for obj in objects:
            if not isinstance(obj, BaseAsset):
                raise InvalidDag(f"{type(self).__name__}: {obj!r} is not an Asset")
        self.objects = tuple(objects)

    def iter_uris(self) -> Iterator[str]:
        for obj in self.objects:
            yield from obj.iter_uris()

    def serialize(self) -> dict[str, Any]:
        return {self.kind: [obj.serialize() for obj in self.objects]}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.objects))})"


class AssetAll(_Condition):
    """Every one of the assets (Airflow's default for a list)."""

    kind = "all"

    def evaluate(self, updated: set[str]) -> bool:
        return all(obj.evaluate(updated) for obj in self.objects)


class AssetAny(_Condition):
    """Any one of the assets."""

    kind = "any"

    def evaluate(self, updated: set[str]) -> bool:
        return any(obj.evaluate(updated) for obj in self.objects)


def condition_of(schedule: BaseAsset | Iterable[BaseAsset]) -> BaseAsset:
    """A schedule given as assets (one, a list, or a condition) as one condition."""
    if isinstance(schedule, BaseAsset):
        return schedule
    items = list(schedule)
    if not items:
        raise InvalidDag("an asset schedule needs at least one asset")
    return AssetAll(*items)


def from_dict(data: dict[str, Any]) -> BaseAsset:
    """The inverse of ``serialize``: a condition from its stored form."""
    if "asset" in data:
        return Asset(uri=data["asset"])
    if "all" in data:
        return AssetAll(*(from_dict(d) for d in data["all"]))
    if "any" in data:
        return AssetAny(*(from_dict(d) for d in data["any"]))
    raise InvalidDag(f"not a serialized asset condition: {data!r}")


def outlet_uris(outlets: Iterable[Any]) -> list[str]:
    """The URIs of a task's ``outlets`` (assets only; anything else is an error)."""
    uris: list[str] = []
    for outlet in outlets:
        if isinstance(outlet, Asset):
            uris.append(outlet.uri)
        elif isinstance(outlet, BaseAsset):
            raise InvalidDag(f"outlet {outlet!r}: a task updates assets, not a condition; list the assets")
        else:
            raise InvalidDag(f"outlet {outlet!r} is not an Asset")
    return sorted(set(uris))
