"""Templated fields: sandboxed Jinja with the Airflow context, XComArgs
resolved at run time, run configuration kept as data, errors that fail the
task (never the hub)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import select

from hub.dag import DAG, PythonOperator
from hub.errors import InvalidRequest
from hub.models import DagRun, TaskInstance
from hub.templating import TemplateError, build_context, environment, render, render_agent_params

LOGICAL = datetime(2026, 1, 5, 6, 30, tzinfo=UTC)


class FakeTI:
    def __init__(self, xcoms: dict[tuple[str, str], Any]) -> None:
        self.xcoms = xcoms

    def xcom_pull(self, task_ids: str | None = None, key: str = "return_value", **_: Any) -> Any:
        return self.xcoms.get((task_ids or "", key))


def context(conf: dict[str, Any] | None = None, params: dict[str, Any] | None = None, xcoms: dict[tuple[str, str], Any] | None = None) -> dict[str, Any]:
    conf = conf or {}
    return build_context(
        dag_id="d", run_id="manual__1", run_type="manual", conf=conf, params={**(params or {}), **conf},
        logical_date=LOGICAL, data_interval_start=datetime(2026, 1, 4, tzinfo=UTC), data_interval_end=datetime(2026, 1, 5, tzinfo=UTC),
        ti=FakeTI(xcoms or {}),
    )


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ ds }}", "2026-01-05"),
        ("{{ ds_nodash }}", "20260105"),
        ("{{ ts }}", "2026-01-05T06:30:00+00:00"),
        ("{{ logical_date.year }}", "2026"),
        ("{{ data_interval_start | ds }} to {{ data_interval_end | ds }}", "2026-01-04 to 2026-01-05"),
        ("{{ run_id }}/{{ dag_run.run_id }}/{{ dag_id }}", "manual__1/manual__1/d"),
        ("{{ macros.ds_add(ds, -4) }}", "2026-01-01"),
        ("{{ macros.ds_format(ds, '%Y-%m-%d', '%d.%m.%Y') }}", "05.01.2026"),
        ("{{ params.limit * 2 }}", "20"),
        ("{{ ti.xcom_pull(task_ids='up') }}", "42"),
        ("{{ ti.xcom_pull(task_ids='up', key='extra') | tojson }}", '{"a": 1}'),
        ("{% for i in range(3) %}{{ i }}{% endfor %}", "012"),
        ("no template at all", "no template at all"),
    ],
)
def test_context_variables_render(template: str, expected: str) -> None:
    ctx = context(params={"limit": 10}, xcoms={("up", "return_value"): 42, ("up", "extra"): {"a": 1}})
    assert render(template, ctx) == expected


def test_nested_values_render_element_by_element() -> None:
    ctx = context(params={"n": 3})
    value = {"a": ["{{ params.n }}", 4, None], "b": ("{{ ds }}",), "c": {"d": "{{ ds_nodash }}"}}
    assert render(value, ctx) == {"a": ["3", 4, None], "b": ("2026-01-05",), "c": {"d": "20260105"}}


def test_undefined_names_are_errors_not_empty_strings() -> None:
    with pytest.raises(TemplateError, match="undefined"):
        render("{{ no_such_name }}", context())
    with pytest.raises(TemplateError):
        render("{{ params.missing }}", context(params={"n": 1}))
    with pytest.raises(TemplateError, match="TemplateSyntaxError"):
        render("{{ unclosed", context())


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('id') }}",
        "{{ macros.ds_add.__globals__ }}",
        "{{ macros.json.dumps.__globals__['__builtins__'] }}",
        "{{ ti.xcom_pull.__func__.__globals__ }}",
        "{{ dag_run.__class__.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ (0).__class__.__base__.__subclasses__() }}",
        "{{ macros.datetime.now.__self__.__dict__ }}",
    ],
)
def test_sandbox_escape_attempts_fail(attack: str) -> None:
    with pytest.raises(TemplateError):
        render(attack, context())
    with pytest.raises(TemplateError):
        render(attack, context(), environment(native=True))


def test_macros_expose_no_modules() -> None:
    # A module would reach everything it imports (json.codecs.open...).
    with pytest.raises(TemplateError):
        render("{{ macros.json.codecs }}", context())


def test_run_conf_is_data_never_a_template() -> None:
    conf = {"x": "{{ 7 * 7 }}", "y": "{% for i in range(3) %}{{ i }}{% endfor %}"}
    ctx = context(conf=conf)
    assert render("{{ dag_run.conf.x }}", ctx) == "{{ 7 * 7 }}"
    assert render("{{ params.y }}", ctx) == conf["y"]
    assert render("{{ conf['x'] }}", ctx, environment(native=True)) == "{{ 7 * 7 }}"
    # An XCom value is data too, however it looks.
    ctx = context(xcoms={("up", "return_value"): "{{ 7 * 7 }}"})
    assert render({"v": {"__xcom__": {"task_id": "up", "key": "return_value"}}}, ctx) == {"v": "{{ 7 * 7 }}"}


def test_native_rendering_keeps_types_and_leaves_plain_strings_alone() -> None:
    ctx = context(params={"n": 5, "ids": [1, 2]})
    native = environment(native=True)
    assert render("{{ params.n }}", ctx, native) == 5
    assert render("{{ params.ids }}", ctx, native) == [1, 2]
    assert render("123", ctx, native) == "123"
    assert render("{{ params.n }}", ctx) == "5"


def test_render_template_fields_returns_a_rendered_copy() -> None:
    with DAG("r"):
        up = PythonOperator(task_id="up", python_callable=lambda: 1)
        op = PythonOperator(task_id="t", python_callable=lambda x, day: None, op_args=[up.output],
                            op_kwargs={"day": "{{ ds }}"}, templates_dict={"when": "{{ ts }}"})
    rendered = op.render_template_fields(context(xcoms={("up", "return_value"): {"rows": 3}}))
    assert rendered is not op
    assert rendered.op_args == [{"rows": 3}] and rendered.op_kwargs == {"day": "2026-01-05"}
    assert rendered.templates_dict == {"when": "2026-01-05T06:30:00+00:00"}
    assert rendered.rendered_fields == {"templates_dict": {"when": "2026-01-05T06:30:00+00:00"}, "op_args": [{"rows": 3}], "op_kwargs": {"day": "2026-01-05"}}
    assert op.op_kwargs == {"day": "{{ ds }}"}  # the DAG's object is shared by every run: unchanged
    with pytest.raises(TemplateError, match="task 't', field 'op_kwargs'"):
        PythonOperator.render_template_fields(_with(op, op_kwargs={"day": "{{ nope }}"}), context())


def _with(op: PythonOperator, **attrs: Any) -> PythonOperator:
    import copy

    clone = copy.copy(op)
    clone.__dict__.update(attrs)
    return clone


def test_agent_params_render_to_json_and_are_checked_by_the_job_schema() -> None:
    task = {"task_id": "a", "job_type": "command.run", "templates": {"params": {"argv": ["echo", "{{ ds }}"], "timeout": {"__xcom__": {"task_id": "up", "key": "return_value"}}}}}
    ctx = context(xcoms={("up", "return_value"): 30})
    seen = []
    assert render_agent_params(task, ctx, validate=lambda job, params: seen.append((job, params))) == {"argv": ["echo", "2026-01-05"], "timeout": 30}
    assert seen == [("command.run", {"argv": ["echo", "2026-01-05"], "timeout": 30})]

    def reject(job: str, params: dict[str, Any]) -> None:
        raise ValueError("timeout too large")

    with pytest.raises(TemplateError, match="timeout too large"):
        render_agent_params(task, ctx, validate=reject)


# --- through the scheduler ------------------------------------------------------

AGENT_DAG = """
from hub.dag import DAG, AgentOperator, PythonOperator, Param, any_agent

