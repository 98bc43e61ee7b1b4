"""Fuzz the REST API from its own OpenAPI document (schemathesis): for
every operation, generated requests over the realistic seed of the API
harness never get a 5xx, and every answer matches the schema (documented
status code, content type and body).

Bounded: MAX_EXAMPLES requests per operation, a per-example deadline and a
per-operation timeout; the whole file runs in well under two minutes on
two cores. Operations are listed from a routes-only app at collection
time; each test fuzzes one operation of one seeded hub (SQLite).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance, status_code_conformance

from hub.api.app import create_app
from hub.events import EventBus
from shared.clock import ManualClock
from tests.hub.api_harness import Hub, Seeded, hub_settings, open_hub, seeded_sqlite_template  # noqa: F401  (fixtures)

MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPENAPI = "/api/v1/openapi.json"


def _labels() -> list[str]:
    routes_only = create_app(hub_settings(), None, EventBus(), ManualClock())  # type: ignore[arg-type]
    return [result.ok().label for result in schemathesis.openapi.from_asgi(OPENAPI, routes_only).get_all_operations()]


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory: pytest.TempPathFactory, seeded_sqlite_template: tuple[Path, Seeded]) -> Iterator[tuple[Hub, Any]]:  # noqa: F811
    """One seeded hub for the whole file (a fresh one per operation costs
    more than the fuzzing), and its schema. Operations run in the schema's
    order, so what one leaves (a pool it created) is the next one's seed."""
    template, ids = seeded_sqlite_template
    path = tmp_path_factory.mktemp("fuzz") / "hub.db"
    shutil.copyfile(template, path)
    hub = open_hub(f"sqlite:///{path}")
    hub.seeded = ids
    yield hub, schemathesis.openapi.from_asgi(OPENAPI, hub.app)
    hub.engine.dispose()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("label", _labels())
def test_api_answers_within_its_schema_and_never_5xx(label: str, fuzz_hub: tuple[Hub, Any]) -> None:
    hub, schema = fuzz_hub
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    # The harness client's headers: another slice makes it authenticate as admin.
    headers = dict(hub.client().headers)

    @given(case=operation.as_strategy())
    @settings(
        max_examples=MAX_EXAMPLES, deadline=timedelta(seconds=2), database=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    def fuzz(case: Any) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    fuzz()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/api/v1/import-errors?offset=9223372036854775808", None), ("POST", "/api/v1/runs/9223372036854775808/mark", {"state": "failed", "task_ids": ["t"]}),
     ("POST", "/api/v1/pools", {"name": "big", "slots": 2**70}), ("GET", "/api/v1/variables?offset=9223372036854775808", None)],
)
def test_numbers_past_64_bits_are_a_422_not_a_500(fuzz_hub: tuple[Hub, Any], method: str, path: str, body: Any) -> None:
    """What the fuzzer found: such numbers reached SQLite and raised OverflowError (a 500)."""
    with fuzz_hub[0].client(raise_server_exceptions=False) as client:
        answer = client.request(method, path, json=body)
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_request"
