"""``edgefleet rollout``: staged rollouts judged by telemetry, against a fleet server (docs/rollouts.md).

``rollout create --model N --version V [--tags a,b] [--stages 1,10,50,100] [--soak 10m] [gates ...]
[--watch]`` (operator), ``rollout list [--model N] [--state S]``, ``rollout show ID`` (the state in
words, the stages, and a table of the last judgement's gates), ``rollout members ID``,
``rollout pause|resume|abort ID [--reason TEXT]`` and ``rollout promote ID [--version B]``
(operator), ``rollout watch ID``. Durations take seconds or a unit (``90s``, ``10m``, ``1h``,
``1d``), ratios a number or a percentage (``0.05``, ``5%``); a gate given as ``off`` is not judged.

Server URL and token as for every operator command (``--server``, ``$EDGEFLEET_SERVER``,
``$EDGEFLEET_TOKEN`` or the CLI config file: see :mod:`edgefleet.cli.fleet`). Every command has
``--json``; a refusal is one line naming the field. ``--watch`` (and ``rollout watch``) prints each
change until the rollout ends: exit 0 when it completed, 1 when it was aborted or paused.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from edgefleet.cli.fleet import _JSON, _SERVER, _call, _echo
from edgefleet.errors import ConfigError

__all__ = ["app", "gates_body"]

app = typer.Typer(help="Staged rollouts judged by how the model behaves on the devices.", no_args_is_help=True)

_OFF = ("off", "none", "no")
_SUMMARY = ["id", "model", "version", "version_b", "state", "stage_percent", "phase", "tags", "updated_at"]
_GATE_COLUMNS = ["gate", "status", "estimate", "interval", "threshold", "n (cand/base)", "samples", "p-value"]


def _parsed(option: str, value: str | None, parse: Any, **kw: Any) -> float | None:
    """``value`` checked here with the server's own parser (so the error names the option), or None."""
    if value is None:
        return None
    try:
        return float(parse(value, **kw))
    except ValueError as e:
        raise ConfigError(f"{option}: {e}") from None


def _duration(option: str, value: str | None) -> float | None:
    from edgefleet.server.rollouts.codec import parse_duration

    return _parsed(option, value, parse_duration)


def _ratio(option: str, value: str | None, *, upper: float | None = 1.0) -> float | None:
    from edgefleet.server.rollouts.codec import parse_ratio

    return _parsed(option, value, parse_ratio, upper=upper)


def _gate(option: str, value: str | None, *, upper: float | None) -> tuple[bool, float | None]:
    """(given, value) of a gate that ``off`` turns off."""
    if value is None:
        return False, None
    if value.strip().lower() in _OFF:
        return True, None
    return True, _ratio(option, value, upper=upper)


def gates_body(
    *, stages: str | None = None, soak: str | None = None, max_failure: str | None = None,
    max_p95_ratio: str | None = None, max_error_rate: str | None = None, max_drift: str | None = None,
    min_accuracy_ratio: str | None = None, shadow: str | None = None, min_agreement: str | None = None,
    hold: str | None = None, stage_timeout: str | None = None, on_fail: str | None = None,
    max_concurrent: int | None = None, windows: list[str] | None = None, min_devices: int | None = None,
    min_samples: int | None = None,
) -> dict[str, Any]:
    """The API body's gate fields from the command line's strings (only those given; the server has
    the defaults). Raises ConfigError naming the option."""
    body: dict[str, Any] = {}
    if stages is not None:
        try:
            body["stages"] = [int(p) for p in stages.replace(" ", "").split(",") if p]
        except ValueError:
            raise ConfigError(
                f"--stages: {stages!r}: expected percentages separated by commas, e.g. 1,10,50,100") from None
    for key, option, value in (("soak", "--soak", soak), ("shadow", "--shadow", shadow), ("hold", "--hold", hold),
                               ("stage_timeout", "--stage-timeout", stage_timeout)):
        if value is not None:
            body[key] = _duration(option, value)
    for key, option, value in (("max_failure", "--max-failure", max_failure),
                               ("min_agreement", "--min-agreement", min_agreement)):
        if value is not None:
            body[key] = _ratio(option, value)
    for key, option, value, upper in (("max_p95_ratio", "--max-p95-ratio", max_p95_ratio, None),
                                      ("max_error_rate", "--max-error-rate", max_error_rate, 1.0),
                                      ("max_drift", "--max-drift", max_drift, None),
                                      ("min_accuracy_ratio", "--min-accuracy-ratio", min_accuracy_ratio, None)):
        given, v = _gate(option, value, upper=upper)
        if given:
            body[key] = v
    if on_fail is not None:
        if on_fail not in ("pause", "abort"):
            raise ConfigError(f"--on-fail: {on_fail!r} is not pause or abort")
        body["on_fail"] = on_fail
    for key, n in (("max_concurrent", max_concurrent), ("min_devices", min_devices), ("min_samples", min_samples)):
        if n is not None:
            body[key] = n
    if windows:
        out = []
        for w in windows:
            tag, sep, spec = w.partition("=")
            if not sep or not tag or not spec:
                raise ConfigError(f"--window: {w!r}: expected TAG=HH:MM-HH:MM (UTC), e.g. site:plant=22:00-04:00")
            out.append({"tag": tag, "window": spec})
        body["windows"] = out
    return body


