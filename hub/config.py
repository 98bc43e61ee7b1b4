"""``HubSettings``: every hub setting, one typed object per process.

Sources, later wins: built-in defaults, a TOML file (``--config``), the
environment (``OUTPOST_HUB_<FIELD>``), command-line flags. Unknown keys and
bad values stop start-up with the key, the value and the reason.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from hub.errors import ConfigError

EXAMPLE_DAGS = Path(__file__).parent / "example_dags"


class HubSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="OUTPOST_HUB_", extra="forbid", frozen=True)

    state_dir: Path = Field(Path(".outpost/hub"), description="Folder for the SQLite database and hub state.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite in state_dir (hub.db). PostgreSQL: postgresql+psycopg://user@host/db.")
    dags_folder: Path = Field(EXAMPLE_DAGS, description="Folder of DAG files (*.py).")
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field("FULL", description="SQLite commit durability: FULL survives power loss (results are acknowledged after commit); NORMAL only process crashes, and is faster.")
    broker_host: str = Field("127.0.0.1", description="MQTT broker host.")
    broker_port: int = Field(1883, ge=1, le=65535, description="MQTT broker port.")
    broker_username: str | None = Field(None, description="MQTT user name of the hub.")
    broker_password: str | None = Field(None, description="MQTT password of the hub.")
    broker_tls: bool = Field(False, description="Connect to the broker over TLS, verified against broker_tls_ca or, when that is empty, the system CA store. Setting broker_tls_ca turns TLS on too.")
    broker_tls_ca: str = Field("", description="CA certificate file (PEM) the broker's certificate must chain to; setting it turns TLS on.")
    broker_tls_cert: str = Field("", description="Client certificate file (PEM) for brokers that require one (require_certificate true).")
    broker_tls_key: str = Field("", description="Private key file (PEM) of broker_tls_cert.")
    broker_admin_username: str = Field("", description="User name of the broker's dynamic-security admin client, with which the hub creates and deletes agent credentials (enrolment, revocation). Empty: broker credentials are managed outside Outpost.")
    broker_admin_password: str = Field("", description="Password of broker_admin_username.")
    agent_broker_host: str = Field("", description="Broker host name agents are told at enrolment (the name in the broker's TLS certificate). Empty: broker_host.")
    agent_broker_port: int = Field(0, ge=0, le=65535, description="Broker port agents are told at enrolment (8883 for the TLS listener). 0: broker_port.")
    agent_broker_tls: bool = Field(False, description="Tell enrolling agents to connect to the broker over TLS.")
    agent_request_window: float = Field(300.0, ge=5, le=3600, description="Seconds a signed agent HTTP request (sync) is accepted around its timestamp; the same signature twice within the window is refused as a replay.")
    mqtt_client_id: str = Field("outpost-hub", description="MQTT client id; unique per hub process.")
    mqtt_keepalive: int = Field(30, ge=5, le=65535, description="MQTT keepalive in seconds; a connection silent for about this long (a half-open link) is dropped and reopened.")
    api_host: str = Field("127.0.0.1", description="Address the REST API and dashboard listen on.")
    api_port: int = Field(8080, ge=0, le=65535, description="Port of the REST API and dashboard (0: any free port).")
    scheduler_interval: float = Field(0.5, gt=0, description="Seconds between scheduler ticks when idle.")
    redeliver_after: float = Field(30.0, gt=0, description="Re-send an assignment when no 'accepted' came back after this many seconds.")
    agent_offline_after: float = Field(35.0, gt=0, description="Mark an agent offline after this many seconds without a heartbeat.")
    max_clock_skew: float = Field(300.0, gt=0, description="Seconds a device's clock may be ahead of or behind the hub's. Past it the agent is flagged (shown in the API, CLI and dashboard; its device times are not trusted by conflict resolution) and its stamps are not merged into the hub's clock.")
    default_offline_grace: float = Field(3600.0, ge=0, description="Seconds an agent task may stay 'device_offline' before the hub gives up on that device, for tasks that set no offline_grace: a task not pinned to a device is re-targeted to another matching agent, a pinned one fails the try with device_offline (retried per its retries).")
    max_message_bytes: int = Field(256 * 1024, ge=1024, description="Largest MQTT envelope accepted or sent.")
    executor_workers: int = Field(4, ge=1, le=64, description="Long-lived worker processes that run hub tasks (Python code in DAG files) and DAG callbacks, one task at a time each.")
    executor_kill_grace: float = Field(5.0, gt=0, description="Seconds a hub-task worker gets to exit after SIGTERM (a task past its execution_timeout, or shutdown) before SIGKILL.")
    max_map_length: int = Field(1024, ge=1, description="Most task instances one mapped task (expand()) may create in a run; more fail the task with max_map_length_exceeded.")
    default_pool_slots: int = Field(128, ge=-1, description="Slots of default_pool, the pool of every task that names none, until set with 'outpost pools set default_pool N' (-1: unlimited).")
    dag_reparse_interval: float = Field(5.0, gt=0, description="Seconds between checks of the DAG folder; new and changed files are parsed then, removed files deactivate their DAGs.")
    min_file_process_interval: float = Field(30.0, ge=0, description="Seconds after which an unchanged DAG file is parsed again, so a DAG built from data the file reads follows that data (changed files are parsed at the next check anyway). 0: only changed files.")
    dag_file_processor_timeout: float = Field(30.0, gt=0, description="Seconds one DAG file may take to import; past it the file's parsing process is killed and a timeout import error recorded.")
    dag_parsing_processes: int = Field(2, ge=1, le=64, description="DAG files parsed at once, each in its own process.")
    sync_max_batch_items: int = Field(1000, ge=1, le=100_000, description="Most outbox items one HTTP sync batch may carry; more is refused with 413 batch_too_large.")
    sync_max_batch_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="Largest HTTP sync request body in bytes; more is refused with 413 batch_too_large (each envelope also obeys max_message_bytes).")
    task_log_retention_days: int = Field(30, ge=0, description="Days the hub keeps the stored logs of finished tries (by when each chunk arrived); older chunks are deleted by the scheduler in batches of at most 10,000. Logs of running tries are kept. 0: keep logs forever.")
    fernet_keys: str = Field("", repr=False, description="Comma-separated Fernet keys that encrypt variables and connections at rest; the first encrypts, all decrypt (rotation: put a new key first, run 'outpost-hub secrets rotate', then drop the old one). Required: the hub refuses to start without a valid key ('outpost-hub secrets generate-key' makes one). 'outpost-hub standalone' keeps one in <state-dir>/hub/fernet.key.")
    keys_dir: Path | None = Field(None, description="Folder of the hub's signing key ring (made on first start, mode 0700); empty: <state_dir>/keys. Every hub process of one installation must use the same ring.")
    message_ttl: float = Field(7 * 86400.0, gt=0, description="Seconds a signed message to a device (assign, cancel, ack) stays valid (its 'exp'); a device refuses it as expired after that. The default matches the broker's session expiry for agents (7 days): a device back after longer gets the assignments re-sent, freshly signed, by the hub.")
    dag_file_processor_memory_mb: int = Field(2048, ge=0, description="Memory (MB of data) one DAG file may allocate while being parsed; over it the file fails with a memory import error. 0: no limit.")
    # --- artifact store (hub.artifacts; docs/fleet.md) ---
    artifact_dir: Path | None = Field(None, description="Folder of the artifact store's firmware images; empty: <state_dir>/artifacts. Every hub process serving the API must see the same folder.")
    max_artifact_bytes: int = Field(2 * 1024**3, ge=1, description="Largest firmware image the artifact store accepts; a manifest announcing more is refused with 413 artifact_too_large.")
    release_public_keys: list[str] = Field(default_factory=list, description="Release public keys (ed25519:...) the hub checks uploaded manifests against; empty: any signed manifest is accepted (devices verify anyway; this only refuses early what they would refuse).")
    # --- authentication (hub.auth; docs/security-auth.md) ---
    secret_key: str = Field("", description="Secret that signs dashboard CSRF values; at least 32 characters, random (python -c 'import secrets; print(secrets.token_urlsafe(48))'). The hub refuses to start without one; outpost-hub standalone generates one in its state folder.")
    session_cookie_secure: bool = Field(True, description="Mark the dashboard session cookie Secure (sent over HTTPS only). Browsers also send Secure cookies to http://localhost and http://127.0.0.1; set false only to use the dashboard over plain HTTP on another address.")
    session_idle_timeout: float = Field(3600.0, gt=0, description="Seconds a dashboard session survives without a request.")
    session_max_age: float = Field(12 * 3600.0, gt=0, description="Seconds a dashboard session lasts at most, active or not; then log in again.")
    login_max_failures: int = Field(5, ge=1, description="Failed logins allowed per user name within login_failure_window; more answer 429 until the window passes.")
    login_max_failures_per_address: int = Field(20, ge=1, description="Failed logins allowed per client address within login_failure_window (any user names); refused device enrolments are counted apart with the same limit.")
    login_failure_window: float = Field(900.0, gt=0, description="Seconds over which failed logins are counted.")

    _toml_path: ClassVar[Path | None] = None

    @field_validator("database_url")
    @classmethod
    def _url_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite", "postgresql")):
            raise ValueError("only sqlite:// and postgresql+psycopg:// URLs are supported")
        return value

    @field_validator("release_public_keys")
    @classmethod
    def _release_keys(cls, value: list[str]) -> list[str]:
        from shared.signing import BadKey, PublicKey

        for text in value:
            try:
                PublicKey.from_text(text)
            except BadKey as exc:
                raise ValueError(f"{text[:40]!r} is not a public key (ed25519:<base64url>): {exc}") from None
        return value

    @property
    def artifacts_path(self) -> Path:
        """The folder of the artifact store's images."""
        return self.artifact_dir or self.state_dir / "artifacts"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'hub.db'}"

    @property
    def key_ring_dir(self) -> Path:
        """The folder of the hub's signing key ring."""
        return self.keys_dir or self.state_dir / "keys"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _TomlSource(settings_cls, cls._toml_path))

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> HubSettings:
        """Build settings from a TOML file, the environment and ``overrides``
        (CLI flags; ``None`` values are ignored). Raises ``ConfigError``."""
        given = {k: v for k, v in overrides.items() if v is not None}
        cls._toml_path = path
        try:
            return cls(**given)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid hub settings ({path or 'no file'}): {problems}") from None
        finally:
            cls._toml_path = None


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            with open(self.path, "rb") as handle:
                data = tomllib.load(handle)
        except OSError as exc:
            raise ConfigError(f"cannot read hub config {self.path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"hub config {self.path} is not valid TOML: {exc}") from None
        return data.get("hub", data)
