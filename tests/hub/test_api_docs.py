"""docs/api.md has a section for every route of the REST API."""

from __future__ import annotations

from pathlib import Path

from hub.api.app import create_app
from hub.events import EventBus
from shared.clock import ManualClock
from tests.hub.api_harness import hub_settings

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_api_route_is_in_api_md() -> None:
    app = create_app(hub_settings(), None, EventBus(), ManualClock())  # type: ignore[arg-type]  # routes only
    text = API_MD.read_text()
    # From the OpenAPI document: FastAPI keeps included routers as objects of
    # their own in app.routes, so walking it finds no APIRoute at all.
    routes = {(m.upper(), path) for path, operations in app.openapi()["paths"].items() for m in operations}
    assert len(routes) > 20 and ("GET", "/api/v1/dags") in routes
    missing = sorted(f"{m} {p}" for m, p in routes if f"### `{m} {p}`" not in text)
    assert missing == [], f"docs/api.md has no section for: {', '.join(missing)}"
