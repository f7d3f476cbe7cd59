"""The agent's two brokers: ``[mqtt.fleet]`` (the fleet's, TLS with the device certificate) and
``[mqtt.local]`` (where local sensors and apps publish; often ``localhost`` without TLS).

Pure pydantic models: no file is read here. :meth:`MqttFleetConfig.tls_files` only joins paths
(the enrolled identity's ``STATE/identity/ca.crt``, ``device.crt`` and ``device.key`` when the
config names none); the publisher reads them when it connects. Strict: an unknown key is an error
naming it. The local broker's password is a ``SecretStr`` and is never logged or printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

if TYPE_CHECKING:
    from edgefleet.agent.sources.mqtt import MqttBrokerConfig

__all__ = ["IDENTITY_CA", "IDENTITY_CERT", "IDENTITY_KEY", "MqttFleetConfig", "MqttLocalConfig", "TlsFiles"]

# Written by `edgefleet agent enroll` under STATE/identity/ (see edgefleet.cli.agent).
IDENTITY_CA = "ca.crt"
IDENTITY_CERT = "device.crt"
IDENTITY_KEY = "device.key"


class TlsFiles(NamedTuple):
    """The files of a mutual-TLS connection (PEM): CA bundle to trust (None: the system's), the
    client certificate and its key."""

    ca_cert: Path | None
    certfile: Path
    keyfile: Path


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MqttFleetConfig(_Strict):
    """``[mqtt.fleet]``: the fleet's broker, where the agent publishes ``status``, ``telemetry`` and
    ``events`` and reads its ``cmd`` topic. TLS with the enrolled device certificate by default."""

    enabled: bool = Field(default=True, description="publish to the fleet's broker at all")
    host: str = Field(min_length=1, description="broker host name or address (the TLS host name check uses it)")
    port: int = Field(default=8883, ge=1, le=65535, description="broker TCP port (8883: MQTT over TLS, 1883: plain)")
    tls: bool = Field(
        default=True, description="TLS with a client certificate; false: plain TCP (test set-ups only: no identity)"
    )
    ca_cert: Path | None = Field(
        default=None,
        description="CA bundle (PEM) the broker's certificate must chain to; default: the fleet CA from "
        "enrollment (STATE/identity/ca.crt)",
    )
    certfile: Path | None = Field(
        default=None, description="client certificate (PEM); default: the device's (STATE/identity/device.crt)"
    )
    keyfile: Path | None = Field(
        default=None, description="the client certificate's key (PEM); default: the device's key "
        "(STATE/identity/device.key)"
    )
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    client_id: str = Field(
        default="", max_length=128, description="MQTT client id; empty: the device id (one connection per device)"
    )
    keepalive: int = Field(default=60, ge=5, le=3600, description="keep-alive interval, seconds")
    resend_unrouted: bool = Field(
        default=True,
        description="keep a message the broker acknowledged with 'no matching subscribers' (MQTT 5) and send it "
        "again: the server was not subscribed (a broker restart that lost a shared subscription); false: "
        "acknowledged means delivered",
    )
    telemetry_interval_s: float = Field(
        default=60.0, ge=1.0, le=86400.0, description="seconds between two telemetry messages"
    )
    max_inflight: int = Field(
        default=100,
        ge=1,
        le=65535,
        description="most queued messages published and not yet acknowledged (PUBACK) at once; MQTT 5: "
        "never more than the broker's receive-maximum",
    )
    reconnect_min_s: float = Field(default=1.0, gt=0, le=600, description="first reconnect delay, seconds")
    reconnect_max_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="longest reconnect delay, seconds (the delay doubles per failed attempt up to this, and "
        "each wait is drawn between half of it and all of it, so a fleet does not reconnect in step)",
    )
    queue_max_bytes: int = Field(
        default=16 << 20, ge=4096, description="bytes of messages kept on disk while the broker is away "
        "(the oldest are dropped, and counted)"
    )
    queue_min_free_bytes: int = Field(
        default=1 << 20, ge=0, description="free disk space the queue always leaves in the state folder, bytes "
        "(below it the oldest messages go to make room; the updater needs room for its downloads)"
    )
    queue_max_age_s: float = Field(
        default=7 * 86400.0, gt=0, description="seconds a message is kept on disk before it is dropped as too old"
    )
    close_timeout_s: float = Field(
        default=5.0, ge=0, le=600, description="seconds close() waits for the broker to acknowledge what is in flight"
    )

    @model_validator(mode="after")
    def _check(self) -> MqttFleetConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is shorter than reconnect_min_s")
        if not self.tls and (self.ca_cert or self.certfile or self.keyfile):
            raise ValueError("tls: ca_cert, certfile and keyfile are set but tls is false")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile: give certfile and keyfile together, or neither (the identity's)")
        return self

    def tls_files(self, identity_dir: Path | None) -> TlsFiles | None:
        """The TLS files to use (None: plain TCP): the configured ones, else the enrolled identity's in
        ``identity_dir`` (``STATE/identity``). Joins paths only. Raises ValueError naming ``certfile``
        when TLS is on and there is neither a configured certificate nor an identity."""
        if not self.tls:
            return None
        if self.certfile is not None and self.keyfile is not None:
            ca = self.ca_cert if self.ca_cert is not None else (identity_dir / IDENTITY_CA if identity_dir else None)
            return TlsFiles(ca, self.certfile, self.keyfile)
        if identity_dir is None:
            raise ValueError(
                "mqtt.fleet.certfile: TLS needs a client certificate: enroll the device (`edgefleet agent enroll`) "
                "or set certfile and keyfile"
            )
        ca = self.ca_cert if self.ca_cert is not None else identity_dir / IDENTITY_CA
        return TlsFiles(ca, identity_dir / IDENTITY_CERT, identity_dir / IDENTITY_KEY)


class MqttLocalConfig(_Strict):
    """``[mqtt.local]``: the broker on or near the device where local sensors and apps publish
    (sensor topics, ``feedback``). No TLS by default: it is usually ``localhost``."""

    enabled: bool = Field(default=True, description="connect to the local broker at all")
    host: str = Field(default="127.0.0.1", min_length=1, description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port")
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version")
    client_id: str = Field(default="", max_length=128, description="MQTT client id; empty: edgefleet-<random>")
    username: str | None = Field(default=None, min_length=1, description="user name, if the broker wants one")
    password: SecretStr | None = Field(default=None, description="password (never logged); needs username")
    keepalive: int = Field(default=30, ge=5, le=3600, description="keep-alive interval, seconds")
    tls: bool = Field(default=False, description="TLS to the local broker (off by default: usually localhost)")
    ca_cert: Path | None = Field(default=None, description="with tls: CA bundle (PEM) to trust; none: the system's")
    certfile: Path | None = Field(default=None, description="with tls: a client certificate (PEM), if the broker asks")
    keyfile: Path | None = Field(default=None, description="with tls: the client certificate's key (PEM)")
    reconnect_min_s: float = Field(default=1.0, gt=0, le=600, description="first reconnect delay, seconds")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600, description="longest reconnect delay, seconds")

    @model_validator(mode="after")
    def _check(self) -> MqttLocalConfig:
        if self.password is not None and self.username is None:
            raise ValueError("password is set without username")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s is shorter than reconnect_min_s")
        if not self.tls and (self.ca_cert or self.certfile or self.keyfile):
            raise ValueError("tls: ca_cert, certfile and keyfile are set but tls is false")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile: give certfile and keyfile together, or neither")
        return self

    def broker_config(self) -> MqttBrokerConfig:
        """The same settings as the :class:`~edgefleet.agent.sources.mqtt.MqttBrokerConfig` that the MQTT
        source and sink take (for a source on a sensor or ``feedback`` topic of the local broker)."""
        import math

        from edgefleet.agent.sources.mqtt import MqttBrokerConfig, MqttTls

        tls = MqttTls(ca_certs=self.ca_cert, certfile=self.certfile, keyfile=self.keyfile) if self.tls else None
        return MqttBrokerConfig(
            host=self.host,
            port=self.port,
            protocol=self.protocol,
            client_id=self.client_id,
            username=self.username,
            password=self.password,
            keepalive=self.keepalive,
            tls=tls,
            reconnect_min_delay=max(1, math.ceil(self.reconnect_min_s)),
            reconnect_max_delay=max(1, math.ceil(self.reconnect_max_s)),
        )
