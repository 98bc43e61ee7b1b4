"""Operator actions: the writes both the REST API and the dashboard perform.

They live here, below ``hub.api`` and ``hub.web`` (siblings that must not
import each other), so the rule "commit first, then emit the event" is
written once. Each function runs its own transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from hub import events as ev
from hub.db import transaction
from hub.errors import DagNotFound
from hub.models import Dag
from hub.scheduler import trigger_run
from shared.clock import Clock, utcnow


def trigger(sessions: sessionmaker[Session], bus: ev.EventBus, clock: Clock, dag_id: str, conf: dict[str, Any]) -> int:
    """Create a manual run of ``dag_id`` and return its ``run_pk``.

    The run and its task instances are committed before ``RUN_TRIGGERED``
    is emitted, so the scheduler it wakes always finds them. Raises
    ``DagNotFound`` or ``InvalidRequest`` (from the scheduler)."""
    with transaction(sessions) as session:
        run_pk = trigger_run(session, dag_id, conf, utcnow(clock), run_type="manual").id
    bus.emit(ev.RUN_TRIGGERED, dag_id=dag_id, run_pk=run_pk)
    return run_pk


def set_paused(sessions: sessionmaker[Session], dag_id: str, is_paused: bool) -> None:
    """Pause or unpause a DAG: the scheduler creates no scheduled runs of a
    paused DAG. It reads the flag on its next tick, so no event is needed."""
    with transaction(sessions) as session:
        dag = session.get(Dag, dag_id)
        if dag is None:
            raise DagNotFound(f"DAG {dag_id!r} not found; list DAGs with GET /api/v1/dags")
        dag.is_paused = is_paused
