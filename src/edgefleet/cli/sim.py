"""``edgefleet sim``: run N virtual devices against a fleet server (docs/sim.md)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import typer

__all__ = ["register", "sim"]


def sim(
    devices: int = typer.Option(..., "--devices", "-n", min=1, help="virtual devices"),
    server: str = typer.Option(..., "--server", envvar="EDGEFLEET_SERVER", help="fleet server URL"),
    enroll_token: str | None = typer.Option(None, "--enroll-token", envvar="EDGEFLEET_ENROLL_TOKEN",
                                            help="enrollment token for N uses, pinned (TOKEN.N.SHA256) or with "
                                            "--image-root; not needed when --state holds enrolled devices"),
    image_root: Path | None = typer.Option(None, "--image-root", help="the image root file (token without a pin)"),
    ca: Path | None = typer.Option(None, "--ca", help="CA to verify an https server with"),
    broker: str | None = typer.Option(None, "--broker", help="mqtt://HOST[:PORT] (open broker, pooled connections) "
                                      "or mqtts://HOST[:PORT] (one TLS connection per device); none: no telemetry"),
    tags: str = typer.Option("", "--tags", help="a,b: tags set on every device (needs EDGEFLEET_TOKEN)"),
    admin_token: str | None = typer.Option(None, "--admin-token", envvar="EDGEFLEET_TOKEN",
                                           help="operator token, for --tags"),
    fail_rate: list[str] = typer.Option([], "--fail-rate", help="VERSION=0.3: self-test fails on this fraction of "
                                        "devices (the same ones every run); repeatable"),
    slow_model: list[str] = typer.Option([], "--slow-model", help="VERSION=2.0: latency multiplier; repeatable"),
    disagree: list[str] = typer.Option([], "--disagree", help="VERSION=0.2: shadow disagreement rate; repeatable"),
    accuracy: list[str] = typer.Option([], "--accuracy", help="VERSION=0.7: live accuracy (default 0.95); "
                                       "repeatable"),
    error_rate: list[str] = typer.Option([], "--error-rate", help="VERSION=0.05: runtime errors per call "
                                         "(default 0.0001); repeatable"),
    latency_ms: float = typer.Option(5.0, "--latency-ms", help="median latency of one inference at slow-model 1"),
    rate: float = typer.Option(20.0, "--rate", help="inferences per second per device"),
    interval: float = typer.Option(5.0, "--interval", help="seconds between telemetry messages"),
    checkin: float = typer.Option(5.0, "--checkin", help="seconds between check-ins"),
    duration: float = typer.Option(60.0, "--duration", help="seconds to run (0: until Ctrl-C)"),
    state: Path | None = typer.Option(None, "--state", help="state folder (device i in STATE/dev-i; reused on the "
                                      "next run) [default: a temporary folder, deleted]"),
    workers: int = typer.Option(8, "--workers", min=1, help="threads running (and enrolling) devices"),
    every: float = typer.Option(5.0, "--every", help="seconds between summary lines"),
    seed: int | None = typer.Option(None, "--seed", help="random seed of the traffic"),
    as_json: bool = typer.Option(False, "--json", help="print the final snapshot as JSON (no live lines)"),
) -> None:
    """Run N virtual devices with the real agent's enrollment, client, TUF checks and update machine; a
    cost model stands in for the models (latency, errors, self-test failures, shadow agreement,
    accuracy) and every device publishes real telemetry. Prints a summary line every few seconds and a
    final table."""
    from edgefleet.sim import Behaviour, SimFleet, parse_overrides

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    behaviour = Behaviour(
        base_latency_s=latency_ms / 1000.0, rate=rate,
        fail=parse_overrides("--fail-rate", fail_rate), slow=parse_overrides("--slow-model", slow_model),
        disagree=parse_overrides("--disagree", disagree), accuracy=parse_overrides("--accuracy", accuracy),
        errors=parse_overrides("--error-rate", error_rate),
    )
    tag_list = [t.strip() for t in tags.split(",") if t.strip()]
    fleet = SimFleet(server, enroll_token, devices, behaviour=behaviour, state=state, image_root=image_root, ca=ca,
                     broker=broker, tags=tag_list, admin_token=admin_token, interval=interval, checkin=checkin,
                     workers=workers, seed=seed)
    done = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        t0 = time.monotonic()
        fleet.start()
        if not as_json:
            typer.echo(f"sim: {devices} devices enrolled and running in {time.monotonic() - t0:.1f} s", err=True)
        end = time.monotonic() + duration if duration > 0 else None
        while not done.is_set():
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                break
            done.wait(every if left is None else min(every, left))
            if not as_json and not done.is_set():
                typer.echo(_line(fleet.summary()), err=True)
        snap = fleet.snapshot()
        summary = fleet.summary(snap)
    finally:
        signal.signal(signal.SIGINT, previous)
        fleet.stop()
    if as_json:
        typer.echo(json.dumps({"summary": summary, "devices": snap}, indent=2))
    else:
        typer.echo(_table(snap))
        typer.echo(_line(summary))


def _line(s: dict[str, Any]) -> str:
    running = ", ".join(f"{k} x{v}" for k, v in s["running"].items()) or "-"
    shadow = ", ".join(f"{k} x{v}" for k, v in s["shadow"].items())
    phases = " ".join(f"{k} {v}" for k, v in s["phases"].items())
    mqtt = s.get("mqtt") or {}
    return (f"[{s['elapsed_s']:7.1f} s] {s['devices']} devices | serving {running}"
            + (f" | shadow {shadow}" if shadow else "")
            + f" | {phases} | refusing {s['refusing']} | events {s['events_sent']} | telemetry {s['telemetry_sent']}"
            + (f" (acked {mqtt.get('acked', 0)})" if mqtt else ""))


def _table(snap: list[dict[str, Any]]) -> str:
    rows = [("device", "running", "shadow", "phase", "events", "telemetry", "refused")]
    for d in snap:
        rows.append((d["device_id"], " ".join(f"{n} {v}" for n, v in d["running"].items()) or "-",
                     " ".join(f"{n} {v}" for n, v in d["shadow"].items()) or "-", d["phase"], str(d["events_sent"]),
                     str(d["telemetry_sent"]), ",".join(sorted(set(d["refused"].values()))) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def register(app: typer.Typer) -> None:
    app.command("sim")(sim)
