"""The device registry's filter: which agents a list of the fleet shows.

The label, group, hardware and firmware part is a
:class:`hub.targeting.Selector`, the same one rollouts select devices with,
so a filtered list shows exactly the devices a rollout with that selector
would include. Online state, job type and a text search come on top.

The query is narrowed in SQL where that is portable (scope, online state,
hardware model, simple label keys, the text search), then every condition
is checked in Python over a few light columns, and only the page's rows are
loaded whole. With no group, firmware or job type condition the SQL answer
is already exact and is paged in SQL.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from hub.errors import InvalidRequest
from hub.models import Agent
from hub.targeting import AgentView, Selector, VersionSpec

#: Label keys simple enough to put in a JSON path on every backend; others are matched in Python only.
_SQL_LABEL_KEY = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
#: Longest text search and filter value accepted (longer ones cannot match anything stored).
MAX_FILTER_CHARS = 200


@dataclass(frozen=True)
class AgentFilter:
    selector: Selector = field(default_factory=Selector)
    #: True: only online agents; False: only offline ones; None: both.
    online: bool | None = None
    #: Only agents that advertise this job type.
    job_type: str | None = None
    #: Substring of the agent id or the hostname (case-insensitive).
    text: str | None = None

    @classmethod
    def parse(
        cls, *, labels: Iterable[str] = (), groups: Iterable[str] = (), hardware: Iterable[str] = (), firmware: str | None = None,
        online: bool | None = None, job_type: str | None = None, text: str | None = None,
    ) -> AgentFilter:
        """From query parameters (``labels`` as ``key=value``); raises
        ``InvalidRequest`` with a message that says what to fix."""
        pairs: dict[str, str] = {}
        for pair in labels:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise InvalidRequest(f"label filter {pair!r} is not key=value, e.g. label=site=berlin")
            pairs[key] = value
        spec = None
        if firmware:
            try:
                spec = VersionSpec.parse(firmware)
            except ValueError as exc:
                raise InvalidRequest(f"firmware filter {firmware[:MAX_FILTER_CHARS]!r}: {exc}") from None
        for name, values in (("group", groups), ("hardware", hardware), ("job_type", [job_type or ""]), ("q", [text or ""])):
            if any(len(v) > MAX_FILTER_CHARS for v in values):
                raise InvalidRequest(f"{name} filter longer than {MAX_FILTER_CHARS} characters")
        selector = Selector(pairs, frozenset(g for g in groups if g), frozenset(h for h in hardware if h), spec)
        return cls(selector, online, job_type or None, text or None)

    @property
    def exact_in_sql(self) -> bool:
        """True when the SQL narrowing alone answers the filter."""
        sel = self.selector
        return not sel.groups and sel.firmware is None and self.job_type is None and all(_SQL_LABEL_KEY.match(k) for k in sel.labels)

    def matches(self, agent_id: str, state: str, labels: Any, groups: Any, hardware: str, firmware: str, job_types: Any) -> bool:
        """Every condition but the text search, which SQL answers exactly (see :func:`find`)."""
        if self.online is not None and (state == "online") != self.online:
            return False
        view = AgentView(
            agent_id, state == "online", labels=labels if isinstance(labels, dict) else {}, groups=frozenset(g for g in groups or () if isinstance(g, str)),
            hardware_model=hardware or "", firmware_version=firmware or "",
        )
        if not self.selector.selects(view):
            return False
        return self.job_type is None or self.job_type in {j.get("name") for j in job_types or () if isinstance(j, dict)}


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _conditions(flt: AgentFilter, agent_ids: Collection[str] | None) -> list[Any]:
    conds: list[Any] = []
    if agent_ids is not None:
        conds.append(Agent.agent_id.in_(sorted(agent_ids)))
    if flt.online is not None:
        conds.append(Agent.state == "online" if flt.online else Agent.state != "online")
    if flt.selector.hardware:
        conds.append(Agent.hardware_model.in_(sorted(flt.selector.hardware)))
    for key, value in flt.selector.labels.items():
        if _SQL_LABEL_KEY.match(key):
            conds.append(Agent.labels[key].as_string() == value)
    if flt.text is not None:
        pattern = _like(flt.text.lower())
        conds.append(or_(Agent.agent_id.ilike(pattern, escape="\\"), Agent.hostname.ilike(pattern, escape="\\")))
    return conds


def find(session: Session, flt: AgentFilter, *, agent_ids: Collection[str] | None = None, limit: int = 100, offset: int = 0) -> tuple[list[Agent], int]:
    """The page of agents (by id) that ``flt`` selects among ``agent_ids``
    (a user's scope; None: all), and how many it selects in all."""
    conds = _conditions(flt, agent_ids)
    if flt.exact_in_sql:
        stmt = select(Agent).where(*conds)
        total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
        return list(session.scalars(stmt.order_by(Agent.agent_id).limit(limit).offset(offset))), total
    light = select(Agent.agent_id, Agent.state, Agent.labels, Agent.groups, Agent.hardware_model, Agent.firmware_version, Agent.job_types)
    ids = [row[0] for row in session.execute(light.where(*conds).order_by(Agent.agent_id)) if flt.matches(*row)]
    page = ids[offset:offset + limit]
    rows = list(session.scalars(select(Agent).where(Agent.agent_id.in_(page)).order_by(Agent.agent_id))) if page else []
    return rows, len(ids)


#: The dashboard's filter form fields: the API's query parameters, one value each
#: (``label``, ``group`` and ``hardware`` may repeat in a URL).
FORM_FIELDS = ("label", "group", "hardware", "firmware", "online", "job_type", "q")


def from_form(params: Any) -> tuple[AgentFilter, dict[str, str]]:
    """The filter from a dashboard query string (a multi-dict with
    ``getlist``), and the values to show back in the form. Raises
    ``InvalidRequest`` as :meth:`AgentFilter.parse` does."""
    def many(name: str) -> list[str]:
        # One form input may hold several values, comma-separated.
        return [part.strip() for value in params.getlist(name) for part in value.split(",") if part.strip()]

    shown = {name: ", ".join(params.getlist(name))[:MAX_FILTER_CHARS] for name in FORM_FIELDS if any(params.getlist(name))}
    online_text = (params.get("online") or "").lower()
    if online_text not in ("", "true", "false"):
        raise InvalidRequest(f"online must be true or false, got {online_text[:20]!r}")
    flt = AgentFilter.parse(
        labels=many("label"), groups=many("group"), hardware=many("hardware"), firmware=(params.get("firmware") or "").strip() or None,
        online=None if not online_text else online_text == "true", job_type=(params.get("job_type") or "").strip() or None,
        text=(params.get("q") or "").strip() or None,
    )
    return flt, shown
