"""A user's scope: DAG tags and device groups.

A user with ``scope_tags`` sees only DAGs carrying one of those tags, and
the runs, task instances and conflicts of those DAGs. A user with
``scope_groups`` sees only agents whose label ``group`` is one of those
groups. Objects outside the scope do not exist for them: lists leave them
out and detail routes answer 404, so a name cannot be probed.

The sets are computed in Python from the DAG tags and agent labels (JSON
columns that SQLite and PostgreSQL query differently) and then applied as
``IN`` filters; DAGs and agents number in the thousands at most.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from hub.auth.roles import Principal
from hub.errors import AgentNotFound, DagNotFound, RunNotFound
from hub.models import Agent, Dag, DagRun

#: The agent label that names a device group.
GROUP_LABEL = "group"


def visible_dag_ids(session: Session, who: Principal | None) -> set[str] | None:
    """The DAG ids ``who`` may see; None: all of them."""
    if who is None or who.scope_tags is None:
        return None
    return {dag_id for dag_id, tags in session.execute(select(Dag.dag_id, Dag.tags)) if set(tags or ()) & who.scope_tags}


def visible_agent_ids(session: Session, who: Principal | None) -> set[str] | None:
    """The agent ids ``who`` may see; None: all of them."""
    if who is None or who.scope_groups is None:
        return None
    return {agent_id for agent_id, labels in session.execute(select(Agent.agent_id, Agent.labels)) if (labels or {}).get(GROUP_LABEL) in who.scope_groups}


def visible_filelocs(session: Session, who: Principal | None) -> set[str] | None:
    """The DAG files whose import errors ``who`` may see: files that hold a
    DAG in scope (its last good parse); None: all. A file that never parsed
    has no DAG, so no tag-scoped user sees its errors."""
    dag_ids = visible_dag_ids(session, who)
    if dag_ids is None:
        return None
    return {fileloc for dag_id, fileloc in session.execute(select(Dag.dag_id, Dag.fileloc)) if dag_id in dag_ids}


def check_dag(session: Session, who: Principal | None, dag_id: str) -> None:
    if who is None or who.scope_tags is None:
        return
    tags = session.scalar(select(Dag.tags).where(Dag.dag_id == dag_id))
    if not set(tags or ()) & who.scope_tags:
        raise DagNotFound(f"DAG {dag_id!r} not found; list DAGs with GET /api/v1/dags")


def check_run(session: Session, who: Principal | None, run_pk: int) -> None:
    if who is None or who.scope_tags is None:
        return
    dag_id = session.scalar(select(DagRun.dag_id).where(DagRun.id == run_pk))
    try:
        check_dag(session, who, dag_id or "")
    except DagNotFound:
        raise RunNotFound(f"run {run_pk} not found; list runs with GET /api/v1/runs") from None


def check_agent(session: Session, who: Principal | None, agent_id: str) -> None:
    if who is None or who.scope_groups is None:
        return
    labels = session.scalar(select(Agent.labels).where(Agent.agent_id == agent_id))
    if (labels or {}).get(GROUP_LABEL) not in who.scope_groups:
        raise AgentNotFound(f"agent {agent_id!r} not found; list agents with GET /api/v1/agents")
