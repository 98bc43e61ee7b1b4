"""Turn ready agent task instances into assignments and outbox rows.

Everything happens in the caller's transaction (the transactional outbox):
the task instance's new state, the assignment row and the message to send
commit together or not at all. Nothing here talks to MQTT.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from hub.models import Agent, Assignment, OutboxMessage, TaskInstance
from hub.targeting import AgentView
from shared.envelope import Envelope, encode
from shared.hlc import HybridClock
from shared.messages import Assign
from shared.states import TaskState
from shared.topics import assign_topic

#: Assignment states in which the agent may still be working on it.
OPEN_ASSIGNMENT_STATES = ("pending", "sent", "accepted", "started")


@dataclass
class Dispatcher:
    hlc: HybridClock
    max_message_bytes: int

    def fleet_snapshot(self, session: Session) -> list[AgentView]:
        load = dict(
            session.execute(
                select(Assignment.agent_id, func.count()).where(Assignment.state.in_(OPEN_ASSIGNMENT_STATES)).group_by(Assignment.agent_id)
            ).all()
        )
        return [
            AgentView(
                agent_id=a.agent_id,
                online=a.state == "online",
                labels=dict(a.labels or {}),
                job_types=frozenset(j["name"] for j in a.job_types or [] if isinstance(j, dict) and "name" in j),
                load=load.get(a.agent_id, 0),
                accepting=(a.last_heartbeat or {}).get("accepting", True) is not False,
                revoked=a.revoked_at is not None,
                groups=frozenset(g for g in a.groups or [] if isinstance(g, str)),
                hardware_model=a.hardware_model or "",
                firmware_version=a.firmware_version or "",
            )
            for a in session.scalars(select(Agent))
        ]

    def assign(
        self, session: Session, ti: TaskInstance, agent_id: str, now: datetime, timeout: float | None = None,
        not_before: datetime | None = None, deadline: datetime | None = None,
    ) -> Assignment:
        """Queue the next try of ``ti`` on ``agent_id``: new try number,
        assignment row, outbox row, state ``queued``. ``not_before`` and
        ``deadline`` (scheduled ahead) travel in the Assign message."""
        ti.try_number += 1
        ti.agent_id = agent_id
        ti.state = TaskState.QUEUED
        ti.queued_at = now
        ti.started_at = None
        ti.ended_at = None
        ti.error = None
        assignment = Assignment(
            id=uuid.uuid4().hex,
            ti_id=ti.id,
            try_number=ti.try_number,
            agent_id=agent_id,
            state="pending",
            created_at=now,
            send_count=0,
            not_before=not_before,
            deadline=deadline,
        )
        session.add(assignment)
        session.add(self.outbox_row(ti, assignment, now, timeout))
        return assignment

    def outbox_row(self, ti: TaskInstance, assignment: Assignment, now: datetime, timeout: float | None = None) -> OutboxMessage:
        """The assign message for ``assignment``. The body is the same on every
        redelivery (the agent's inbox compares it under the assignment id);
        only the envelope (id, HLC) is new."""
        body = Assign(
            assignment_id=assignment.id,
            dag_id=ti.dag_id,
            run_id=ti.run_id,
            task_id=ti.task_id,
            try_number=assignment.try_number,
            job_type=ti.job_type or "",
            # Rendered params when the scheduler rendered them apart (a mapped instance's templates).
            params=dict((ti.rendered_fields or {}).get("params", ti.params) or {}),
            map_index=ti.map_index,
            timeout=timeout,
            not_before=assignment.not_before.timestamp() if assignment.not_before is not None else None,
            deadline=assignment.deadline.timestamp() if assignment.deadline is not None else None,
        )
        payload = encode(Envelope(body, sender="hub", hlc=self.hlc.now()), self.max_message_bytes)
        return OutboxMessage(
            topic=assign_topic(assignment.agent_id),
            payload=payload,
            qos=1,
            retain=False,
            assignment_id=assignment.id,
            created_at=now,
            attempts=0,
        )