with DAG("templated", params={"limit": Param(5, type="integer", minimum=1)}) as dag:
    compute = PythonOperator(task_id="compute", python_callable=lambda params: params["limit"] * 2)
    AgentOperator(task_id="probe", job_type="site.probe", target=any_agent(),
                  params={"threshold": compute.output, "day": "{{ ds }}", "raw": "{{ dag_run.conf.get('note', '') }}",
                          "limit": "{{ params.limit }}"})
"""

BROKEN_DAG = """
from hub.dag import DAG, AgentOperator, PythonOperator, any_agent

def render_me(day):
    return day

with DAG("broken_template", params={"pause": "long"}) as dag:
    AgentOperator(task_id="probe", job_type="noop", target=any_agent(), params={"echo": "{{ no_such_variable }}"})
    # Renders fine, but "long" is not the number noop's schema wants.
    AgentOperator(task_id="sleepy", job_type="noop", target=any_agent(), params={"sleep": "{{ params.pause }}"})
    # A bad XCom lookup is caught before it reaches the database.
    AgentOperator(task_id="lookup", job_type="noop", target=any_agent(), params={"echo": "{{ ti.xcom_pull(task_ids=123) }}"})
    PythonOperator(task_id="hub", python_callable=render_me, op_kwargs={"day": "{{ ds.nope.deeper }}"})
