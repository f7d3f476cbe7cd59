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


_SHOWN_METADATA_CHARS = 200  # a metadata value longer than this is cut in the text view (--json has it whole)


def _model_lines(info: dict[str, Any]) -> list[str]:
    """``metadata:``, ``signatures:`` and ``stateful:`` lines for a loaded model's ``info()``."""
    lines = []
    for key, value in sorted(info.get("metadata", {}).items()):
        v = value if len(value) <= _SHOWN_METADATA_CHARS else f"{value[:_SHOWN_METADATA_CHARS]}… ({len(value)} chars)"
        lines.append(f"metadata: {key}={v}")
    sigs = info.get("signatures") or []
    if sigs:
        using = f" (using {info['signature']})" if info.get("signature") else ""
        lines.append(f"signatures: {', '.join(sigs)}{using}")
    if info.get("stateful"):
        lines.append(
            "stateful: yes — Model.reset() puts its variables back to their initial values; "
            "calls in one session see the state earlier calls left"
        )
    else:
        lines.append("stateful: no")
    return lines


def _load(path: Path, signature: str | None, **kwargs: Any) -> Any:
    """``load_model`` with the CLI's one-line errors: not a model, a signature for a model without any."""
    from edgefleet.agent.runtime import detect_runtime, load_model
    from edgefleet.errors import ModelError

    options: dict[str, Any] = dict(kwargs)
    if signature is not None:
        if path.is_file() and detect_runtime(path) != "tflite":
            raise ModelError(f"--signature: {path} is an ONNX model, which has no signatures (only TFLite has)")
        options["signature"] = signature
    try:
        return load_model(path, **options)
    except ModelError as e:
        raise ModelError(_not_a_model(path) or str(e)) from e


