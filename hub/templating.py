"""Templated fields: a sandboxed Jinja environment and the task context.

An operator's ``template_fields`` (``op_args``, ``op_kwargs`` and
``templates_dict`` of a ``PythonOperator``, ``params`` of an
``AgentOperator``) are rendered just before a try runs: hub tasks in their
worker process, agent tasks on the hub right before the assignment is built.
Strings are Jinja templates in a ``SandboxedEnvironment`` with
``StrictUndefined`` (a typo is an error, not an empty string); lists, tuples
and dicts are rendered element by element; XCom references (``task.output``)
and DAG params of ``@dag`` functions are replaced by their values.

Values that come from outside - the run's conf, params, XCom values - are
data: they are inserted into the result and never rendered themselves.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any

import jinja2
from jinja2.nativetypes import NativeCodeGenerator, native_concat
from jinja2.sandbox import SandboxedEnvironment

#: A placeholder for a lazy value in serialized templates: ``{"__xcom__":
#: {"task_id": ..., "key": ...}}`` or ``{"__param__": name}``.
XCOM_MARK = "__xcom__"
PARAM_MARK = "__param__"
_MARKS = (XCOM_MARK, PARAM_MARK)


class TemplateError(Exception):
    """A templated field could not be rendered. The task fails with code
    ``template_error`` (not retried: the same template fails again)."""

    code = "template_error"

    def as_error(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "retryable": False}


class _NativeSandbox(SandboxedEnvironment):
    """Sandboxed, but a template that is one expression keeps its type
    (``"{{ params.n }}"`` gives ``5``, not ``"5"``): Airflow's
    ``render_template_as_native_obj``. Jinja's ``native_concat`` only
    parses literals (``ast.literal_eval``), never code."""

    code_generator_class = NativeCodeGenerator
    concat = staticmethod(native_concat)  # type: ignore[assignment]


def _ds(value: datetime) -> str:
    return value.strftime("%Y-%m-%d")


def _ds_nodash(value: datetime) -> str:
    return value.strftime("%Y%m%d")


def _ts(value: datetime) -> str:
    return value.isoformat()


def _ts_nodash(value: datetime) -> str:
    return value.strftime("%Y%m%dT%H%M%S")


def _ts_nodash_with_tz(value: datetime) -> str:
    return value.isoformat().replace("-", "").replace(":", "")


def ds_add(ds: str, days: int) -> str:
    """``macros.ds_add("2026-01-05", -4)`` is ``"2026-01-01"``."""
    return (datetime.strptime(ds, "%Y-%m-%d") + timedelta(days=days)).strftime("%Y-%m-%d")


def ds_format(ds: str, input_format: str, output_format: str) -> str:
    """``macros.ds_format("2026-01-05", "%Y-%m-%d", "%m-%d-%y")``."""
    return datetime.strptime(ds, input_format).strftime(output_format)


#: Airflow's ``macros``, less the modules: a module in a template reaches
#: everything it imports (``json.codecs.open``), so only functions and
#: classes are exposed.
MACROS = types.SimpleNamespace(
    ds_add=ds_add,
    ds_format=ds_format,
    datetime=datetime,
    timedelta=timedelta,
    json=types.SimpleNamespace(dumps=json.dumps, loads=json.loads),
)


@cache
def environment(native: bool = False) -> SandboxedEnvironment:
    env = (_NativeSandbox if native else SandboxedEnvironment)(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters.update(ds=_ds, ds_nodash=_ds_nodash, ts=_ts, ts_nodash=_ts_nodash, ts_nodash_with_tz=_ts_nodash_with_tz)
    return env


def is_template(value: str) -> bool:
    return "{{" in value or "{%" in value or "{#" in value


def render(value: Any, context: Mapping[str, Any], env: SandboxedEnvironment | None = None) -> Any:
    """``value`` with its templates rendered and its lazy values resolved.
    Raises ``TemplateError``."""
    env = env or environment()
    if isinstance(value, str):
        if not is_template(value):
            return value  # also keeps "123" a string in native mode
        try:
            result = env.from_string(value).render(context)
            if isinstance(result, jinja2.Undefined):
                # Native rendering hands back the bare value of a lone
                # expression: an undefined (or forbidden) name must still fail.
                str(result)
            return result
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{type(exc).__name__}: {exc} (in {value!r})") from None
        except Exception as exc:  # a filter or macro raised: still the template's fault
            raise TemplateError(f"{type(exc).__name__}: {exc} (in {value!r})") from None
    if getattr(value, "__outpost_lazy__", False):
        return value.resolve(context)
    if isinstance(value, dict):
        if len(value) == 1:
            [(mark, ref)] = value.items()
            if mark == XCOM_MARK:
                return _pull(context, ref)
            if mark == PARAM_MARK:
                return _param(context, ref)
        return {k: render(v, context, env) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, context, env) for v in value]
    if isinstance(value, tuple):
        return tuple(render(v, context, env) for v in value)
    if isinstance(value, (set, frozenset)):
        return type(value)(render(v, context, env) for v in value)
    return value


def _pull(context: Mapping[str, Any], ref: Any) -> Any:
    if not isinstance(ref, dict) or "task_id" not in ref:
        raise TemplateError(f"malformed XCom reference {ref!r}")
    return context["ti"].xcom_pull(task_ids=ref["task_id"], key=ref.get("key") or "return_value")


def _param(context: Mapping[str, Any], name: Any) -> Any:
    params = context.get("params") or {}
    if name not in params:
        raise TemplateError(f"the DAG param {name!r} has no value in this run")
    return params[name]


def to_template_json(value: Any, *, strict: bool, where: str = "") -> Any:
    """``value`` as JSON, lazy values as placeholders. ``strict`` raises
    ``ValueError`` on anything else that is not JSON (agent params go to a
    device); otherwise such a value becomes a stable ``"<TypeName>"`` (the
    structure must not change between two parses of the same file)."""
    if getattr(value, "__outpost_lazy__", False):
        return value.to_placeholder()
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                if strict:
                    raise ValueError(f"{where or 'value'}: dict keys must be strings, not {k!r}")
                k = str(k)
            out[k] = to_template_json(v, strict=strict, where=f"{where}.{k}" if where else k)
        if strict and len(out) == 1 and next(iter(out)) in _MARKS:
            raise ValueError(f"{where or 'value'}: the key {next(iter(out))!r} is reserved")
        return out
    if isinstance(value, (list, tuple)):
        return [to_template_json(v, strict=strict, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            if strict:
                raise ValueError(f"{where or 'value'}: {value} is not valid JSON")
            return str(value)
        return value
    if strict:
        raise ValueError(f"{where or 'value'}: {type(value).__name__} is not JSON")
    return f"<{type(value).__name__}>"


def xcom_refs(value: Any, path: str = "") -> dict[str, dict[str, str]]:
    """The XCom references inside serialized templates, by path
    (``"threshold"``, ``"0"``, ``"opts.limit"``)."""
    found: dict[str, dict[str, str]] = {}
    if isinstance(value, dict):
        if len(value) == 1 and XCOM_MARK in value and isinstance(value[XCOM_MARK], dict):
            found[path or "."] = dict(value[XCOM_MARK])
            return found
        for k, v in value.items():
            found.update(xcom_refs(v, f"{path}.{k}" if path else str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.update(xcom_refs(v, f"{path}.{i}" if path else str(i)))
    return found


def has_templates(value: Any) -> bool:
    """Whether serialized template JSON needs rendering at all."""
    if isinstance(value, str):
        return is_template(value)
    if isinstance(value, dict):
        if len(value) == 1 and next(iter(value)) in _MARKS:
            return True
        return any(has_templates(v) for v in value.values())
    if isinstance(value, list):
        return any(has_templates(v) for v in value)
    return False


def jsonable(value: Any) -> Any:
    """A rendered value as it is stored in ``rendered_fields``."""
    return to_template_json(value, strict=False)


@dataclass(frozen=True)
class RunView:
    """``dag_run`` as tasks and templates see it: plain data, no database
    object (the sandbox must not reach a session)."""

    dag_id: str
    run_id: str
    run_type: str
    conf: dict[str, Any]
    logical_date: datetime
    data_interval_start: datetime
    data_interval_end: datetime


def build_context(
    *,
    dag_id: str,
    run_id: str,
    run_type: str,
    conf: Mapping[str, Any],
    params: Mapping[str, Any],
    logical_date: datetime,
    data_interval_start: datetime | None,
    data_interval_end: datetime | None,
    ti: Any,
    map_index: int = -1,
    task: Any = None,
    dag: Any = None,
    outlets: list[Any] | None = None,
    sensor_started_at: datetime | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The task context, in Airflow's names (hub tasks get it as
    ``execute(context)`` and by parameter name; templates see the same)."""
    start = data_interval_start or logical_date
    end = data_interval_end or logical_date
    run = RunView(dag_id, run_id, run_type, json.loads(json.dumps(dict(conf))), logical_date, start, end)
    context: dict[str, Any] = {
        "ti": ti,
        "task_instance": ti,
        "task": task,
        "dag": dag,
        "dag_run": run,
        "run_id": run_id,
        "dag_id": dag_id,
        "params": dict(params),
        "conf": run.conf,
        "logical_date": logical_date,
        "ds": _ds(logical_date),
        "ds_nodash": _ds_nodash(logical_date),
        "ts": _ts(logical_date),
        "ts_nodash": _ts_nodash(logical_date),
        "ts_nodash_with_tz": _ts_nodash_with_tz(logical_date),
        "data_interval_start": start,
        "data_interval_end": end,
        "map_index": map_index,
        "outlets": list(outlets or []),
        "sensor_started_at": sensor_started_at,
        "macros": MACROS,
    }
    context.update(extra)
    return context


def render_agent_params(task: Mapping[str, Any], context: Mapping[str, Any], *, native: bool = False, validate: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """An agent task's job parameters for one try, from its serialized
    templates. The result must be a JSON object; ``validate(job_type,
    params)`` (the job type's schema) may reject it. Raises ``TemplateError``."""
    source = (task.get("templates") or {}).get("params", task.get("params") or {})
    rendered = render(source, context, environment(native))
    try:
        rendered = json.loads(json.dumps(rendered))
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"rendered params of {task.get('task_id')!r} are not JSON: {exc}") from None
    if not isinstance(rendered, dict):
        raise TemplateError(f"rendered params of {task.get('task_id')!r} are not a JSON object")
    if validate is not None:
        try:
            validate(str(task.get("job_type") or ""), rendered)
        except Exception as exc:
            raise TemplateError(f"rendered params of {task.get('task_id')!r} are not valid for {task.get('job_type')}: {exc}") from None
    return rendered
