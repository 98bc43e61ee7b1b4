"""docs/api.md has a section for every route of the REST API."""

from __future__ import annotations

from pathlib import Path

from fastapi.routing import APIRoute

from hub.api.app import create_app
from hub.config import HubSettings
from hub.events import EventBus
from shared.clock import ManualClock

API_MD = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_every_api_route_is_in_api_md() -> None:
    app = create_app(HubSettings(), None, EventBus(), ManualClock())  # type: ignore[arg-type]  # routes only
    text = API_MD.read_text()
    routes = {(m, r.path) for r in app.routes if isinstance(r, APIRoute) and r.include_in_schema for m in r.methods}
    missing = sorted(f"{m} {p}" for m, p in routes if f"### `{m} {p}`" not in text)
    assert missing == [], f"docs/api.md has no section for: {', '.join(missing)}"
