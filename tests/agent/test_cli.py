"""``outpost-agent``: help with examples, config check exit codes, queue listing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.cli import ExitCode, _overrides, build_parser, main
from agent.config import load_settings
from agent.queues import Inbox, Outbox
from shared.hlc import HLC
from shared.messages import Assign, Result

from .conftest import REPO

COMMANDS = [[], ["run"], ["check"], ["config"], ["config", "check"], ["queue"], ["queue", "ls"], ["emit"], ["keygen"], ["trust"], ["trust", "add"], ["trust", "list"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "outpost-agent")
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "outpost-agent " in out
    assert "OUTPOST_AGENT_" in out


def test_python_dash_m_agent_is_the_cli():
    done = subprocess.run([sys.executable, "-m", "agent", "--version"], cwd=REPO, capture_output=True, text=True, timeout=20)
    assert done.returncode == 0 and done.stdout.strip() == "outpost-agent 0.1.0"


def config(tmp_path, text):
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_check_accepts_a_good_config(tmp_path, capsys):
    assert main(["check", "--config", config(tmp_path, 'agent_id = "pump-7"\n')]) == ExitCode.OK
    assert "configuration OK: agent pump-7" in capsys.readouterr().out


def test_check_names_the_bad_key_and_reason_and_exits_2(tmp_path, capsys):
    path = config(tmp_path, 'agent_id = "pump-7"\nconcurrency = 0\n')
    assert main(["config", "check", "--config", path]) == ExitCode.CONFIG_ERROR == 2
    err = capsys.readouterr().err
    assert "concurrency = 0: must be between 1 and 64" in err and path in err


def test_run_with_a_bad_config_exits_2_before_doing_anything(tmp_path):
    path = config(tmp_path, f'agent_id = "pump-7"\nstate_dir = "{tmp_path / "state"}"\nbroker_port = 70000\n')
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--config", path], cwd=REPO, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2 and "broker_port = 70000" in done.stderr
    assert not (tmp_path / "state").exists()


def test_run_flags_override_the_file(tmp_path, capsys):
    path = config(tmp_path, 'agent_id = "from-file"\n')
    args = build_parser().parse_args(["run", "--config", path, "--agent-id", "pump-9", "--broker", "mqtt.local:8883", "--label", "site=north", "--state-dir", "/srv/x"])
    settings = load_settings(args.config, env={}, overrides=_overrides(args))
    assert (settings.agent_id, settings.broker_host, settings.broker_port) == ("pump-9", "mqtt.local", 8883)
    assert settings.labels == {"site": "north"} and str(settings.state_dir) == "/srv/x"


def test_bad_flag_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "--config", "x.toml", "--broker", "no-port"])
    assert info.value.code == ExitCode.CONFIG_ERROR
    assert "HOST:PORT" in capsys.readouterr().err


def test_check_connect_reports_an_unreachable_broker_with_exit_3(tmp_path, capsys):
    from tests.conftest import free_port

    path = config(tmp_path, f'agent_id = "pump-7"\nbroker_port = {free_port()}\n')
    assert main(["check", "--config", path, "--connect"]) == ExitCode.BROKER_UNREACHABLE == 3
    assert "unreachable" in capsys.readouterr().err


def test_queue_ls_shows_depth_and_items(tmp_path, capsys):
    state = tmp_path / "state"
    inbox, outbox = Inbox(state / "inbox.sqlite3"), Outbox(state / "outbox.sqlite3")
    inbox.put(Assign("a-1", "d", "r", "t", 1, "noop", not_before=1_767_225_600.0))
    inbox.put(Assign("a-2", "d", "r", "t", 1, "diagnostics.collect"))
    inbox.claim()
    outbox.put_result(Result("a-0", 1, "success", "ok"), HLC(1, 0, "pump-7"))
    inbox.close()
    outbox.close()
    path = config(tmp_path, f'agent_id = "pump-7"\nstate_dir = "{state}"\n')

    assert main(["queue", "ls", "--config", path, "-o", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inbox"]["depth"] == 2
    assert [(i["assignment_id"], i["status"], i["job_type"]) for i in report["inbox"]["items"]] == [("a-1", "claimed", "noop"), ("a-2", "ready", "diagnostics.collect")]
    assert report["outbox"]["items"] == [{"assignment_id": "a-0", "status": "waiting", "result": "success", "error": None, "hlc": "0000000000001.00000@pump-7"}]

    assert main(["queue", "ls", "--config", path]) == 0
    table = capsys.readouterr().out
    assert "inbox: 2 not finished" in table and "ASSIGNMENT_ID" in table and "diagnostics.collect" in table
    assert "outbox: 1 not acknowledged" in table


def test_queue_ls_on_a_fresh_device_creates_nothing(tmp_path, capsys):
    state = tmp_path / "state"
    path = config(tmp_path, f'agent_id = "pump-7"\nstate_dir = "{state}"\n')
    assert main(["queue", "ls", "--config", path]) == 0
    assert "(empty)" in capsys.readouterr().out
    assert not state.exists()


def test_emit_queues_an_agent_event_in_the_outbox_the_running_agent_drains(tmp_path, capsys):
    state = tmp_path / "state"
    path = config(tmp_path, f'agent_id = "pump-7"\nstate_dir = "{state}"\n')
    assert main(["emit", "battery_low", "--data", '{"level": 0.08}', "--config", path]) == ExitCode.OK
    out = capsys.readouterr().out
    assert out.startswith("queued agent event battery_low (")
    outbox = Outbox(state / "outbox.sqlite3")
    try:
        item = outbox.claim()
        assert item is not None and item.result.name == "battery_low" and item.result.payload == {"level": 0.08}
        assert item.assignment_id == f"event/{item.result.event_id}" and item.result.event_id in out and item.hlc.node == "pump-7"
    finally:
        outbox.close()
    assert main(["queue", "ls", "--config", path, "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["outbox"]["items"]
    assert [(r["status"], r["result"]) for r in rows] == [("in_flight", "event battery_low")]


@pytest.mark.parametrize(("argv", "message"), [
    (["emit", "battery low"], "event name 'battery low' is invalid"),
    (["emit", "battery_low", "--data", "[1]"], "--data must be a JSON object"),
    (["emit", "battery_low", "--data", "{oops"], "--data is not JSON"),
    (["emit", "battery_low", "--data", json.dumps({"blob": "x" * 20000})], "over 16384"),
])
def test_emit_refuses_bad_events_before_queueing_them(tmp_path, capsys, argv, message):
    state = tmp_path / "state"
    path = config(tmp_path, f'agent_id = "pump-7"\nstate_dir = "{state}"\n')
    assert main([*argv, "--config", path]) == ExitCode.CONFIG_ERROR
    assert message in capsys.readouterr().err
    assert not (state / "outbox.sqlite3").exists()


def test_keygen_makes_the_device_key_once_and_trust_add_records_hub_keys(tmp_path, capsys):
    from agent.identity import device_key_path, trusted_hub_keys
    from shared.signing import PublicKey, SigningKey

    path = config(tmp_path, f'agent_id = "pump-7"\nstate_dir = "{tmp_path / "state"}"\n')
    assert main(["keygen", "--config", path]) == ExitCode.OK
    first = capsys.readouterr().out.strip()
    assert main(["keygen", "--config", path]) == ExitCode.OK
    assert capsys.readouterr().out.strip() == first  # kept, not replaced
    settings = load_settings(path)
    assert device_key_path(settings).stat().st_mode & 0o777 == 0o600
    assert SigningKey.load(device_key_path(settings)).public.to_text() == PublicKey.from_text(first).to_text()

    hub = SigningKey.generate().public
    assert main(["trust", "add", hub.to_text(), "--config", path]) == ExitCode.OK
    assert main(["trust", "add", hub.to_text(), "--config", path]) == ExitCode.OK
    assert "already trusted" in capsys.readouterr().out
    assert list(trusted_hub_keys(settings)) == [hub.kid]
    assert main(["trust", "list", "--config", path]) == ExitCode.OK
    assert hub.to_text() in capsys.readouterr().out
    assert main(["trust", "add", "ed25519:short", "--config", path]) == ExitCode.CONFIG_ERROR
    assert "public key" in capsys.readouterr().err
