"""DAG params, Airflow's ``Param``: a default and a JSON schema.

A DAG declares ``params={"threshold": Param(80, type="integer", minimum=0)}``
(a plain value is a ``Param`` with no schema). At trigger time the run's
``conf`` overrides the defaults key by key, conf keys the DAG does not declare
are kept, and every declared param is validated against its schema; the
result is the run's ``params`` (``dag_runs.params``), what tasks see as
``params``. The conf itself stays data: it is never rendered as a template.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
from jsonschema.validators import validator_for

from hub.errors import InvalidDag, InvalidRequest


class _NotSet:
    def __repr__(self) -> str:
        return "NOTSET"


#: A ``Param`` without a default: the run's conf must supply it.
NOTSET: Any = _NotSet()


class Param:
    """A DAG param: ``Param(default, type=..., minimum=..., enum=...,
    description=...)``; any keyword other than ``description`` and
    ``title`` is a JSON-schema keyword (draft 2020-12)."""

    def __init__(self, default: Any = NOTSET, description: str | None = None, **schema: Any) -> None:
        self.value = default
        self.description = description
        self.schema = dict(schema)
        if description is not None:
            self.schema.setdefault("description", description)
        try:
            validator_for(self.schema).check_schema(self.schema)
        except jsonschema.SchemaError as exc:
            raise InvalidDag(f"invalid Param schema {self.schema!r}: {exc.message}") from None

    @property
    def has_value(self) -> bool:
        return self.value is not NOTSET

    def resolve(self, value: Any = NOTSET, *, name: str = "") -> Any:
        """``value`` (or the default) checked against the schema; raises
        ``ValueError`` naming the param and the rule it breaks."""
        final = self.value if value is NOTSET else value
        if final is NOTSET:
            raise ValueError(f"param {name!r} has no default and the run's conf does not give it")
        return validate_value(name, final, self.schema)

    def serialize(self) -> dict[str, Any]:
        return {
            "default": None if self.value is NOTSET else _json_value(self.value),
            "required": self.value is NOTSET,
            "schema": self.schema,
            "description": self.description,
        }

    def __repr__(self) -> str:
        return f"Param({self.value!r}, schema={self.schema!r})"


class ParamsDict(Mapping[str, Param]):
    """The DAG's params by name; plain values become schema-less ``Param``s."""

    def __init__(self, params: Mapping[str, Any] | None = None) -> None:
        self._params: dict[str, Param] = {}
        for name, value in (params or {}).items():
            if not isinstance(name, str) or not name:
                raise InvalidDag(f"param names must be non-empty strings, not {name!r}")
            self._params[name] = value if isinstance(value, Param) else Param(value)

    def __getitem__(self, name: str) -> Param:
        return self._params[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def defaults(self) -> dict[str, Any]:
        return {name: p.value for name, p in self._params.items() if p.has_value}

    def validate_defaults(self, dag_id: str) -> None:
        """Defaults that break their own schema are a DAG error, found when
        the file is parsed rather than at the first run."""
        for name, param in self._params.items():
            if param.has_value:
                try:
                    param.resolve(name=name)
                except ValueError as exc:
                    raise InvalidDag(f"DAG {dag_id!r}: default of {exc}") from None

    def serialize(self) -> dict[str, dict[str, Any]]:
        return {name: p.serialize() for name, p in self._params.items()}


def validate_value(name: str, value: Any, schema: Mapping[str, Any]) -> Any:
    if schema:
        cls = validator_for(schema)
        errors = sorted(cls(schema, format_checker=cls.FORMAT_CHECKER).iter_errors(value), key=lambda e: list(e.path))
        if errors:
            where = "".join(f"[{p!r}]" for p in errors[0].path)
            raise ValueError(f"param {name!r}{where}: {errors[0].message}")
    return value


def resolve_run_params(spec: Mapping[str, Mapping[str, Any]], conf: Mapping[str, Any]) -> dict[str, Any]:
    """A run's params from the serialized DAG params (``DAG.serialize()
    ["params"]``) and its conf. Raises ``InvalidRequest`` listing every
    param that is missing or invalid."""
    params: dict[str, Any] = {}
    problems: list[str] = []
    for name, entry in spec.items():
        if name in conf:
            value = conf[name]
        elif entry.get("required"):
            problems.append(f"param {name!r} is required: the DAG gives it no default and the conf does not set it")
            continue
        else:
            value = copy.deepcopy(entry.get("default"))
        try:
            params[name] = validate_value(name, value, entry.get("schema") or {})
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise InvalidRequest("invalid run conf: " + "; ".join(problems))
    # Airflow keeps conf keys the DAG does not declare: they are params too.
    for name, value in conf.items():
        params.setdefault(name, value)
    return params


def _json_value(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidDag(f"param default {value!r} is not JSON: {exc}") from None
    return value
