"""Server settings: one pydantic model, loaded from ``server.toml`` and ``EDGEFLEET_SERVER_*`` variables.

``EDGEFLEET_SERVER_PORT=9000`` sets ``port``; values are parsed as TOML literals when they can be
(``EDGEFLEET_SERVER_TRUSTED_PROXIES='["10.0.0.1"]'``), else taken as strings. Errors name the key and
the line (or the variable). No I/O happens inside the model; :func:`load_settings` reads the file.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from edgefleet.errors import ConfigError
from edgefleet.tomlconf import problems

__all__ = ["ENV_PREFIX", "Settings", "load_settings"]

ENV_PREFIX = "EDGEFLEET_SERVER_"


class Settings(BaseModel):
    """Everything the server reads at start; immutable once built."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_dir: Path = Field(default=Path("edgefleet-data"), description="database (SQLite), blobs, fleet CA")
    db_url: SecretStr | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite under data_dir; postgresql+psycopg://... for fleets"
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8400, ge=0, le=65535, description="TCP port; 0 picks a free one")
    tls_certfile: Path | None = Field(default=None, description="server certificate (PEM); TLS when set")
    tls_keyfile: Path | None = Field(default=None, description="its private key (PEM)")
    allow_plain_http_devices: bool = Field(
        default=False,
        description="accept device requests over plain HTTP (tests on loopback only; devices pin TLS otherwise)",
    )
    max_upload_bytes: int = Field(default=2 << 30, ge=1024, le=1 << 40, description="bundle upload limit, bytes")
    max_json_bytes: int = Field(
        default=1 << 20, ge=1024, le=64 << 20, description="body limit of every route but the bundle upload, bytes"
    )
    max_buffered_body_bytes: int = Field(
        default=2 << 20, ge=1 << 20, le=1 << 34,
        description="request bodies held in memory at once, over all connections (all but uploads), bytes; "
        "parsed JSON takes up to ~25x its size",
    )
    max_header_bytes: int = Field(
        default=16384, ge=1024, le=1 << 20,
        description="a request line and headers still arriving past this are a 431 (h11's bound), bytes",
    )
    header_timeout: float = Field(
        default=10.0, gt=0, le=300, description="a request's line and headers must arrive within this, s"
    )
    body_idle_timeout: float = Field(
        default=30.0, gt=0, le=3600, description="a connection whose request body stops arriving this long is closed, s"
    )
    body_timeout: float = Field(
        default=30.0, gt=0, le=3600,
        description="a body held in memory (every route but the upload) must arrive within this of its headers, s",
    )
    keep_alive_timeout: int = Field(
        default=5, ge=1, le=300, description="an idle keep-alive connection is closed after this, s"
    )
    max_connections: int = Field(
        default=1000, ge=1, le=100_000, description="open client connections; more are answered 503 and closed"
    )
    device_token_ttl: int = Field(default=900, ge=30, le=86400, description="device access token lifetime, s")
    challenge_ttl: int = Field(default=60, ge=5, le=600, description="device auth challenge lifetime, s")
    device_cert_days: int = Field(default=365, ge=1, le=3650, description="device certificate validity, days")
    online_window: int = Field(default=300, ge=10, le=86400, description="a device seen within this is online, s")
    last_seen_granularity: int = Field(
        default=60, ge=0, le=3600, description="last_seen is written at most this often per device, s"
    )
    client_cert_header: str | None = Field(
        default=None, description="header a TLS-terminating proxy puts the verified client cert in (URL-encoded PEM)"
    )
    trusted_proxies: list[str] = Field(default_factory=list, description="IPs whose client_cert_header is believed")
    migrate_on_start: bool = Field(default=True, description="apply Alembic migrations when the server starts")
    # -- telemetry ingestion from the fleet's MQTT broker (edgefleet.server.telemetry); off while mqtt_url is unset
    mqtt_url: str | None = Field(
        default=None, pattern=r"^mqtts?://[^/?#\s@]+/?$",
        description="the fleet's broker, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS); unset: no ingestion "
        "(credentials go in mqtt_username/mqtt_password, not the URL)",
    )
    mqtt_ca_cert: Path | None = Field(default=None, description="CA the broker's certificate is checked against "
                                      "(PEM; default: the system's)")
    mqtt_client_cert: Path | None = Field(default=None, description="the server's own certificate to the broker (PEM)")
    mqtt_client_key: Path | None = Field(default=None, description="its private key (PEM)")
    mqtt_username: str | None = Field(default=None, min_length=1, max_length=256, description="broker user name")
    mqtt_password: SecretStr | None = Field(default=None, description="broker password (never logged)")
    mqtt_client_id: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="MQTT client id, stable per replica (its session survives restarts); "
        "default edgefleet-server-HOSTNAME",
    )
    mqtt_shared_subscription: bool = Field(
        default=True, description="subscribe as $share/GROUP/... so replicas split the stream; false for a broker "
        "without shared subscriptions (one replica ingests)",
    )
    mqtt_share_group: str = Field(default="edgefleet-ingest", pattern=r"^[A-Za-z0-9._-]{1,64}$",
                                  description="shared subscription group the replicas join")
    mqtt_keepalive: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive, s")
    mqtt_session_expiry: int = Field(
        default=86400, ge=0, le=2**32 - 1,
        description="how long the broker keeps this replica's session (and unacknowledged messages) while it is "
        "away, s",
    )
    mqtt_receive_maximum: int = Field(
        default=1000, ge=1, le=65535, description="messages the broker may have in flight to this replica, "
        "unacknowledged (MQTT 5 Receive Maximum)",
    )
    mqtt_batch_max: int = Field(default=500, ge=1, le=10000, description="messages per database transaction")
    mqtt_batch_seconds: float = Field(
        default=0.05, ge=0, le=10, description="a batch is committed at most this long after its first message, s"
    )
    mqtt_max_payload_bytes: int = Field(
        default=256 << 10, ge=1024, le=16 << 20, description="larger telemetry or event payloads are refused, bytes"
    )
    mqtt_reconnect_max: float = Field(default=30.0, ge=1, le=3600,
                                      description="longest wait between reconnects to the broker (back-off), s")
    mqtt_raw_retention_days: float = Field(
        default=7, gt=0, le=3650, description="stored telemetry and event messages older than this are deleted, days"
    )
    mqtt_rollup_retention_days: float = Field(
        default=90, gt=0, le=36500, description="telemetry rollups (per minute) older than this are deleted, days"
    )
    mqtt_retention_interval: float = Field(default=600, ge=1, le=86400,
                                           description="how often retention runs, s")
    # -- alert delivery (edgefleet.server.alerts): webhooks and the MQTT alert topic, from a durable outbox
    alert_webhook_timeout: float = Field(
        default=15.0, gt=0, le=300, description="a webhook receiver must answer within this, s (Standard Webhooks "
        "recommends 15 to 30)",
    )
    alert_delivery_attempts: int = Field(
        default=10, ge=1, le=100, description="attempts per delivery before it is marked failed"
    )
    alert_delivery_backoff: float = Field(
        default=5.0, ge=0.01, le=86400, description="wait after the first failed attempt, s; doubled after each "
        "further one (with up to 10% random jitter)",
    )
    alert_delivery_backoff_max: float = Field(
        default=6 * 3600.0, ge=0.01, le=7 * 86400, description="longest wait between two attempts, s"
    )
    alert_delivery_poll: float = Field(
        default=1.0, ge=0.01, le=3600, description="how often the delivery worker looks for due deliveries, s"
    )
    # -- staged rollouts (edgefleet.server.rollouts.controller): one replica at a time judges them, by lease
    rollout_enabled: bool = Field(default=True, description="run the rollout controller in this replica (replicas "
                                  "share the work by a lease: one judges at a time)")
    rollout_interval: float = Field(default=5.0, gt=0, le=3600,
                                    description="how often the rollout controller judges every active rollout, s")
    rollout_lease: float = Field(
        default=15.0, gt=0, le=86400, description="how long the controller's lease lasts unrenewed, s: a replica that "
        "stops renewing (dead, stuck) is replaced this long after its last renewal; above rollout_interval",
    )

    @model_validator(mode="after")
    def _mqtt_consistent(self) -> Settings:
        if (self.mqtt_client_cert is None) != (self.mqtt_client_key is None):
            raise ValueError("mqtt_client_cert and mqtt_client_key go together: set both or neither")
        if self.mqtt_client_cert is not None and self.mqtt_url is not None and not self.mqtt_url.startswith("mqtts:"):
            raise ValueError("mqtt_url: a client certificate needs TLS (mqtts://)")
        if self.mqtt_batch_max > self.mqtt_receive_maximum:
            raise ValueError("mqtt_batch_max: must not exceed mqtt_receive_maximum (the broker sends no more "
                             "unacknowledged messages than that)")
        return self

    @model_validator(mode="after")
    def _rollouts_consistent(self) -> Settings:
        if self.rollout_lease <= self.rollout_interval:
            raise ValueError("rollout_lease: must be above rollout_interval (the holder renews it once per interval)")
        return self

    @model_validator(mode="after")
    def _alerts_consistent(self) -> Settings:
        if self.alert_delivery_backoff_max < self.alert_delivery_backoff:
            raise ValueError("alert_delivery_backoff_max: must not be below alert_delivery_backoff")
        return self

    def database_url(self) -> str:
        """The SQLAlchemy URL: the configured one, or SQLite at ``data_dir/edgefleet.db``."""
        if self.db_url is not None:
            return self.db_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'edgefleet.db').resolve()}"


def _env(env: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    data: dict[str, Any] = {}
    names: dict[tuple[str, ...], str] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        key = var[len(ENV_PREFIX) :].lower()
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        data[key] = value
        names[(key,)] = var
    return data, names


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Settings from a TOML file (optional), then the environment, then ``overrides`` (CLI options; None
    values are ignored). Raises :class:`ConfigError` naming the key and line or variable."""
    text: str | None = None
    data: dict[str, Any] = {}
    where = str(path) if path else "server settings"
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
            data = tomllib.loads(text)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read settings: {e.strerror or e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
    from_env, names = _env(os.environ if env is None else env)
    data.update(from_env)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{where}: " + "; ".join(problems(e, text, names))) from e