@app.command("create")
def create(
    model: str = typer.Option(..., "--model", help="model name"),
    version: str = typer.Option(..., "--version", help="the version to roll out (in the registry)"),
    tags: str | None = typer.Option(None, "--tags", help="only devices carrying every one of these (a,b)"),
    stages: str | None = typer.Option(None, "--stages", help="percent per stage, the last 100 (default 1,10,50,100)"),
    soak: str | None = typer.Option(None, "--soak", help="an updated device runs this long before its stage "
                                    "passes (default 10m)"),
    max_failure: str | None = typer.Option(None, "--max-failure", help="failed / online members, at most (default 5%)"),
    max_p95_ratio: str | None = typer.Option(None, "--max-p95-ratio",
                                             help="p95 vs baseline, at most (default 1.2; or off)"),
    max_error_rate: str | None = typer.Option(None, "--max-error-rate",
                                              help="error rate - baseline's (default 1%; or off)"),
    max_drift: str | None = typer.Option(None, "--max-drift", help="psi_max - baseline's, at most (default off)"),
    min_accuracy_ratio: str | None = typer.Option(None, "--min-accuracy-ratio",
                                                  help="live accuracy / baseline's, at least (default off)"),
    shadow: str | None = typer.Option(None, "--shadow", help="run each stage in shadow first, this long"),
    min_agreement: str | None = typer.Option(None, "--min-agreement", help="shadow agreement, at least (default 0.98)"),
    ab: str | None = typer.Option(None, "--ab", help="A/B: the first stage's arm b runs this version"),
    hold: str | None = typer.Option(None, "--hold", help="hold the A/B stage this long once its gates pass"),
    stage_timeout: str | None = typer.Option(None, "--stage-timeout",
                                             help="undecided this long: --on-fail (default 1h)"),
    on_fail: str | None = typer.Option(None, "--on-fail", help="pause or abort (default pause)"),
    max_concurrent: int | None = typer.Option(None, "--max-concurrent", min=1,
                                              help="devices downloading at once, at most"),
    window: list[str] = typer.Option([], "--window", help="TAG=HH:MM-HH:MM (UTC): devices with TAG are "
                                     "updated only then (repeatable)"),
    min_devices: int | None = typer.Option(None, "--min-devices", min=1, help="devices per side a comparison needs"),
    min_samples: int | None = typer.Option(None, "--min-samples", min=1, help="inferences per such device"),
    watch: bool = typer.Option(False, "--watch", help="then print each change until the rollout ends"),
    interval: float = typer.Option(5.0, "--interval", min=0.05, help="--watch: seconds between polls"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Create a rollout: members fixed now by a stable hash; the server's controller assigns the first
    stage, judges each stage's gates and advances, pauses or aborts by itself."""
    body: dict[str, Any] = {"model": model, "version": version,
                            "tags": [t for t in (tags or "").replace(" ", "").split(",") if t]}
    if ab is not None:
        body["version_b"] = ab
    body |= gates_body(stages=stages, soak=soak, max_failure=max_failure, max_p95_ratio=max_p95_ratio,
                       max_error_rate=max_error_rate, max_drift=max_drift, min_accuracy_ratio=min_accuracy_ratio,
                       shadow=shadow, min_agreement=min_agreement, hold=hold, stage_timeout=stage_timeout,
                       on_fail=on_fail, max_concurrent=max_concurrent, windows=window, min_devices=min_devices,
                       min_samples=min_samples)
    out = _call("POST", "/api/v1/rollouts", server, json=body)
    if as_json and not watch:
        _echo(out, True)
        return
    if not as_json:
        m = out["members"]
        typer.echo(f"rollout {out['id']}: {model} {version}" + (f" (A/B with {ab})" if ab else "")
                   + f" to {m['total'] - m['skipped']} device(s) in stages "
                   + " → ".join(f"{st['percent']}%" for st in out["stages"]))
        if out["skipped"]:
            more = m["skipped"] - len(out["skipped"])
            typer.echo(f"skipped {m['skipped']} device(s): "
                       + ", ".join(f"{x['device_id']} ({x['detail']})" for x in out["skipped"][:20])
                       + (f" and {m['skipped'] - 20} more" if m["skipped"] > 20 else "")
                       + (f" (first {len(out['skipped'])} listed)" if more > 0 else ""))
        typer.echo(out["explanation"])
    if watch:
        _watch(out["id"], interval, server, as_json, first=out)


@app.command("list")
def list_rollouts(
    model: str | None = typer.Option(None, "--model", help="only this model's"),
    state: str | None = typer.Option(None, "--state", help="running, paused, aborted or completed"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """List rollouts, newest first."""
    params = {k: v for k, v in {"model": model, "state": state}.items() if v}
    _echo(_call("GET", "/api/v1/rollouts", server, params=params), as_json, _SUMMARY, "rollouts")


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) >= 1e-3 or x == 0 else f"{x:.1e}"
    return str(x)


def _gate_rows(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for g in gates:
        interval = "-" if g.get("low") is None and g.get("high") is None else f"[{_num(g.get('low'))}, " \
                                                                                f"{_num(g.get('high'))}]"
        rows.append({
            "gate": g["name"], "status": g["status"], "estimate": _num(g.get("estimate")), "interval": interval,
            "threshold": _num(g.get("threshold")), "n (cand/base)": f"{g.get('n_candidate', 0)}/"
                                                                    f"{g.get('n_baseline', 0)}",
            "samples": f"{g.get('samples_candidate', 0)}/{g.get('samples_baseline', 0)}",
            "p-value": _num(g.get("p_value")),
        })
    return rows


def _print_show(out: dict[str, Any]) -> None:
    typer.echo(out["explanation"])
    typer.echo(f"rollout {out['id']}: {out['model']} {out['version']}"
               + (f" / {out['version_b']} (A/B)" if out.get("version_b") else "")
               + f", state {out['state']}, stage {out['stage'] + 1} ({out['stage_percent']}%), phase {out['phase']}, "
               f"state version {out['state_version']}")
    typer.echo(f"created {out['created_at']} by {out['created_by']}; updated {out['updated_at']}"
               + (f"; ended {out['ended_at']}" if out.get("ended_at") else ""))
    stages = [{"stage": st["number"], "percent": f"{st['percent']}%", "devices": st["devices"],
               "current": "*" if st["current"] else "",
               "members": ", ".join(f"{n} {k}" for k, n in sorted(st["members"].items()))} for st in out["stages"]]
    _echo(stages, False, ["stage", "percent", "devices", "current", "members"], "stages")
    if out["last_gates"]:
        _echo(_gate_rows(out["last_gates"]), False, _GATE_COLUMNS, "gates (last judgement)")
        for g in out["last_gates"]:
            if g.get("detail"):  # the detail names its gate already ("soak: 4 online members ...")
                typer.echo(f"  {g['detail']}")
    if out.get("ab"):
        _echo(_gate_rows(out["ab"]), False, _GATE_COLUMNS, "A/B: arm b against arm a")
        for g in out["ab"]:
            if g.get("detail"):
                typer.echo(f"  {g['detail']}")
    if out.get("skipped"):
        typer.echo("skipped: " + ", ".join(f"{x['device_id']} ({x['detail']})" for x in out["skipped"]))


@app.command("show")
def show(rollout_id: int = typer.Argument(..., min=1), server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Show a rollout: its state in words, its stages, and the last judgement's gates with their figures
    (estimate, confidence interval, threshold, devices and samples on each side, p-value)."""
    out = _call("GET", f"/api/v1/rollouts/{rollout_id}", server)
    _echo(out, True) if as_json else _print_show(out)


@app.command("members")
def members(
    rollout_id: int = typer.Argument(..., min=1),
    status: str | None = typer.Option(None, "--status", help="waiting, assigned, updated, failed, skipped, released"),
    limit: int = typer.Option(100, "--limit", min=1, max=1000),
    offset: int = typer.Option(0, "--offset", min=0),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """List a rollout's members in rank order (the order its stages take them)."""
    params: dict[str, Any] = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
    out = _call("GET", f"/api/v1/rollouts/{rollout_id}/members", server, params=params)
    _echo(out, as_json, ["rank", "device_id", "stage", "arm", "status", "previous_version", "detail"], "members")


def _act(rollout_id: int, action: str, server: str | None, as_json: bool, body: dict[str, Any]) -> None:
    out = _call("POST", f"/api/v1/rollouts/{rollout_id}/{action}", server,
                json={k: v for k, v in body.items() if v is not None})
    if as_json:
        _echo(out, True)
    else:
        typer.echo(f"rollout {out['id']}: {out['state']}, stage {out['stage'] + 1} ({out['stage_percent']}%), "
                   f"phase {out['phase']}: {out['reason']}")


_REASON = typer.Option(None, "--reason", help="why (recorded in the audit log)")


@app.command("pause")
def pause(rollout_id: int = typer.Argument(..., min=1), reason: str | None = _REASON,
          server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Pause a rollout: nothing is assigned or judged until `rollout resume`."""
    _act(rollout_id, "pause", server, as_json, {"reason": reason})


@app.command("resume")
def resume(rollout_id: int = typer.Argument(..., min=1), reason: str | None = _REASON,
           server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Resume a paused rollout (the stage timeout counts from now)."""
    _act(rollout_id, "resume", server, as_json, {"reason": reason})


@app.command("abort")
def abort(rollout_id: int = typer.Argument(..., min=1), reason: str | None = _REASON,
          server: str | None = _SERVER, as_json: bool = _JSON) -> None:
    """Abort a rollout: every device it touched gets back the version it had before."""
    _act(rollout_id, "abort", server, as_json, {"reason": reason})


@app.command("promote")
def promote(
    rollout_id: int = typer.Argument(..., min=1),
    version: str | None = typer.Option(None, "--version", help="in an A/B hold: the winner (the A/B version "
                                       "becomes the candidate for the rest)"),
    reason: str | None = _REASON,
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Advance the current stage now, skipping its gates (in a shadow phase: serve the candidate now)."""
    _act(rollout_id, "promote", server, as_json, {"version": version, "reason": reason})


def _line(out: dict[str, Any]) -> str:
    m = out["members"]
    counts = ", ".join(f"{m[k]} {k}" for k in ("waiting", "assigned", "updated", "failed", "released") if m.get(k))
    return (f"{time.strftime('%H:%M:%S')} rollout {out['id']}: {out['state']}, stage {out['stage'] + 1} "
            f"({out['stage_percent']}%), phase {out['phase']} [{counts}]: {out['reason']}")


def _watch(rollout_id: int, interval: float, server: str | None, as_json: bool,
           first: dict[str, Any] | None = None) -> None:
    """Poll until the rollout ends, printing each change; exit 0 completed, 1 aborted or paused."""
    last: tuple[Any, ...] | None = None
    out = first
    while True:
        if out is None:
            out = _call("GET", f"/api/v1/rollouts/{rollout_id}", server)
        key = (out["state"], out["stage"], out["phase"], out["state_version"], json.dumps(out["members"]),
               out["reason"])
        if key != last:
            typer.echo(json.dumps(out, default=str) if as_json else _line(out))
            last = key
        if out["state"] == "completed":
            raise typer.Exit(0)
        if out["state"] in ("aborted", "paused"):
            if not as_json:
                typer.echo(f"rollout {rollout_id} is {out['state']}: {out['reason']}")
            raise typer.Exit(1)
        time.sleep(interval)
        out = None


@app.command("watch")
def watch(
    rollout_id: int = typer.Argument(..., min=1),
    interval: float = typer.Option(5.0, "--interval", min=0.05, help="seconds between polls"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Print each change of a rollout until it ends: exit 0 when it completed, 1 aborted or paused."""
    _watch(rollout_id, interval, server, as_json)


def register(root: typer.Typer) -> None:
    """Add the ``rollout`` group to the root CLI."""
    root.add_typer(app, name="rollout")
