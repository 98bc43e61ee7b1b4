"""docs/porting.md promises that its worked Airflow DAG ports by changing the
imports only. Both files are taken from the page: they must differ in their
import lines alone, and the Outpost one must run, catch up and finish as the
page says."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select

from hub.models import DagRun
from shared.clock import ManualClock

PAGE = (Path(__file__).resolve().parents[2] / "docs" / "porting.md").read_text()
AMSTERDAM = ZoneInfo("Europe/Amsterdam")


def example(marker: str) -> str:
    """The python block of the page that starts with the comment ``marker``."""
    block = PAGE.split(f"```python\n# {marker}\n", 1)[1].split("```", 1)[0]
    return block


def without_imports(source: str) -> list[str]:
    return [line for line in source.splitlines() if not line.startswith(("from ", "import "))]


def test_the_port_changes_only_the_imports() -> None:
    airflow, outpost = example("Airflow 3"), example("Outpost")
    assert any("airflow" in line for line in airflow.splitlines()), "the Airflow example lost its Airflow imports"
    assert "airflow" not in outpost
    assert without_imports(airflow) == without_imports(outpost)


def test_the_ported_dag_catches_up_and_runs_as_the_page_says(make_hub: Any, manual_clock: ManualClock) -> None:
    # 4 November, 03:30 in Amsterdam: the days of 1, 2 and 3 November are due.
    manual_clock.set(datetime(2026, 11, 4, 3, 30, tzinfo=AMSTERDAM).timestamp())
    hub = make_hub({"nightly_report.py": example("Outpost")})
    hub.tick(3)
    with hub.sessions() as session:
        runs = list(session.scalars(select(DagRun).where(DagRun.dag_id == "nightly_report").order_by(DagRun.logical_date)))
        intervals = [(r.data_interval_start.astimezone(AMSTERDAM), r.data_interval_end.astimezone(AMSTERDAM)) for r in runs]
        # max_active_runs=2: like Airflow, catchup creates the next run only when one ends.
        assert intervals == [(datetime(2026, 11, day, 2, 0, tzinfo=AMSTERDAM), datetime(2026, 11, day + 1, 2, 0, tzinfo=AMSTERDAM)) for day in (1, 2)]
    hub.tick(40)
    with hub.sessions() as session:
        runs = list(session.scalars(select(DagRun).where(DagRun.dag_id == "nightly_report").order_by(DagRun.logical_date)))
        assert [(r.data_interval_start.astimezone(AMSTERDAM).day, r.state) for r in runs] == [(1, "success"), (2, "success"), (3, "success")]
        first = runs[0].id
    states = {(ti.task_id, ti.map_index): ti.state for ti in hub.tis(first)}
    assert states == {
        ("wait_for_export", -1): "success", ("sites", -1): "success", ("count", 0): "success", ("count", 1): "success",
        ("total", -1): "success", ("anything", -1): "success", ("publish.upload", -1): "success",
        ("publish.notify", -1): "success", ("nothing_to_do", -1): "skipped", ("done", -1): "success",
    }
    outputs = {(ti.task_id, ti.map_index): ti.output for ti in hub.tis(first)}
    assert outputs[("count", 1)] == {"site": "plant-2", "day": "2026-11-01", "readings": 700}
    assert outputs[("total", -1)] == 1400
    assert outputs[("publish.notify", -1)] == "UPLOADED 1400 READINGS FOR 2026-11-01"
