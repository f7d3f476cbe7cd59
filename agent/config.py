"""``agent.toml``: the agent's configuration, validated in one place.

Values come from the TOML file, then from ``EDGEFLEET_AGENT__*`` environment variables, where a
double underscore walks into tables: ``EDGEFLEET_AGENT__API__PORT=9000`` sets ``[api] port``. The old
form (``EDGEFLEET_API__PORT``) still works for one release, with a warning; variables of the other
commands (``EDGEFLEET_SERVER``, ``EDGEFLEET_TOKEN``, ``EDGEFLEET_SERVER_*``...) are never read here. Errors name the key
and, where the key is in the file, its line. Nothing here does I/O beyond reading the file given;
secrets are ``SecretStr`` and never printed.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edgefleet.agent.http import LOOPBACK_HOSTS, Limits
from edgefleet.agent.telemetry.config import MqttFleetConfig, MqttLocalConfig
from edgefleet.errors import ConfigError
from edgefleet.tomlconf import problems

__all__ = [
    "MIN_TOKEN_LENGTH",
    "AgentConfig",
    "ApiConfig",
    "HardwareConfig",
    "ModelConfig",
    "MqttConfig",
    "UpdatesConfig",
    "apply_identity",
    "config_from_dict",
    "identity_path",
    "load_config",
    "parse_config",
]


log = logging.getLogger(__name__)

ENV_PREFIX = "EDGEFLEET_AGENT__"  # EDGEFLEET_AGENT__API__PORT=9000 sets [api] port
LEGACY_PREFIX = "EDGEFLEET_"  # EDGEFLEET_API__PORT: the old form, read for one more release
SERVER_PREFIX = "EDGEFLEET_SERVER_"  # the fleet server's settings
# Documented variables of other commands: never agent.toml overrides, whatever their spelling.
NOT_AGENT = frozenset(
    {"EDGEFLEET_SERVER", "EDGEFLEET_TOKEN", "EDGEFLEET_CA_CERT", "EDGEFLEET_ENROLL_TOKEN", "EDGEFLEET_CLI_CONFIG"}
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(_Strict):
    """The local inference API (Open Inference Protocol over HTTP)."""

    enabled: bool = Field(default=True, description="serve the local API; false: open no port at all (flows still run)")
    host: str = Field(default="127.0.0.1", description="address to listen on; keep it on loopback")
    port: int = Field(default=8500, ge=0, le=65535, description="TCP port; 0 picks a free one")
    uds: Path | None = Field(default=None, description="also listen on this Unix socket")
    max_body_bytes: int = Field(
        default=64 << 20, ge=1024, le=1 << 31, description="binary (OIP binary tensor) request body limit, bytes"
    )
    max_json_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        le=1 << 31,
        description="JSON request body limit (also a binary body's JSON head), bytes",
    )
    max_decompressed_bytes: int = Field(
        default=64 << 20, ge=1024, le=1 << 31, description="a gzip/deflate body once decoded, bytes"
    )
    max_buffered_bytes: int = Field(
        default=96 << 20,
        ge=1024,
        le=1 << 33,
        description="request bodies buffered at once over all connections, bytes",
    )
    max_connections: int = Field(default=64, ge=1, le=10000, description="open connections at once")
    header_timeout: float = Field(default=10.0, gt=0, le=3600, description="seconds to send a request's headers")
    request_timeout: float = Field(default=60.0, gt=0, le=3600, description="seconds to send a whole request body")
    keepalive_timeout: float = Field(default=30.0, gt=0, le=3600, description="seconds an idle connection stays open")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names accepted besides localhost, 127.0.0.1, [::1] and `host` ('*': any)",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Origin header values accepted, e.g. 'http://localhost:3000' (empty: none; '*': any)",
    )
    workers: int | None = Field(default=None, ge=1, le=64, description="inference threads (default: cores + 2)")
    max_image_pixels: int = Field(
        default=8 << 20,
        ge=1,
        le=1 << 28,
        description="an image posted to /predict: width x height at most, read from its header before decoding "
        "(4K UHD fits; decoding and a pipeline's steps can take ~20 bytes a pixel, two images at a time)",
    )
    recent_predictions: int = Field(
        default=1024, ge=1, le=1 << 20, description="/predict ids remembered for feedback (a ring, in memory)"
    )
    token_file: Path | None = Field(
        default=None, description="file holding the API token (its first line); instead of `token`"
    )
    token: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description="API token clients send as `Authorization: Bearer ...`; required unless `host` is loopback",
    )

    @field_validator("token")
    @classmethod
    def _token_beyond_loopback(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        host, token_file = info.data.get("host"), info.data.get("token_file")
        if v is not None:
            if token_file is not None:
                raise ValueError("give token or token_file, not both")
            if len(v.get_secret_value()) < MIN_TOKEN_LENGTH:
                raise ValueError(f"must be at least {MIN_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 32`)")
        elif token_file is None and isinstance(host, str) and not is_loopback(host):
            raise ValueError(
                f"listening on {host!r}, beyond loopback, requires an API token: set [api] token or token_file "
                "(EDGEFLEET_AGENT__API__TOKEN_FILE), which clients send as `Authorization: Bearer ...`"
            )
        return v

    @property
    def has_token(self) -> bool:
        return self.token is not None or self.token_file is not None

    def limits(self) -> Limits:
        """The HTTP server's limits and allow-lists for this config."""
        host = self.host.lower()
        listen = f"[{host}]" if ":" in host else host
        return Limits(
            max_body_bytes=self.max_body_bytes,
            max_json_bytes=self.max_json_bytes,
            max_decompressed_bytes=self.max_decompressed_bytes,
            max_buffered_bytes=self.max_buffered_bytes,
            max_connections=self.max_connections,
            header_timeout=self.header_timeout,
            request_timeout=self.request_timeout,
            keepalive_timeout=self.keepalive_timeout,
            # With a token, a browser tricked by DNS rebinding gets only 401s (it cannot send the token),
            # so any Host is fine unless allowed_hosts says otherwise.
            allowed_hosts=frozenset({"*"})
            if self.has_token and not self.allowed_hosts
            else frozenset({*LOOPBACK_HOSTS, listen, *(h.lower() for h in self.allowed_hosts)}),
            allowed_origins=frozenset(o.lower().rstrip("/") for o in self.allowed_origins),
        )


