"""The Alembic migrations and the SQLAlchemy models describe the same schema,
on SQLite and on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from hub.db import make_engine, upgrade
from hub.models import Base


def _diff(url: str) -> list[object]:
    upgrade(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))
    finally:
        engine.dispose()


def test_migrations_match_models_on_sqlite(tmp_path: Path) -> None:
    assert _diff(f"sqlite:///{tmp_path / 'hub.db'}") == []


@pytest.mark.postgres
def test_migrations_match_models_on_postgresql(pg_db_url: str) -> None:
    assert _diff(pg_db_url) == []


def test_upgrade_twice_is_harmless(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    upgrade(url)
    upgrade(url)
