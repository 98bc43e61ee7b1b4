"""The parameter-schema validator and the job error types."""

from __future__ import annotations

from typing import Any

import pytest

from firmware_jobs.base import Job, JobAborted, JobContext, JobError, check_schema, validate
from shared.errors import InvalidParams, OutpostError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 5},
        "count": {"type": "integer", "minimum": 1, "maximum": 10, "default": 3},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "flag": {"type": "boolean", "default": False},
        "mode": {"enum": ["fast", "safe"], "default": "safe"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 2},
        "maybe": {"type": ["string", "null"]},
        "nested": {
            "type": "object",
            "properties": {"depth": {"type": "integer", "default": 1}},
            "additionalProperties": False,
        },
    },
    "required": ["name"],
    "additionalProperties": False,
}


def invalid(params: Any) -> str:
    with pytest.raises(InvalidParams) as info:
        validate(SCHEMA, params)
    return str(info.value)


def test_defaults_are_filled_in_without_mutating_the_input() -> None:
    params = {"name": "ab", "nested": {}}
    assert validate(SCHEMA, params) == {"name": "ab", "count": 3, "flag": False, "mode": "safe", "nested": {"depth": 1}}
    assert params == {"name": "ab", "nested": {}}


def test_defaults_are_copies() -> None:
    schema = {"type": "object", "properties": {"xs": {"type": "array", "default": []}}}
    first = validate(schema, {})
    first["xs"].append(1)
    assert validate(schema, {}) == {"xs": []}


def test_valid_values_pass_unchanged() -> None:
    params = {"name": "abcde", "count": 10, "ratio": 0, "flag": True, "mode": "fast", "tags": ["a", "b"], "maybe": None}
    assert validate(SCHEMA, params) == params | {"ratio": 0}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, "params.name: required field is missing"),
        ({"name": "ab", "bogus": 1}, "params: unknown field(s) ['bogus']"),
        ({"name": 5}, "params.name: 5 is not of type string"),
        ({"name": "a"}, "params.name: 'a' is shorter than 2 characters"),
        ({"name": "abcdef"}, "params.name: 'abcdef' is longer than 5 characters"),
        ({"name": "ab", "count": 0}, "params.count: 0 is below the minimum 1"),
        ({"name": "ab", "count": 11}, "params.count: 11 is above the maximum 10"),
        ({"name": "ab", "count": 2.0}, "params.count: 2.0 is not of type integer"),
        ({"name": "ab", "count": True}, "params.count: True is not of type integer"),
        ({"name": "ab", "ratio": 1.5}, "params.ratio: 1.5 is above the maximum 1"),
        ({"name": "ab", "ratio": float("nan")}, "params.ratio: nan is not of type number"),
        ({"name": "ab", "ratio": "0.5"}, "params.ratio: '0.5' is not of type number"),
        ({"name": "ab", "flag": 1}, "params.flag: 1 is not of type boolean"),
        ({"name": "ab", "mode": "slow"}, "params.mode: 'slow' is not one of ['fast', 'safe']"),
        ({"name": "ab", "tags": []}, "params.tags: [] is shorter than 1 items"),
        ({"name": "ab", "tags": ["a", "b", "c"]}, "params.tags: ['a', 'b', 'c'] is longer than 2 items"),
        ({"name": "ab", "tags": ["a", 3]}, "params.tags[1]: 3 is not of type string"),
        ({"name": "ab", "tags": "a"}, "params.tags: 'a' is not of type array"),
        ({"name": "ab", "maybe": 3}, "params.maybe: 3 is not of type string or null"),
        ({"name": "ab", "nested": {"depth": "x"}}, "params.nested.depth: 'x' is not of type integer"),
        ({"name": "ab", "nested": {"deep": 1}}, "params.nested: unknown field(s) ['deep']"),
        ([], "params: [] is not of type object"),
    ],
)
def test_each_rule_is_enforced_with_a_message_naming_field_value_and_rule(params: Any, expected: str) -> None:
    assert invalid(params).startswith(expected)


def test_long_values_are_shortened_in_messages() -> None:
    message = invalid({"name": "x" * 1000})
    assert len(message) < 150 and "..." in message


def test_enum_does_not_confuse_booleans_and_numbers() -> None:
    schema = {"enum": [1, "1"]}
    assert validate(schema, 1) == 1
    with pytest.raises(InvalidParams):
        validate(schema, True)


@pytest.mark.parametrize(
    ("schema", "complaint"),
    [
        ({"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}, "unsupported keywords ['pattern']"),
        ({"type": "object", "properties": {"x": {"type": "str"}}}, "unknown type 'str'"),
        ({"type": "object", "additionalProperties": {"type": "string"}}, "only 'additionalProperties: false'"),
        ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 5, "default": 9}}}, "params.n (default): 9 is above the maximum 5"),
        ({"type": "array", "items": {"format": "uri"}}, "unsupported keywords ['format']"),
    ],
)
def test_schemas_outside_the_subset_are_refused(schema: dict[str, Any], complaint: str) -> None:
    with pytest.raises((ValueError, InvalidParams), match=complaint.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        check_schema(schema)


def test_job_validate_uses_the_class_schema() -> None:
    class Greet(Job):
        name = "test.greet"
        version = "1.0"
        description = "says hello"
        params_schema = SCHEMA

        def run(self, ctx: JobContext, params: dict[str, Any]) -> Any:
            return f"hello {params['name']}"

    assert Greet().validate({"name": "bob"})["count"] == 3
    with pytest.raises(InvalidParams, match="params.name"):
        Greet().validate({})


def test_job_errors_carry_code_and_retryable() -> None:
    error = JobError("disk full", code="no_space", retryable=False)
    assert isinstance(error, OutpostError)
    assert (str(error), error.code, error.retryable) == ("disk full", "no_space", False)
    assert JobError("x").code == "job_error" and JobError("x").retryable is True
    aborted = JobAborted()
    assert isinstance(aborted, JobError) and aborted.code == "aborted" and str(aborted)
