"""``edgefleet agent status [--json]``: running versions, the update state, the last failure, and trust
(TUF metadata versions and expiries), read from the state directory: no network, no running agent."""

from __future__ import annotations

import json
from pathlib import Path

import typer

__all__ = ["status"]


def status(
    config: Path | None = typer.Option(None, "--config", "-c", help="agent.toml (gives state_dir)"),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="the agent's state directory [default: config's]"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
) -> None:
    """What this device runs and trusts: versions, the update under way, the last failure, metadata expiries."""
    from edgefleet.agent.updater.status import describe, format_status
    from edgefleet.errors import ConfigError

    folder = state_dir
    if folder is None and config is not None:
        from edgefleet.agent.config import load_config

        folder = load_config(config, identity=False).state_dir
    if folder is None:
        raise ConfigError("status: give --config or --state-dir")
    if not folder.is_dir():
        raise ConfigError(f"--state-dir: {folder} does not exist")
    d = describe(folder)
    if as_json:
        typer.echo(json.dumps(d, indent=2, default=str))
    else:
        for line in format_status(d):
            typer.echo(line)