MIN_TOKEN_LENGTH = 16


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a name (or "", every address): it may resolve to anything


class ModelConfig(_Strict):
    """A model to serve: a bundle (served under its manifest name) or a bare model file (its stem)."""

    path: Path
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    threads: int | None = Field(default=None, ge=1, le=256, description="runtime threads (default: profile's)")
    backend: Literal["onnx", "tflite"] | None = None


class HardwareConfig(_Strict):
    profile: str | None = Field(default=None, description="profile name or file; detected when absent")
    overrides: dict[str, Any] = Field(default_factory=dict, description="profile fields to override")


class UpdatesConfig(_Strict):
    """``[updates]``: how an enrolled agent follows its fleet server (ignored without an identity)."""

    enabled: bool = Field(
        default=True, description="check in and install what the server assigns (needs enrollment)"
    )
    checkin_interval: float | None = Field(
        default=None, ge=0.1, le=86400,
        description="seconds between check-ins; default 60, or 900 with [mqtt.fleet] (the server's cmd brings "
        "changes at once, so polls can be rare)",
    )
    max_metadata_age: float = Field(
        default=3600.0, ge=1, le=20 * 3600,
        description="refresh TUF metadata at least this often (seconds), whatever the check-in says; below the "
        "timestamp's 1-day expiry, so a server answering 304 forever cannot hide a freeze",
    )
    probation_inferences: int = Field(default=50, ge=0, le=10**7, description="runtime calls a new version must serve")
    probation_seconds: float = Field(default=30.0, ge=0, le=86400, description="and for at least this long (seconds)")
    probation_max_seconds: float = Field(
        default=600.0, ge=0, le=7 * 86400,
        description="commit after this long even with fewer inferences (an idle device does not wait forever)",
    )
    max_error_rate: float = Field(default=0.02, ge=0, le=1, description="runtime errors per call allowed in probation")
    max_latency_ratio: float = Field(
        default=2.0, ge=1, le=1000, description="p95 latency bound vs the previous version"
    )
    latency_slack_ms: float = Field(
        default=2.0, ge=0, le=60000, description="absolute slack added to the latency bound (noise at microseconds)"
    )
    max_attempts: int = Field(default=8, ge=1, le=1000, description="transient failures before a target is given up")
    backoff_max: float = Field(default=300.0, ge=0.1, le=86400, description="longest pause between retries (seconds)")
    renew_days_before: float = Field(default=30.0, ge=0, le=3650, description="renew the certificate this early (days)")
    max_probation_restarts: int = Field(
        default=3, ge=1, le=100, description="agent restarts during one probation before the version is rolled back"
    )
    shadow_max_rate: float = Field(
        default=5.0, ge=0, le=1000,
        description="live calls a second a shadow candidate also runs on, at most (off the serving path)",
    )
    shadow_queue: int = Field(
        default=2, ge=1, le=64, description="live inputs held for a busy shadow candidate, at most"
    )


