"""The operator CLI against a real hub API served by uvicorn: table and
JSON output, waiting for runs, error messages and exit codes, --help."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hub.ctl import build_parser, main
from hub.ctl.errors import ExitCode
from hub.ctl.parsing import commands
from hub.db import transaction
from hub.models import DagRun
from tests.hub.api_harness import Hub, hub, live_hub, seeded_sqlite_template  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(60)
OUTPOST = Path(sys.executable).with_name("outpost")


class Cli:
    """``outpost --hub URL ...`` in-process; returns (exit code, stdout, stderr)."""

    def __init__(self, url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = url
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--hub", self.url, *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *argv: str) -> Any:
        code, out, err = self(*argv, "-o", "json")
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def cli(live_hub: tuple[Hub, str], capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(live_hub[1], capsys)


# --- reads ----------------------------------------------------------------------


def test_dags_list_as_a_table(cli: Cli) -> None:
    assert cli("dags", "list") == (0, (
        "DAG_ID        SCHEDULE  PAUSED  ACTIVE  TASKS  LAST_RUN   NEXT_RUN\n"
        "fleet_health  @hourly   no      yes     2      2 running  2026-01-01 01:00:00Z\n"
        "gone_dag      manual    no      no      1      -          -\n"
        "reboot_one    manual    yes     yes     1      3 failed   -\n"
    ), "")


def test_dags_list_as_json_is_the_api_page(cli: Cli) -> None:
    page = cli.json("dags", "list", "--paused")
    assert [d["dag_id"] for d in page["items"]] == ["reboot_one"] and page["total"] == 1
    assert [d["dag_id"] for d in cli.json("dags", "list", "--unpaused")["items"]] == ["fleet_health", "gone_dag"]


def test_lists_say_when_they_show_one_page_of_more(cli: Cli) -> None:
    code, out, err = cli("dags", "list", "--limit", "1")
    assert code == 0 and out.count("\n") == 2
    assert err == "showing 1-1 of 3 DAGs; use --limit/--offset for more\n"
    assert cli("runs", "list", "--dag", "fleet_health", "--state", "failed") == (0, "", "no runs\n")


def test_dags_show_lists_tasks_with_their_dependencies(cli: Cli) -> None:
    code, out, err = cli("dags", "show", "fleet_health")
    assert code == 0 and err == ""
    assert out == (
        "dag_id:      fleet_health\n"
        "description: Diagnostics from every device.\n"
        "schedule:    @hourly\n"
        "is_paused:   no\n"
        "is_active:   yes\n"
        "fileloc:     /dags/fleet_health.py\n"
        "tags:        fleet\n"
        "version:     -\n"
        "last_run:    2 running (2025-12-31 23:55:00Z)\n"
        "next_run_at: 2026-01-01 01:00:00Z\n"
        "\n"
        "TASK_ID    KIND   RUNS                 TARGET                   UPSTREAM  TRIGGER_RULE\n"
        "collect    agent  diagnostics.collect  every agent site=berlin  -         all_success\n"
        "summarise  hub    _summarise()         hub                      collect   all_success\n"
    )
    assert cli.json("dags", "show", "fleet_health")["structure"]["tasks"][1]["upstream"] == ["collect"]


def test_runs_list_filters_and_shows_task_counts(cli: Cli) -> None:
    assert cli("runs", "list") == (0, (
        "ID  DAG_ID        STATE    TYPE       LOGICAL_DATE          ENDED                 TASKS\n"
        "3   reboot_one    failed   manual     2025-12-31 23:00:00Z  2025-12-31 23:00:42Z  1 failed\n"
        "2   fleet_health  running  manual     2025-12-31 23:55:00Z  -                     1 none, 1 running, 1 success\n"
        "1   fleet_health  success  scheduled  2025-12-31 22:00:00Z  2025-12-31 22:00:42Z  4 success\n"
    ), "")
    assert [r["id"] for r in cli.json("runs", "list", "--dag", "fleet_health", "--state", "success")["items"]] == [1]


def test_runs_show_lists_task_instances_with_agents_and_errors(cli: Cli) -> None:
    code, out, _ = cli("runs", "show", "3")
    assert code == 0
    assert out.endswith(
        "TASK_ID  MAP_INDEX  STATE   TRY  AGENT_ID  STARTED               ENDED                 ERROR\n"
        "reboot   -          failed  1/1  edge-1    2025-12-31 23:00:00Z  2025-12-31 23:00:03Z  exit status 1\n"
    )
    assert "state:        failed\n" in out  # without --wait, showing a failed run is not a failure
    run = cli.json("runs", "show", "1")
    assert [(t["task_id"], t["map_index"], t["agent_id"]) for t in run["task_instances"]][:2] == [("collect", 0, "edge-1"), ("collect", 1, "edge-2")]


def test_agents_list_and_filters(cli: Cli) -> None:
    assert cli("agents", "list") == (0, (
        "AGENT_ID  HOSTNAME                      STATE    LAST_SEEN             HARDWARE  FIRMWARE  GROUPS  VERSION  SKEW               LABELS\n"
        "edge-1    gw-berlin-1                   online   2025-12-31 23:59:55Z  -         -         -       0.1.0    +0.4s              site=berlin,rack=a\n"
        "edge-2    <img src=x onerror=alert(1)>  offline  2025-12-31 21:00:00Z  -         -         -       0.1.0    -612.0s ! flagged  site=paris\n"
        "edge-3    gw-berlin-2                   online   2025-12-31 23:59:40Z  -         -         -       0.1.0    -                  site=berlin,rack=b\n"
    ), "")
    ids = lambda *argv: [a["agent_id"] for a in cli.json("agents", "list", *argv)["items"]]  # noqa: E731
    assert ids("--state", "online") == ["edge-1", "edge-3"]
    assert ids("--label", "site=berlin", "--label", "rack=b") == ["edge-3"]


def test_agents_show_has_job_types_heartbeat_and_recent_work(cli: Cli) -> None:
    code, out, _ = cli("agents", "show", "edge-1")
    assert code == 0
    assert "job_types:      diagnostics.collect 1, command.run 1\n" in out
    assert 'last_heartbeat: {"inbox":0,"outbox":1}\n' in out
    assert out.endswith(
        "RUN  DAG_ID        TASK_ID  MAP_INDEX  STATE    TRY  ENDED\n"
        "3    reboot_one    reboot   -          failed   1/1  2025-12-31 23:00:03Z\n"
        "2    fleet_health  collect  0          success  1/1  2025-12-31 23:55:03Z\n"
        "1    fleet_health  collect  0          success  1/1  2025-12-31 22:00:03Z\n"
    )
    assert cli.json("agents", "show", "edge-1")["labels"] == {"site": "berlin", "rack": "a"}


def test_import_errors_name_file_and_reason(cli: Cli) -> None:
    assert cli("import-errors") == (0, (
        "fileloc:     /dags/broken.py\n"
        "kind:        syntax\n"
        "recorded_at: 2026-01-01 00:00:00Z\n"
        "error:       SyntaxError: invalid syntax (broken.py, line 3)\n"
    ), "")
    assert cli.json("import-errors")["items"][0]["kind"] == "syntax"


# --- writes ---------------------------------------------------------------------


def test_trigger_starts_a_run_with_conf(cli: Cli, live_hub: tuple[Hub, str]) -> None:
    code, out, err = cli("dags", "trigger", "fleet_health", "--conf", '{"site": "berlin"}')
    assert code == 0 and err == ""
    assert out == "triggered run 4 of fleet_health (manual__2026-01-01T00:00:00.000000+00:00)\nfollow it with: outpost runs show 4 --wait\n"
    assert cli.json("runs", "show", "4")["conf"] == {"site": "berlin"}
    live_hub[0].clock.advance(1)  # run ids are unique per logical date
    run = cli.json("dags", "trigger", "reboot_one")
    assert run["dag_id"] == "reboot_one" and run["conf"] == {} and run["task_instances"][0]["task_id"] == "reboot"


def test_pause_and_unpause(cli: Cli) -> None:
    assert cli("dags", "pause", "fleet_health") == (0, "fleet_health is now paused\n", "")
    assert cli.json("dags", "show", "fleet_health")["is_paused"] is True
    assert cli("dags", "unpause", "fleet_health") == (0, "fleet_health is now unpaused\n", "")
    assert cli.json("dags", "show", "fleet_health")["is_paused"] is False


# --- waiting --------------------------------------------------------------------


def test_wait_exits_0_when_the_run_succeeds(cli: Cli, live_hub: tuple[Hub, str]) -> None:
    hub_ = live_hub[0]

    def finish_later() -> None:
        time.sleep(0.4)
        with transaction(hub_.sessions) as session:
            run = session.get(DagRun, hub_.seeded.run_running)
            assert run is not None
            run.state = "success"

    threading.Thread(target=finish_later).start()
    code, out, err = cli("runs", "show", "2", "--wait", "--timeout", "20", "--interval", "0.1")
    assert code == ExitCode.OK
    assert err.splitlines() == ["run 2 running: 1 none, 1 running, 1 success", "run 2 success: 1 none, 1 running, 1 success"]
    assert "state:        success\n" in out


def test_wait_exits_1_when_the_run_failed(cli: Cli) -> None:
    code, out, err = cli("runs", "show", "3", "--wait")
    assert (code, err) == (ExitCode.RUN_FAILED, "run 3 failed: 1 failed\n")
    assert "exit status 1" in out


def test_wait_gives_up_after_the_timeout(cli: Cli) -> None:
    started = time.monotonic()
    code, out, err = cli("runs", "show", "2", "--wait", "--timeout", "0.5", "--interval", "0.1")
    assert time.monotonic() - started < 5
    assert (code, out) == (ExitCode.WAIT_TIMEOUT, "")
    assert err == (
        "run 2 running: 1 none, 1 running, 1 success\n"
        "outpost: error: run 2 is still running after 0.5 s; wait longer with --timeout or check it with 'outpost runs show 2'\n"
    )


def test_trigger_and_wait_in_one_command(cli: Cli, live_hub: tuple[Hub, str]) -> None:
    code, out, err = cli("dags", "trigger", "fleet_health", "--wait", "--timeout", "0.3", "--interval", "0.1")
    assert code == ExitCode.WAIT_TIMEOUT and out == ""
    assert err.splitlines()[0] == "triggered run 4 of fleet_health"
    assert err.splitlines()[-1].startswith("outpost: error: run 4 is still running after 0.3 s")


# --- errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "exit_code", "message"),
    [
        (["dags", "show", "nope"], ExitCode.NOT_FOUND, "dag_not_found: DAG 'nope' not found; list DAGs with GET /api/v1/dags"),
        (["dags", "trigger", "nope"], ExitCode.NOT_FOUND, "dag_not_found: DAG 'nope' does not exist (or its file was removed); see 'outpost dags list'"),
        (["dags", "pause", "nope"], ExitCode.NOT_FOUND, "dag_not_found: DAG 'nope' not found; list DAGs with GET /api/v1/dags"),
        (["runs", "show", "99"], ExitCode.NOT_FOUND, "run_not_found: run 99 not found; list runs with GET /api/v1/runs"),
        (["agents", "show", "nope"], ExitCode.NOT_FOUND, "agent_not_found: agent 'nope' not found; list agents with GET /api/v1/agents"),
        (["runs", "list", "--dag", "nope"], ExitCode.API_ERROR, "invalid_request: unknown dag_id 'nope'; list DAGs with GET /api/v1/dags"),
        (["agents", "list", "--label", "site"], ExitCode.API_ERROR, "invalid_request: label filter 'site' is not key=value, e.g. label=site=berlin"),
        (["runs", "list", "--limit", "5000"], ExitCode.API_ERROR, "invalid_request: query.limit: Input should be less than or equal to 1000"),
        (["dags", "trigger", "fleet_health", "--conf", "{oops"], ExitCode.USAGE,
         "--conf is not valid JSON (Expecting property name enclosed in double quotes at column 2); example: --conf '{\"key\": \"value\"}'"),
        (["dags", "trigger", "fleet_health", "--conf", "[1]"], ExitCode.USAGE, "--conf must be a JSON object like '{\"key\": \"value\"}', not list"),
    ],
)
def test_api_errors_are_one_actionable_line_with_a_named_exit_code(cli: Cli, argv: list[str], exit_code: ExitCode, message: str) -> None:
    assert cli(*argv) == (exit_code, "", f"outpost: error: {message}\n")


def test_a_hub_that_is_not_running_says_how_to_start_one(capsys: pytest.CaptureFixture[str]) -> None:
    port = _unused_port()
    code = main(["--hub", f"http://127.0.0.1:{port}", "dags", "list"])
    assert code == ExitCode.HUB_UNREACHABLE
    assert capsys.readouterr().err == (
        f"outpost: error: cannot reach the hub at http://127.0.0.1:{port} (connection refused); "
        "start one with 'outpost-hub standalone' (or 'outpost-hub api'), or point --hub / OUTPOST_HUB_URL at a running hub\n"
    )


def test_a_url_that_is_not_an_outpost_hub_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with _plain_http_server() as url:
        code = main(["--hub", url, "runs", "list"])
    assert code == ExitCode.API_ERROR
    assert capsys.readouterr().err == f"outpost: error: {url} answered HTTP 404 without an Outpost error body; is --hub pointing at an Outpost hub?\n"


def test_a_hub_url_without_scheme_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hub", "127.0.0.1:8080", "dags", "list"]) == ExitCode.USAGE
    assert capsys.readouterr().err == "outpost: error: --hub '127.0.0.1:8080' is not an http:// or https:// URL, e.g. http://127.0.0.1:8080\n"


def test_hub_url_from_the_environment_or_after_the_command(live_hub: tuple[Hub, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    url = live_hub[1]
    monkeypatch.setenv("OUTPOST_HUB_URL", url)
    assert main(["runs", "show", "1", "-o", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == 1
    monkeypatch.setenv("OUTPOST_HUB_URL", f"http://127.0.0.1:{_unused_port()}")
    assert main(["runs", "show", "1", "-o", "json", "--hub", url]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == 1


# --- help and the installed command ---------------------------------------------


def test_every_command_has_help_with_an_example_and_its_environment(capsys: pytest.CaptureFixture[str]) -> None:
    found = commands(build_parser())
    names = {words for words, _ in found}
    assert {("dags", "list"), ("runs", "show"), ("runs", "clear"), ("runs", "mark"), ("runs", "rerun"), ("pools", "set"), ("deadline-misses", "list")} <= names
    assert len(found) >= 18
    for words, _ in found:
        with pytest.raises(SystemExit) as exit_info:
            main([*words, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: outpost {' '.join(words)} "), words
        assert f"examples:\n  outpost {' '.join(words)}" in text, words
        assert "environment:\n  OUTPOST_HUB_URL" in text and "--hub URL" in text, words
        if words[-1] in ("list", "show") or words == ("import-errors",):
            assert "-o {table,json}, --output {table,json}" in text, words


def test_a_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dags"])
    assert exit_info.value.code == ExitCode.USAGE
    assert "the following arguments are required: COMMAND" in capsys.readouterr().err


def test_the_installed_outpost_command(live_hub: tuple[Hub, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OUTPOST_HUB_URL"}
    ok = subprocess.run([str(OUTPOST), "--hub", live_hub[1], "runs", "list", "-o", "json"], capture_output=True, text=True, timeout=30, env=env)
    assert ok.returncode == 0, ok.stderr
    assert [r["id"] for r in json.loads(ok.stdout)["items"]] == [3, 2, 1]
    missing = subprocess.run([sys.executable, "-m", "hub.ctl", "--hub", live_hub[1], "agents", "show", "nope"], capture_output=True, text=True, timeout=30, env=env)
    assert (missing.returncode, missing.stdout) == (ExitCode.NOT_FOUND, "")
    assert missing.stderr == "outpost: error: agent_not_found: agent 'nope' not found; list agents with GET /api/v1/agents\n"


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _plain_http_server:
    """Some other web server: answers 404 with HTML."""

    def __enter__(self) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = b"<html>not here</html>"
                self.send_response(404)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
