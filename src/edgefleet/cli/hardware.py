"""``edgefleet agent hardware``: which hardware profile this device gets, why, and its sensors now."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

__all__ = ["hardware", "report"]

console = Console()


def report(root: Path = Path("/"), profile: str | None = None) -> dict[str, Any]:
    """The profile (detected under ``root``, or the one named), why, its settings and sensor readings.

    Raises :class:`~edgefleet.errors.ConfigError` for an unknown or bad profile.
    """
    from edgefleet.agent.hardware import detect, load_profile, read_sensors

    if profile is None:
        found = detect(root)
        chosen, source, reasons, evidence = found.profile, "detected", found.reasons, found.evidence
    else:
        chosen, source, reasons, evidence = load_profile(profile), "--profile", ["chosen with --profile"], None
    return {
        "profile": chosen.name,
        "source": source,
        "reasons": reasons,
        "evidence": evidence,
        "settings": chosen.model_dump(mode="json"),
        "sensors": read_sensors(chosen, root),
    }


def _fmt(value: Any) -> str:
    """A cell: ``—`` for nothing, one line per list item; escaped, so ``[`` in a value is not markup."""
    if value is None or value == []:
        return "—"
    if isinstance(value, list):
        return "\n".join(_fmt(v) for v in value)
    return escape(str(value))


def hardware(
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    root: Path = typer.Option(Path("/"), hidden=True, help="Read the device's files under this folder."),
    profile: str | None = typer.Option(None, help="profile name to show instead of detecting"),
) -> None:
    """Show the hardware profile detected for this device (or the one named), why, and its sensors."""
    data = report(root, profile)
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
        return
    s = data["settings"]
    console.print(f"[bold]{data['profile']}[/] ({data['source']})  {escape(s['description'])}")
    for reason in data["reasons"]:
        console.print(f"  • {escape(reason)}", highlight=False)
    table = Table("setting", "value")
    table.add_row("threads", _fmt(s["threads"]))
    table.add_row("preferred runtime", _fmt(s["preferred_runtime"]))
    delegates = [d["library"] + "".join(f" {k}={v}" for k, v in d["options"].items()) for d in s["delegates"]]
    table.add_row("delegates", _fmt(delegates))
    table.add_row("onnx providers", _fmt(s["onnx_providers"]))
    table.add_row("thermal zone", _fmt(s["thermal_zone"]))
    table.add_row("devices", _fmt(s["devices"]))
    console.print(table)
    units = {x["name"]: x["unit"] for x in s["sensors"]} | {"temperature_c": "°C"}
    sensors = Table("sensor", "value", "unit")
    for name, value in data["sensors"].items():
        sensors.add_row(name, _fmt(value), _fmt(units.get(name, "")))
    console.print(sensors)
