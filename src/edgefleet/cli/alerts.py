"""``edgefleet alert``: alerts for retraining, against a fleet server (see docs/alerts.md).

``alert list [--state open|acked] [--model NAME]`` (viewer), ``alert show ID``, ``alert ack ID``
(operator); ``alert rules set MODEL --drift-psi-max ... --accuracy-min ...`` and ``alert rules list``
(thresholds: operator / viewer); ``alert webhook add URL [--model NAME]... [--description TEXT]``
(prints the signing secret once), ``alert webhook list``, ``alert webhook remove ID`` (admin).

Server URL and token as for every operator command (``--server``, ``$EDGEFLEET_SERVER``,
``$EDGEFLEET_TOKEN`` or the CLI config file: see :mod:`edgefleet.cli.fleet`). Every command has
``--json``; a refusal is one line naming the field.
"""

from __future__ import annotations

from typing import Any

import typer

from edgefleet.cli.fleet import _JSON, _SERVER, _call, _echo
from edgefleet.errors import ConfigError

__all__ = ["alert_app", "register", "rules_app", "webhook_app"]

alert_app = typer.Typer(help="Alerts for retraining: list, show, acknowledge; thresholds; webhooks.",
                        no_args_is_help=True)
rules_app = typer.Typer(help="Thresholds per model (drift, live accuracy).", no_args_is_help=True)
webhook_app = typer.Typer(help="Webhooks alerts are POSTed to, signed as Standard Webhooks says (admin).",
                          no_args_is_help=True)
alert_app.add_typer(rules_app, name="rules")
alert_app.add_typer(webhook_app, name="webhook")

_ALERT_COLUMNS = ["id", "state", "model", "version", "kind", "metric", "value", "threshold", "devices", "raised_at"]


@alert_app.command("list")
def alert_list(
    state: str | None = typer.Option(None, "--state", help="open or acked [default: both]"),
    model: str | None = typer.Option(None, "--model", help="only this model's alerts"),
    limit: int = typer.Option(100, min=1, max=1000, help="at most this many, newest first"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """List alerts, newest first."""
    if state is not None and state not in ("open", "acked"):
        raise ConfigError(f"--state: {state!r} is not open or acked")
    params: dict[str, Any] = {"limit": limit, **{k: v for k, v in {"state": state, "model": model}.items() if v}}
    _echo(_call("GET", "/api/v1/alerts", server, params=params), as_json, _ALERT_COLUMNS, "alerts")


def _show(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _echo(out, True)
        return
    deliveries = out.pop("deliveries", [])
    _echo(out, False)
    if deliveries:
        _echo(deliveries, False, ["id", "channel", "webhook_id", "topic", "state", "attempts", "last_status",
                                  "last_error"], "deliveries")


@alert_app.command("show")
def alert_show(alert_id: int = typer.Argument(..., min=1), server: str | None = _SERVER,
               as_json: bool = _JSON) -> None:
    """Show an alert: the figures that raised it, its devices and its deliveries."""
    _show(_call("GET", f"/api/v1/alerts/{alert_id}", server), as_json)


@alert_app.command("ack")
def alert_ack(alert_id: int = typer.Argument(..., min=1), server: str | None = _SERVER,
              as_json: bool = _JSON) -> None:
    """Acknowledge an alert (operator): after its cooldown, a new breach raises a new alert."""
    out = _call("POST", f"/api/v1/alerts/{alert_id}/ack", server)
    if as_json:
        _echo(out, True)
    else:
        typer.echo(f"alert {out['id']} ({out['model']} {out['version']} {out['kind']}): acknowledged by "
                   f"{out['acked_by']} at {out['acked_at']}")


@rules_app.command("set")
def rules_set(
    model: str = typer.Argument(..., help="model name (every version)"),
    drift_psi_max: float | None = typer.Option(None, help="alert when a report's drift psi_max is above this"),
    drift_mean_shift_max: float | None = typer.Option(None, help="alert when its drift mean_shift_max is above this"),
    accuracy_min: float | None = typer.Option(None, help="alert when live accuracy is below this (0..1)"),
    min_samples: int | None = typer.Option(None, min=1, help="drift samples / accuracy window needed [default: 100]"),
    cooldown_s: int | None = typer.Option(None, min=0, help="seconds before an acknowledged alert may be raised "
                                          "again [default: 3600]"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Set a model's thresholds (operator), replacing those set before; one left out falls back to the
    version's bundle manifest, then the default."""
    body = {"drift_psi_max": drift_psi_max, "drift_mean_shift_max": drift_mean_shift_max,
            "accuracy_min": accuracy_min, "min_samples": min_samples, "cooldown_s": cooldown_s}
    out = _call("PUT", f"/api/v1/models/{model}/alert-rules", server, json=body)
    _echo(out, as_json)


@rules_app.command("list")
def rules_list(server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Every model's thresholds set on the server."""
    _echo(_call("GET", "/api/v1/alert-rules", server), as_json,
          ["model", "drift_psi_max", "drift_mean_shift_max", "accuracy_min", "min_samples", "cooldown_s",
           "updated_by"], "alert rules")


@webhook_app.command("add")
def webhook_add(
    url: str = typer.Argument(..., help="http(s) URL alerts are POSTed to"),
    model: list[str] = typer.Option([], "--model", help="only this model's alerts (repeatable) [default: all]"),
    description: str = typer.Option("", help="what it is for"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Add a webhook (admin); its signing secret is printed once."""
    out = _call("POST", "/api/v1/webhooks", server, json={"url": url, "models": model, "description": description})
    if as_json:
        _echo(out, True)
        return
    typer.echo(f"webhook {out['id']} -> {out['url']} ({', '.join(out['models']) or 'every model'})")
    typer.echo("signing secret (shown once; verify webhook-signature with it, as Standard Webhooks says):")
    typer.echo(f"  {out['secret']}")


@webhook_app.command("list")
def webhook_list(server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """List webhooks with their pending and failed deliveries (never their secrets)."""
    _echo(_call("GET", "/api/v1/webhooks", server), as_json,
          ["id", "url", "models", "description", "pending", "failed", "disabled_at"], "webhooks")


@webhook_app.command("remove")
def webhook_remove(webhook_id: str = typer.Argument(...), server: str | None = _SERVER) -> None:
    """Remove a webhook; its deliveries still pending are not sent."""
    _call("DELETE", f"/api/v1/webhooks/{webhook_id}", server)
    typer.echo(f"webhook {webhook_id}: removed")


def register(app: typer.Typer) -> None:
    """Add the ``alert`` group to the root CLI (once: a second call changes nothing)."""
    if not any(g.name == "alert" for g in app.registered_groups):
        app.add_typer(alert_app, name="alert")
