"""``edgefleet agent ...``: the device agent and its quick-start server."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

__all__ = ["app"]

app = typer.Typer(help="The device agent: serve models, check config, show the hardware.", no_args_is_help=True)


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def run(config: Path = typer.Option(..., "--config", "-c", help="agent.toml")) -> None:
    """Run the agent as configured (what the systemd unit starts)."""
    from edgefleet.agent.config import load_config
    from edgefleet.agent.service import AgentService

    cfg = load_config(config)
    _logging(cfg.log_level)
    raise typer.Exit(AgentService(cfg).run())


@app.command()
def serve(
    models: list[Path] = typer.Argument(
        ..., help="Models or bundles to serve (a file under its stem, a bundle under its name)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8500, min=0, max=65535, help="TCP port (0: any free port)."),
    uds: Path | None = typer.Option(None, help="Also listen on this Unix socket."),
    threads: int | None = typer.Option(None, min=1, help="Runtime threads per model."),
    log_level: str = typer.Option("info", help="debug, info, warning or error."),
) -> None:
    """Serve models over the Open Inference Protocol, with no fleet and no config file."""
    from edgefleet.agent.config import AgentConfig
    from edgefleet.agent.service import AgentService

    cfg = AgentConfig.model_validate(
        {
            "api": {"host": host, "port": port, "uds": uds},
            "models": [{"path": m.resolve(), "threads": threads} for m in models],
            "log_level": log_level,
        }
    )
    _logging(cfg.log_level)
    raise typer.Exit(AgentService(cfg).run())


@app.command("check-config")
def check_config(
    config: Path = typer.Argument(..., help="agent.toml"),
    as_json: bool = typer.Option(False, "--json", help="Print the validated config as JSON."),
) -> None:
    """Validate agent.toml (and EDGEFLEET_* overrides); errors name the key and line."""
    from edgefleet.agent.config import load_config

    cfg = load_config(config)
    if as_json:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    else:
        typer.echo(f"{config}: ok ({len(cfg.models)} model(s), {len(cfg.flows)} flow(s), api port {cfg.api.port})")


def _register_hardware() -> None:
    from edgefleet.cli.hardware import hardware

    app.command("hardware", help="Show the detected hardware profile and why.")(hardware)


_register_hardware()