class MqttConfig(_Strict):
    """``[mqtt.fleet]``: the fleet's broker (telemetry, events, status, ``cmd``; TLS with the device
    certificate); ``[mqtt.local]``: a broker where local sensors and apps publish (``feedback``)."""

    fleet: MqttFleetConfig | None = Field(default=None, description="the fleet's broker; none: no telemetry")
    local: MqttLocalConfig | None = Field(default=None, description="a local broker for feedback from apps")


class AgentConfig(_Strict):
    device_id: str = Field(default="", max_length=128, description="this device's id (set at enrollment)")
    state_dir: Path = Field(default=Path("/var/lib/edgefleet"), description="models, queues and keys live here")
    server_url: str | None = Field(default=None, description="fleet server URL (updates, enrollment)")
    ca_cert: Path | None = Field(
        default=None, description="fleet CA certificate to verify server_url with (set by enrollment)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api: ApiConfig = Field(default_factory=ApiConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    updates: UpdatesConfig = Field(default_factory=UpdatesConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    # FlowConfig objects after parse_config: validated there, so that the sources' and sinks' modules
    # are imported only by an agent that has flows.
    flows: list[Any] = Field(default_factory=list, description="sources -> model -> sinks")
    shutdown_timeout: float = Field(default=30.0, gt=0, le=600, description="seconds to finish in-flight work")

    @model_validator(mode="after")
    def _unique_names(self) -> AgentConfig:
        # A bundle without `name` is served under its manifest's name, which only loading it tells
        # (the agent checks those when it loads them); here, the names the config itself decides.
        seen: dict[str, Path] = {}
        for m in self.models:
            if not m.name and m.path.suffix == ".efb":
                continue
            n = m.name or _stem(m.path)
            if n in seen:
                raise ValueError(
                    f"models: {seen[n]} and {m.path} are both served as {n!r}; give one of them another name"
                )
            seen[n] = m.path
        return self


def _stem(p: Path) -> str:
    return p.stem


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Apply ``EDGEFLEET_AGENT__*`` variables (and, for one release, the old ``EDGEFLEET_<SECTION>__<KEY>``
    form, with a warning) to ``data`` in place; returns key path -> variable name.

    Variables of other commands (``EDGEFLEET_SERVER``, ``EDGEFLEET_TOKEN``, ``EDGEFLEET_SERVER_*``...)
    are not the agent's and are left alone. Raises ConfigError when a variable walks into a value
    that is not a table.
    """
    applied: dict[tuple[str, ...], str] = {}
    fields = set(AgentConfig.model_fields)
    for key, raw in sorted(env.items()):
        if key.startswith(ENV_PREFIX):
            rest = key[len(ENV_PREFIX) :]
        elif key.startswith(LEGACY_PREFIX) and key not in NOT_AGENT and not key.startswith(SERVER_PREFIX):
            rest = key[len(LEGACY_PREFIX) :]
            if rest.lower().split("__")[0] not in fields:
                continue  # another command's variable (EDGEFLEET_SERVER_DB_URL, EDGEFLEET_CA_CERT...)
            new = ENV_PREFIX + rest
            log.warning("%s is deprecated and will stop working in the next release; use %s", key, new)
        else:
            continue
        parts = rest.lower().split("__")
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{key}: {'.'.join(parts[:-1])} is not a table")
            node = child
        node[parts[-1]] = value
        applied[tuple(parts)] = key
    return applied


def parse_config(
    text: str, where: str = "agent.toml", env: Mapping[str, str] | None = None, base: Path | None = None
) -> AgentConfig:
    """Parse TOML text (plus environment overrides); relative paths are taken from ``base``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from e
    return _validate(data, text, where, env, base)


def config_from_dict(data: dict[str, Any], env: Mapping[str, str] | None = None) -> AgentConfig:
    """An AgentConfig from values given on a command line, plus environment overrides.
    Raises ConfigError naming the key (or the variable it came from)."""
    return _validate(data, "", "agent options", env, None)


def _validate(
    data: dict[str, Any], text: str, where: str, env: Mapping[str, str] | None, base: Path | None
) -> AgentConfig:
    from_env = _env_overrides(data, os.environ if env is None else env)
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: " + "; ".join(problems(e, text, from_env))) from e
    if cfg.flows:
        cfg.flows = _flows(cfg.flows, text, where, from_env)
    if base is not None:
        for m in cfg.models:
            if not m.path.is_absolute():
                m.path = base / m.path
        if not cfg.state_dir.is_absolute():
            cfg.state_dir = base / cfg.state_dir
    return cfg


def _flows(raw: list[Any], text: str, where: str, from_env: dict[tuple[str, ...], str]) -> list[Any]:
    from edgefleet.agent.flow import FlowConfig

    flows = []
    for i, item in enumerate(raw):
        try:
            flows.append(FlowConfig.model_validate(item))
        except ValidationError as e:
            raise ConfigError(f"{where}: " + "; ".join(problems(e, text, from_env, prefix=("flows", i)))) from e
    names = [f.name for f in flows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{where}: flows: two flows share the name(s) {dup}")
    return flows


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None, identity: bool = True
) -> AgentConfig:
    """Read and validate ``agent.toml``, then (unless ``identity`` is false) apply the enrolled
    identity from ``STATE_DIR/identity/identity.json``. Raises :class:`ConfigError` naming the key
    and line, or both values and files when agent.toml contradicts the identity."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from e
    cfg = parse_config(text, str(p), env, base=p.resolve().parent)
    return apply_identity(cfg, str(p)) if identity else cfg


IDENTITY_FILE = "identity.json"  # under STATE_DIR/identity/, written by `edgefleet agent enroll`


def identity_path(state_dir: Path) -> Path:
    return state_dir / "identity" / IDENTITY_FILE


def apply_identity(cfg: AgentConfig, where: str = "agent.toml") -> AgentConfig:
    """Take ``device_id``, ``server_url`` and ``ca_cert`` from the enrolled identity, when there is one.

    The identity wins over agent.toml; agent.toml may leave those keys out or repeat the same values.
    Raises ConfigError naming both values and both files when they differ, or when the identity file
    is unreadable.
    """
    path = identity_path(cfg.state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return cfg
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the device identity: {e.strerror or e}") from e
    try:
        ident = json.loads(raw)
        device_id, server_url = ident["device_id"], ident["server_url"]
        if not isinstance(device_id, str) or not isinstance(server_url, str):
            raise TypeError("device_id and server_url must be strings")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path}: not a device identity ({e}); re-enroll with `edgefleet agent enroll --force`"
        ) from e
    for key, ours, theirs in (("device_id", cfg.device_id, device_id), ("server_url", cfg.server_url, server_url)):
        if ours and ours.rstrip("/") != theirs.rstrip("/"):
            raise ConfigError(
                f"{key}: {where} says {ours!r} but this device is enrolled as {theirs!r} ({path}); "
                f"remove {key} from {where} (the identity wins) or re-enroll"
            )
    update: dict[str, Any] = {"device_id": device_id, "server_url": server_url}
    if ident.get("ca_cert"):
        update["ca_cert"] = Path(ident["ca_cert"])
    return cfg.model_copy(update=update)