_SIGNATURE_HELP = "TFLite signature to run (default: serving_default, or the only one)."


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="A .onnx or .tflite model, or a .efb bundle."),
    signature: str | None = typer.Option(None, "--signature", help=_SIGNATURE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show a model's tensors, metadata, signatures and whether it keeps state; or a bundle's manifest.

    The JSON of a model file carries ``metadata`` (ONNX metadata_props), ``signatures``, the
    ``signature`` in use (TFLite) and ``stateful``; a bundle's is its manifest."""
    from edgefleet.bundle.archive import BundleReader

    if path.suffix == ".efb" and signature is None:
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
        for line in _model_lines(_load(path, None, warmup=False).info()):
            typer.echo(line)
        return
    info = _load(path, signature, warmup=False).info()
    if as_json:
        emit_json(info)
        return
    console.print(f"[bold]{path}[/]  {info['runtime']} {info['version']}")
    console.print(_tensor_table(info["inputs"], info["outputs"]))
    for line in _model_lines(info):
        typer.echo(line)


def _need_shapes(path: Path, specs: list[Any]) -> None:
    """Raise a one-line :class:`ModelError` naming the flags when an input has a dynamic dim other
    than a leading batch dim and nothing says what shape to feed."""
    from edgefleet.errors import ModelError

    for s in specs:
        if any(d is None for i, d in enumerate(s.shape) if i > 0 or len(s.shape) < 2):
            letters = iter("HWTLKM")
            dims = "x".join(
                str(d) if d is not None else ("1" if i == 0 and len(s.shape) > 1 else next(letters, "N"))
                for i, d in enumerate(s.shape)
            )
            shown = "[" + ", ".join("?" if d is None else str(d) for d in s.shape) + "]"
            raise ModelError(
                f"{path}: input {s.name!r} has dynamic dims {shown}: give --shape {s.name}={dims} "
                "(with numbers) or --inputs FILE.npz (samples (N, *input shape))"
            )


def parse_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    """``--shape NAME=1x3x640x640`` values to ``{name: dims}`` (``NAME=`` or ``NAME=scalar`` for a
    scalar). Raises :class:`~edgefleet.errors.ConfigError` naming the value at fault."""
    from edgefleet.errors import ConfigError

    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, eq, dims = value.rpartition("=")
        if not eq or not name:
            raise ConfigError(f"--shape: expected NAME=DIMxDIM... (e.g. image=1x3x640x640), got {value!r}")
        if name in shapes:
            raise ConfigError(f"--shape: input {name!r} given twice")
        text = dims.strip().lower()
        try:
            parsed = () if text in ("", "scalar") else tuple(int(d) for d in text.split("x"))
        except ValueError:
            raise ConfigError(f"--shape: {value!r}: dims must be whole numbers joined by 'x', got {dims!r}") from None
        if any(d < 0 for d in parsed):
            raise ConfigError(f"--shape: {value!r}: dims must not be negative")
        shapes[name] = parsed
    return shapes


@app.command()
def bench(
    path: Path = typer.Argument(..., help="A .onnx or .tflite model, or a .efb bundle."),
    runs: int = typer.Option(300, min=10, help="Timed calls on each side."),
    threads: int | None = typer.Option(None, min=1, help="Runtime threads (default: the runtime's)."),
    inputs: Path | None = typer.Option(
        None,
        "--inputs",
        help=".npz of inputs in the sample layout: (N, *input shape) per input name, scalars (N,); sample 0 is used.",
    ),
    shape: list[str] = typer.Option(
        [], "--shape", help="NAME=1x3x640x640: the shape of an input with dynamic dims (repeatable); random data."
    ),
    signature: str | None = typer.Option(None, "--signature", help=_SIGNATURE_HELP),
    float_input: bool = typer.Option(
        False, "--float-input", help="Feed float data to quantized inputs (the runtime quantizes it on every call)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Latency p50/p95/p99 and throughput through edgefleet and through the bare runtime, side by side.

    Inputs, first that applies: --inputs; random data at the --shape given; a bundle's first golden
    sample; random data with a dynamic batch dim of one. A model with other dynamic dims and none of
    these is an error saying which flag to give."""
    from edgefleet.agent.benchmark import bench_inputs, bench_model
    from edgefleet.agent.runtime import dequantize
    from edgefleet.errors import ConfigError

    if inputs is not None and shape:
        raise ConfigError("--inputs and --shape exclude each other (the .npz gives the shapes)")
    shapes = parse_shapes(shape)
    model = _load(path, signature, threads=threads)
    if inputs is None and not shapes and model.example_inputs is None:
        _need_shapes(path, model.inputs)
    feeds = bench_inputs(model, inputs=inputs, shapes=shapes)
    if float_input:
        for s in model.inputs:
            if s.quantization is not None and feeds[s.name].dtype.kind in "iu":
                feeds[s.name] = dequantize(feeds[s.name], s.quantization)
    result = bench_model(model, feeds, runs=runs)
    result["inputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in feeds.items()}
    if as_json:
        emit_json(result)
        return
    table = Table("", "p50 µs", "p95 µs", "p99 µs", "per s")
    for side in ("agent", "bare"):
        r = result[side]
        table.add_row(
            side, f"{r['p50_us']:.1f}", f"{r['p95_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['throughput_per_s']:.0f}"
        )
    shown = ", ".join(f"{k}={'x'.join(map(str, v['shape'])) or 'scalar'}" for k, v in result["inputs"].items())
    console.print(f"[bold]{path}[/]  {result['runtime']['runtime']}  threads={threads or 'default'}  runs={runs}")
    sig = result["runtime"].get("signature")
    typer.echo(f"inputs: {shown or '(none)'}" + (f"  signature: {sig}" if sig else ""))
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
    """Check hashes and manifest, load the model, run its golden self-test, and run its pipeline on a
    synthetic input (refused when the pipeline does not fit the model)."""
    from edgefleet.agent.selftest import verify_bundle
    from edgefleet.errors import BundleError

    report = verify_bundle(str(bundle))
    pipe = report.get("pipeline") or {}
    if as_json:
        emit_json(report)
    else:
        g = report["golden"]
        golden = "none" if g is None else ("passed" if g["passed"] else "FAILED") + f" ({g['samples']} samples)"
        checked = pipe.get("checked")
        shown = (
            "" if "error" in pipe else f"  pipeline {'fits (on a synthetic ' + checked + ')' if checked else 'not run'}"
        )
        typer.echo(f"{bundle}: {report['name']} {report['version']}  hashes ok  model loads  golden {golden}{shown}")
        if g and g["failures"]:
            for f in g["failures"][:10]:
                typer.echo(f"  {f}")
    if "error" in pipe:
        raise BundleError(pipe["error"])
    if not report["ok"]:
        raise EdgefleetError(f"{bundle}: golden self-test failed")


from edgefleet.cli.convert import convert, quantize  # noqa: E402  (registered last: the converters' commands)

app.command("quantize")(quantize)
app.command("convert")(convert)

from edgefleet.cli import fleet as fleet_cmd  # noqa: E402  (the fleet server's side of `model`)

app.command("push")(fleet_cmd.push)
app.command("list")(fleet_cmd.list_models)
app.command("show")(fleet_cmd.show)
