"""Agent settings: file, environment and flags; every bad value names key and reason."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agent.config import AgentSettings, ConfigError, describe, load_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def test_defaults_apply_when_only_the_agent_id_is_given(tmp_path):
    settings = load_settings(write(tmp_path, 'agent_id = "pump-7"\n'), env={})
    assert settings.agent_id == "pump-7"
    assert settings.state_dir == Path("/var/lib/outpost-agent")
    assert (settings.broker_host, settings.broker_port) == ("127.0.0.1", 1883)
    assert settings.concurrency == 2 and settings.heartbeat_interval == 10.0
    assert settings.sqlite_synchronous == "FULL" and settings.inbox_retention == 604800
    assert settings.inbox_path == Path("/var/lib/outpost-agent/inbox.sqlite3")
    assert settings.outbox_path.name == "outbox.sqlite3" and settings.work_dir.name == "work"


def test_environment_overrides_file_and_flags_override_environment(tmp_path):
    path = write(tmp_path, 'agent_id = "from-file"\nbroker_port = 1000\nconcurrency = 3\n[labels]\nsite = "north"\n')
    env = {"OUTPOST_AGENT_BROKER_PORT": "2000", "OUTPOST_AGENT_COMMAND_ALLOWLIST": "uptime, df", "OUTPOST_AGENT_LABELS": "role=gw"}
    settings = load_settings(path, env=env, overrides={"broker_port": 3000, "labels": {"rack": "4"}})
    assert settings.agent_id == "from-file"
    assert settings.broker_port == 3000
    assert settings.concurrency == 3
    assert settings.command_allowlist == ("uptime", "df")
    # Labels from flags are added to the others, not replacing them.
    assert settings.labels == {"role": "gw", "rack": "4"}


def test_unknown_key_in_the_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, 'agent_id = "a"\nbroker_prot = 1883\n'), env={})
    assert info.value.key == "broker_prot"
    assert "unknown setting" in str(info.value) and str(tmp_path) in str(info.value)


def test_unknown_environment_variable_with_the_prefix_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, 'agent_id = "a"\n'), env={"OUTPOST_AGENT_CONCURENCY": "4"})
    assert info.value.key == "concurency" and "OUTPOST_AGENT_CONCURENCY" in str(info.value)


@pytest.mark.parametrize(
    ("line", "key", "reason"),
    [
        ('broker_port = 0', "broker_port", "between 1 and 65535"),
        ('broker_port = "1883"', "broker_port", "must be an integer"),
        ('concurrency = true', "concurrency", "must be an integer"),
        ('heartbeat_interval = 0', "heartbeat_interval", "greater than 0"),
        ('sqlite_synchronous = "OFF"', "sqlite_synchronous", "NORMAL, FULL"),
        ('command_allowlist = "uptime"', "command_allowlist", "list of strings"),
        ('tls_ca = "/nonexistent/ca.pem"', "tls_ca", "no such file"),
        ('labels = {site = 1}', "labels", "table of string to string"),
    ],
)
def test_bad_value_stops_startup_with_key_value_and_reason(tmp_path, line, key, reason):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f'agent_id = "a"\n{line}\n'), env={})
    assert info.value.key == key
    assert reason in str(info.value)
    assert str(tmp_path) in str(info.value)  # where the value came from


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ConfigError) as info:
        load_settings(env={"OUTPOST_AGENT_AGENT_ID": "a", "OUTPOST_AGENT_KEEPALIVE": "soon"})
    assert info.value.key == "keepalive" and "OUTPOST_AGENT_KEEPALIVE" in str(info.value)


def test_invalid_agent_id_is_refused():
    with pytest.raises(ConfigError) as info:
        AgentSettings(agent_id="bad/id")
    assert info.value.key == "agent_id"


def test_missing_agent_id_says_how_to_set_it(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "broker_port = 1883\n"), env={})
    assert info.value.key == "agent_id" and "--agent-id" in str(info.value)


def test_broken_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, "agent_id = \n"), env={})
    assert "not valid TOML" in str(info.value)


def test_password_never_appears_in_error_messages():
    with pytest.raises(ConfigError) as info:
        AgentSettings(agent_id="a", broker_password=12345)  # type: ignore[arg-type]
    assert "12345" not in str(info.value) and "***" in str(info.value)


def test_settings_are_immutable():
    settings = AgentSettings(agent_id="a")
    with pytest.raises(AttributeError):
        settings.agent_id = "b"  # type: ignore[misc]


def test_example_file_is_valid_and_documents_every_setting():
    settings = load_settings(EXAMPLE, env={})
    assert settings.agent_id
    text = EXAMPLE.read_text()
    for key, _default, _doc in describe():
        assert re.search(rf"^(#\s*)?(\[{key}\]|{key}\s*=)", text, re.MULTILINE), f"{key} is not documented in {EXAMPLE.name}"


def test_job_limits_and_per_type_tables_from_file_and_environment(tmp_path):
    path = write(tmp_path, 'agent_id = "a"\njob_cpu_seconds = 60\njob_type_concurrency = { "firmware.update" = 1 }\njob_type_memory_mb = { "noop" = 64 }\n')
    settings = load_settings(path, env={"OUTPOST_AGENT_JOB_TYPE_CPU_SECONDS": "command.run=5, noop=0", "OUTPOST_AGENT_MAX_LOG_BYTES": "4096"})
    assert settings.job_cpu_seconds == 60 and settings.job_memory_mb == 1024
    assert settings.job_type_concurrency == {"firmware.update": 1} and settings.job_type_memory_mb == {"noop": 64}
    assert settings.job_type_cpu_seconds == {"command.run": 5, "noop": 0} and settings.max_log_bytes == 4096
    with pytest.raises(ConfigError, match="job_type_concurrency.*between 1 and 64"):
        load_settings(write(tmp_path, 'agent_id = "a"\njob_type_concurrency = { "x" = 0 }\n'), env={})
    with pytest.raises(ConfigError, match="table of string to integer"):
        load_settings(write(tmp_path, 'agent_id = "a"\njob_type_memory_mb = { "x" = "big" }\n'), env={})
    with pytest.raises(ConfigError, match="name=integer"):
        load_settings(None, env={"OUTPOST_AGENT_AGENT_ID": "a", "OUTPOST_AGENT_JOB_TYPE_CONCURRENCY": "x=one"})


def _enrolled(state: Path, **values: object) -> None:
    folder = state / "identity"
    folder.mkdir(parents=True)
    (folder / "enrolment.json").write_text(json.dumps(values))


def test_enrolment_fills_what_the_file_leaves_unset_and_the_file_wins(tmp_path):
    state = tmp_path / "state"
    _enrolled(state, agent_id="pump-7", broker_host="broker.example", broker_port=8883, broker_tls=True,
              broker_username="pump-7", broker_password="pw", labels={"site": "north", "rack": "r1"})
    path = write(tmp_path, f'state_dir = "{state}"\nbroker_port = 1884\n[labels]\nrack = "r9"\n')
    settings = load_settings(path, env={})
    assert (settings.agent_id, settings.broker_host, settings.broker_port, settings.broker_tls) == ("pump-7", "broker.example", 1884, True)
    assert (settings.broker_username, settings.broker_password) == ("pump-7", "pw")
    assert settings.labels == {"site": "north", "rack": "r9"}
    assert load_settings(path, env={"OUTPOST_AGENT_BROKER_TLS": "false"}).broker_tls is False


def test_an_agent_id_other_than_the_enrolled_one_is_an_error(tmp_path):
    state = tmp_path / "state"
    _enrolled(state, agent_id="pump-7")
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, f'state_dir = "{state}"\nagent_id = "pump-8"\n'), env={})
    assert info.value.key == "agent_id" and "enrolled as 'pump-7'" in str(info.value)


def test_a_damaged_enrolment_file_is_an_error_naming_it(tmp_path):
    state = tmp_path / "state"
    (state / "identity").mkdir(parents=True)
    (state / "identity" / "enrolment.json").write_text("{not json")
    with pytest.raises(ConfigError, match="enrolment.json"):
        load_settings(write(tmp_path, f'state_dir = "{state}"\n'), env={})
