"""``edgefleet``: one command, sub-commands per role. Every failure exits non-zero with one line."""

from __future__ import annotations

import sys

import typer

from edgefleet import __version__
from edgefleet.cli import agent as agent_cmd
from edgefleet.cli import alerts as alerts_cmd
from edgefleet.cli import demo as demo_cmd
from edgefleet.cli import fleet as fleet_cmd
from edgefleet.cli import keys as keys_cmd
from edgefleet.cli import model as model_cmd
from edgefleet.cli import rollout as rollout_cmd
from edgefleet.errors import EdgefleetError

try:  # typer >= 0.25 carries its own copy of click
    from typer._click import exceptions as cx
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click import exceptions as cx  # type: ignore[no-redef]

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
app.add_typer(keys_cmd.app, name="keys")
app.command("demo")(demo_cmd.demo)
fleet_cmd.register(app)  # device, token, server
alerts_cmd.register(app)  # alert list|show|ack, alert rules, alert webhook
rollout_cmd.register(app)  # rollout create|list|show|members|pause|resume|abort|promote|watch
app.command("sim")(__import__("edgefleet.cli.sim", fromlist=["sim"]).sim)  # edgefleet sim (docs/sim.md)


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
    """Entry point: runs the app, turning edgefleet's errors into a one-line message and exit 1, and a
    mistyped command line into one line naming the option and exit 2."""
    try:
        code = app(args=argv, prog_name="edgefleet", standalone_mode=False)
    except cx.NoArgsIsHelpError as e:  # `edgefleet model`: the group's help, as before
        typer.echo(e.ctx.get_help() if e.ctx else "see 'edgefleet --help'")
        sys.exit(0)
    except cx.UsageError as e:
        where = e.ctx.command_path if e.ctx else "edgefleet"
        typer.secho(f"error: {e.format_message()} (see '{where} --help')", err=True, fg=typer.colors.RED)
        sys.exit(2)
    except EdgefleetError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
