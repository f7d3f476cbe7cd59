"""``edgefleet model ...``: inspect, bench, package and verify models and bundles."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgefleet.errors import EdgefleetError

__all__ = ["app"]

app = typer.Typer(help="Inspect, benchmark, package and verify models and bundles.", no_args_is_help=True)
console = Console()


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _tensor_rows(table: Table, kind: str, tensors: list[dict[str, Any]]) -> None:
    for t in tensors:
        q = t.get("quantization")
        qs = "" if not q else f"scale={q['scale']:.6g} zp={q['zero_point']}"
        dims = "[" + ", ".join("?" if d is None else str(d) for d in t["shape"]) + "]"
        table.add_row(kind, t["name"], t["dtype"], dims, qs)


def _tensor_table(inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> Table:
    table = Table("", "name", "dtype", "shape", "quantization")
    _tensor_rows(table, "input", inputs)
    _tensor_rows(table, "output", outputs)
    return table


_MODEL_SUFFIXES = (".onnx", ".tflite", ".efb")


def _not_a_model(path: Path) -> str | None:
    """A plain reason when ``path`` is plainly not a model (empty, or no model suffix and no model's
    magic bytes), else None (the runtime's own error says more)."""
    try:
        with path.open("rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if not head:
        return f"{path}: an empty file, not a model"
    if path.suffix.lower() in _MODEL_SUFFIXES or head[4:8] == b"TFL3" or head[257:262] == b"ustar":
        return None
    return f"{path}: not a model: give a .onnx or .tflite model file or a .efb bundle"


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A .onnx or .tflite model, or a .efb bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model's tensors and runtime, or a bundle's manifest."""
    from edgefleet.bundle.archive import BundleReader

    if path.suffix == ".efb":
        with BundleReader(path) as b:
            m = b.manifest
        data = m.model_dump(mode="json")
        if as_json:
            emit_json(data)
            return
        console.print(f"[bold]{m.name}[/] {m.version}  runtime={m.runtime}  created={m.created_at.isoformat()}")
        console.print(f"model {m.model.path}  {m.model.size} bytes  sha256 {m.model.sha256}")
        console.print(_tensor_table(data["inputs"], data["outputs"]))
        for ref in m.members()[1:]:
            console.print(f"member {ref.path}  {ref.size} bytes")
        if m.pipeline.preprocess or m.pipeline.postprocess:
            steps = [s.op for s in m.pipeline.preprocess] + ["model"] + [s.op for s in m.pipeline.postprocess]
            console.print("pipeline: " + " → ".join(steps))
        return
    from edgefleet.agent.runtime import load_model
    from edgefleet.errors import ModelError

    try:
        model = load_model(path, warmup=False)
    except ModelError as e:
        raise ModelError(_not_a_model(path) or str(e)) from e
    info = model.info()
    if as_json:
        emit_json(info)
        return
    console.print(f"[bold]{path}[/]  {info['runtime']} {info['version']}")
    console.print(_tensor_table(info["inputs"], info["outputs"]))


@app.command()
def bench(
    path: Path = typer.Argument(..., help="A .onnx or .tflite model, or a .efb bundle."),
    runs: int = typer.Option(300, min=10, help="Timed calls on each side."),
    threads: int | None = typer.Option(None, min=1, help="Runtime threads (default: the runtime's)."),
    float_input: bool = typer.Option(
        False, "--float-input", help="Feed float data to quantized inputs (the bare side quantizes by hand)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Latency p50/p95/p99 and throughput through edgefleet and through the bare runtime, side by side."""
    from edgefleet.agent.benchmark import bench_model, random_inputs
    from edgefleet.agent.runtime import load_model

    model = load_model(path, threads=threads)
    feeds = random_inputs(model.inputs, float_for_quantized=float_input)
    result = bench_model(model, feeds, runs=runs)
    if as_json:
        emit_json(result)
        return
    table = Table("", "p50 µs", "p95 µs", "p99 µs", "per s")
    for side in ("agent", "bare"):
        r = result[side]
        table.add_row(
            side, f"{r['p50_us']:.1f}", f"{r['p95_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['throughput_per_s']:.0f}"
        )
    console.print(f"[bold]{path}[/]  {result['runtime']['runtime']}  threads={threads or 'default'}  runs={runs}")
    console.print(table)
    console.print(f"ratio p50 agent/bare = {result['ratio_p50']:.3f}  (+{result['overhead_p50_us']:.1f} µs)")


@app.command()
def package(
    model: Path = typer.Argument(..., help="The .onnx or .tflite model file."),
    name: str = typer.Option(..., help="Model name (lower case, digits, '.', '_', '-')."),
    version: str = typer.Option(..., help="Semantic version, e.g. 1.0.0."),
    out: Path | None = typer.Option(None, "-o", "--out", help="Output file or folder (default: NAME-VERSION.efb)."),
    labels: Path | None = typer.Option(None, help="labels.txt, one label per line."),
    golden: Path | None = typer.Option(None, help=".npz of golden inputs keyed by input name."),
    baseline: Path | None = typer.Option(None, help=".npz of training data keyed by input name, for drift."),
    pipeline: Path | None = typer.Option(None, help="Pipeline (pre/post-processing) as JSON or TOML."),
    created_at: datetime | None = typer.Option(
        None,
        formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S"],
        help="Creation time (default: $SOURCE_DATE_EPOCH, else the model file's mtime).",
    ),
    description: str = typer.Option("", help="Free text."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Write a reproducible .efb bundle, with golden outputs computed by the runtime."""
    from edgefleet.converters.package import package_model

    target, manifest = package_model(
        model,
        name,
        version,
        out=out,
        labels=labels,
        golden=golden,
        baseline=baseline,
        pipeline=pipeline,
        created_at=created_at,
        description=description,
    )
    if as_json:
        emit_json({"bundle": str(target), "manifest": manifest.model_dump(mode="json")})
    else:
        console.print(f"wrote {target} ({target.stat().st_size} bytes)")


@app.command()
def verify(
    bundle: Path = typer.Argument(..., help="A .efb bundle."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Check hashes and manifest, load the model and run its golden self-test."""
    from edgefleet.agent.selftest import verify_bundle

    report = verify_bundle(str(bundle))
    if as_json:
        emit_json(report)
    else:
        g = report["golden"]
        golden = "none" if g is None else ("passed" if g["passed"] else "FAILED") + f" ({g['samples']} samples)"
        console.print(f"{bundle}: {report['name']} {report['version']}  hashes ok  model loads  golden {golden}")
        if g and g["failures"]:
            for f in g["failures"][:10]:
                console.print(f"  {f}")
    if not report["ok"]:
        raise EdgefleetError(f"{bundle}: golden self-test failed")


from edgefleet.cli.convert import convert, quantize  # noqa: E402  (registered last: the converters' commands)

app.command("quantize")(quantize)
app.command("convert")(convert)

from edgefleet.cli import fleet as fleet_cmd  # noqa: E402  (the fleet server's side of `model`)

app.command("push")(fleet_cmd.push)
app.command("list")(fleet_cmd.list_models)
app.command("show")(fleet_cmd.show)
