"""The precomputed field validators of ``Message.from_dict`` against the
generic annotation walk they replaced: same values, same errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import InvalidMessage
from shared.messages import MESSAGE_TYPES, Message


def _reference_check(type_name: str, name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _reference_check(type_name, name, arg, value)
            except InvalidMessage:
                continue
        raise InvalidMessage(f"{type_name}.{name}: {value!r} does not match {hint}")
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in args:
            return value
    elif origin is tuple:
        if isinstance(value, list):
            return tuple(_reference_check(type_name, name, args[0], v) for v in value)
    elif origin is dict or hint is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            if args:
                return {k: _reference_check(type_name, name, args[1], v) for k, v in value.items()}
            return value
    elif isinstance(hint, type) and issubclass(hint, Message):
        return _reference_from_dict(hint, value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    raise InvalidMessage(f"{type_name}.{name}: {value!r} is not a valid {getattr(hint, '__name__', hint)}")


def _reference_from_dict(cls: type[Message], data: Any) -> Message:
    if not isinstance(data, dict):
        raise InvalidMessage(f"{cls.TYPE} body must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidMessage(f"{cls.TYPE} body lacks required field {f.name!r}")
            continue
        values[f.name] = _reference_check(cls.TYPE, f.name, hints[f.name], data[f.name])
    return cls(**values)


def _outcome(decode: Any, cls: type[Message], data: Any) -> tuple[str, Any]:
    try:
        return "ok", decode(cls, data)
    except InvalidMessage as exc:
        return "invalid", str(exc)


scalars = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(["", "a", "success", "failed", "online", "offline", "x"])
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["code", "message", "retryable", "name", "version", "k"]), inner, max_size=4),
    max_leaves=12,
)
field_names = sorted({f.name for cls in MESSAGE_TYPES.values() for f in dataclasses.fields(cls)} | {"code", "message", "retryable", "name", "version"})
nested = st.fixed_dictionaries({}, optional={"code": json_values, "message": json_values, "retryable": json_values})
job_types = st.lists(st.fixed_dictionaries({}, optional={"name": scalars, "version": scalars}) | json_values, max_size=3)


def _good(hint: Any) -> st.SearchStrategy[Any]:
    """Values that mostly fit ``hint``, so valid bodies are common too."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return json_values
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_good(a) for a in args])
    if hint is type(None):
        return st.none()
    if origin is Literal:
        return st.sampled_from(args)
    if origin is tuple:
        return st.lists(_good(args[0]), max_size=3)
    if origin is dict or hint is dict:
        return st.dictionaries(st.text(max_size=3), _good(args[1]) if args else json_values, max_size=3)
    if isinstance(hint, type) and issubclass(hint, Message):
        return _body(hint)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False) | st.integers(-5, 5)
    if hint is int:
        return st.integers(-5, 5)
    if hint is bool:
        return st.booleans()
    if hint is str:
        return st.text(max_size=5)
    return json_values


def _body(cls: type[Message]) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    value = {f.name: st.one_of(_good(hints[f.name]), _good(hints[f.name]), _good(hints[f.name]), json_values) for f in fields}
    mostly_valid = st.fixed_dictionaries({n: v for n, v in value.items() if n in required}, optional={n: v for n, v in value.items() if n not in required})
    anything = st.fixed_dictionaries({}, optional={n: value.get(n, json_values | nested | job_types) for n in field_names})
    return st.one_of(mostly_valid, mostly_valid, mostly_valid, anything, json_values)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(sorted(MESSAGE_TYPES)).flatmap(lambda kind: st.tuples(st.just(kind), _body(MESSAGE_TYPES[kind]))))
def test_validators_match_the_generic_annotation_walk(case: tuple[str, Any]) -> None:
    kind, data = case
    cls = MESSAGE_TYPES[kind]
    expected = _outcome(_reference_from_dict, cls, data)
    actual = _outcome(lambda c, d: c.from_dict(d), cls, data)
    assert actual == expected
    if actual[0] == "ok":
        assert type(actual[1]) is cls
        assert actual[1].to_dict() == expected[1].to_dict()