"""

TASKFLOW_DAG = """
from hub.dag import DAG
from hub.taskflow import task

with DAG("flow") as dag:
    @task
    def extract():
        return {"rows": [1, 2, 3], "source": "{{ 7 * 7 }}"}

    @task(multiple_outputs=True)
    def split(data):
        return {"count": len(data["rows"]), "source": data["source"]}

    @task
    def report(count, source, day, ti=None):
        ti.xcom_push("seen", count)
        return f"{day}: {count} rows from {source}"

    parts = split(extract())
    report(parts["count"], parts["source"], "{{ ds }}")
"""


def _tis(hub: Any, run_pk: int) -> dict[str, TaskInstance]:
    return {ti.task_id: ti for ti in hub.tis(run_pk)}


def test_agent_params_are_rendered_at_dispatch_and_conf_stays_data(make_hub: Any) -> None:
    hub = make_hub({"templated.py": AGENT_DAG})
    hub.agent_online("a1", job_types=("site.probe",))
    run_pk = hub.trigger("templated", {"note": "{{ 7 * 7 }}", "limit": 4})
    hub.tick()
    [assign] = [e.body for e in hub.assignments_sent()]
    assert assign.params == {"threshold": 8, "day": "2026-01-01", "raw": "{{ 7 * 7 }}", "limit": "4"}
    probe = _tis(hub, run_pk)["probe"]
    assert probe.rendered_fields == {"params": assign.params}
    with hub.sessions() as session:
        assert session.get(DagRun, run_pk).params == {"limit": 4, "note": "{{ 7 * 7 }}"}


def test_invalid_conf_is_rejected_at_trigger(make_hub: Any) -> None:
    hub = make_hub({"templated.py": AGENT_DAG})
    with pytest.raises(InvalidRequest, match="'limit'.*minimum"):
        hub.trigger("templated", {"limit": 0})
    with hub.sessions() as session:
        assert session.scalars(select(DagRun)).all() == []


def test_template_errors_fail_the_task_with_template_error(make_hub: Any) -> None:
    hub = make_hub({"broken.py": BROKEN_DAG})
    hub.agent_online("a1")
    run_pk = hub.trigger("broken_template")
    hub.tick()
    tis = _tis(hub, run_pk)
    for task_id in ("probe", "sleepy", "lookup", "hub"):
        assert tis[task_id].state == "failed", task_id
        assert tis[task_id].error["code"] == "template_error"
        assert tis[task_id].error["retryable"] is False
    assert "no_such_variable" in tis["probe"].error["message"]
    assert "not valid for noop" in tis["sleepy"].error["message"]
    assert "task_ids must be a task id" in tis["lookup"].error["message"]
    assert hub.assignments_sent() == []


def test_taskflow_values_flow_through_xcoms_and_templates(make_hub: Any) -> None:
    hub = make_hub({"flow.py": TASKFLOW_DAG})
    run_pk = hub.trigger("flow")
    hub.tick(8)
    tis = _tis(hub, run_pk)
    assert {t: ti.state for t, ti in tis.items()} == {"extract": "success", "split": "success", "report": "success"}
    # The XCom value "{{ 7 * 7 }}" is passed on as data; "{{ ds }}" written in the DAG is rendered.
    assert tis["report"].output == "2026-01-01: 3 rows from {{ 7 * 7 }}"
    assert tis["report"].rendered_fields["op_args"] == [3, "{{ 7 * 7 }}", "2026-01-01"]
    from hub.xcom import pull

    with hub.sessions() as session:
        assert pull(session, run_pk, "split", "count") == 3
        assert pull(session, run_pk, "report", "seen") == 3
        assert pull(session, run_pk, "split") == {"count": 3, "source": "{{ 7 * 7 }}"}
