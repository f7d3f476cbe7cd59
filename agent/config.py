"""``agent.toml``: the agent's configuration, validated in one place.

Values come from the TOML file, then from ``EDGEFLEET_*`` environment variables, where a double
underscore walks into tables: ``EDGEFLEET_API__PORT=9000`` sets ``[api] port``. Errors name the key
and, where the key is in the file, its line. Nothing here does I/O beyond reading the file given;
secrets are ``SecretStr`` and never printed.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import ConfigError
from edgefleet.tomlconf import problems

__all__ = ["AgentConfig", "ApiConfig", "HardwareConfig", "ModelConfig", "load_config", "parse_config"]

ENV_PREFIX = "EDGEFLEET_"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ApiConfig(_Strict):
    """The local inference API (Open Inference Protocol over HTTP)."""

    enabled: bool = True
    host: str = Field(default="127.0.0.1", description="address to listen on; keep it on loopback")
    port: int = Field(default=8500, ge=0, le=65535, description="TCP port; 0 picks a free one")
    uds: Path | None = Field(default=None, description="also listen on this Unix socket")
    max_body_bytes: int = Field(default=64 << 20, ge=1024, le=1 << 31, description="request body limit, bytes")
    workers: int | None = Field(default=None, ge=1, le=64, description="inference threads (default: cores + 2)")


class ModelConfig(_Strict):
    """A model to serve: a bundle (served under its manifest name) or a bare model file (its stem)."""

    path: Path
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    threads: int | None = Field(default=None, ge=1, le=256, description="runtime threads (default: profile's)")
    backend: Literal["onnx", "tflite"] | None = None


class HardwareConfig(_Strict):
    profile: str | None = Field(default=None, description="profile name or file; detected when absent")
    overrides: dict[str, Any] = Field(default_factory=dict, description="profile fields to override")


class AgentConfig(_Strict):
    device_id: str = Field(default="", max_length=128, description="this device's id (set at enrollment)")
    state_dir: Path = Field(default=Path("/var/lib/edgefleet"), description="models, queues and keys live here")
    server_url: str | None = Field(default=None, description="fleet server URL (updates, enrollment)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    api: ApiConfig = Field(default_factory=ApiConfig)
    models: list[ModelConfig] = Field(default_factory=list)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    # FlowConfig objects after parse_config: validated there, so that the sources' and sinks' modules
    # are imported only by an agent that has flows.
    flows: list[Any] = Field(default_factory=list, description="sources -> model -> sinks")
    shutdown_timeout: float = Field(default=30.0, gt=0, le=600, description="seconds to finish in-flight work")

    @model_validator(mode="after")
    def _unique_names(self) -> AgentConfig:
        names = [m.name or _stem(m.path) for m in self.models if m.name or m.path.suffix != ".efb"]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two models are served under the same name(s) {dup}")
        return self


def _stem(p: Path) -> str:
    return p.stem


def _env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Apply ``EDGEFLEET_*`` variables to ``data`` in place; returns key path -> variable name."""
    applied: dict[tuple[str, ...], str] = {}
    for key, raw in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key == "EDGEFLEET_TOKEN":
            continue
        parts = key[len(ENV_PREFIX) :].lower().split("__")
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


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate ``agent.toml``. Raises :class:`ConfigError` naming the key and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from e
    return parse_config(text, str(p), env, base=p.resolve().parent)
