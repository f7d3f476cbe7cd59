"""``edgefleet``: one command, sub-commands per role. Every failure exits non-zero with one line."""

from __future__ import annotations

import sys

import typer

from edgefleet import __version__
from edgefleet.cli import agent as agent_cmd
from edgefleet.cli import demo as demo_cmd
from edgefleet.cli import fleet as fleet_cmd
from edgefleet.cli import model as model_cmd
from edgefleet.errors import EdgefleetError

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgefleet",
    help="Run quantized TFLite and ONNX models on edge devices and keep a fleet of them up to date.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(model_cmd.app, name="model")
app.add_typer(agent_cmd.app, name="agent")
app.command("demo")(demo_cmd.demo)
fleet_cmd.register(app)  # device, token, server


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """edgefleet."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app, turning edgefleet's errors into a one-line message and exit 1."""
    try:
        app(args=argv, prog_name="edgefleet")
    except EdgefleetError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
