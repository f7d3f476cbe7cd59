"""``edgefleet model quantize`` and ``edgefleet model convert`` (registered by :mod:`edgefleet.cli.model`).

Both print the cost report (a table, or JSON with ``--json``), write it to ``--report FILE`` if asked
(also when the accuracy gate fails, to show why), and exit 1 with one line when anything is wrong;
the model file is written only when everything passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import typer
from rich.console import Console

from edgefleet.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from edgefleet.converters.report import Report

__all__ = ["convert", "quantize"]

console = Console()

_JSON = typer.Option(False, "--json", help="Print the report as JSON.")
_REPORT = typer.Option(None, "--report", help="Also write the report as JSON to this file.")
_BENCH = typer.Option(200, "--bench-runs", min=0, help="Timed calls per model for the latency figures (0: skip).")
_DROP = typer.Option(
    None, "--max-accuracy-drop", min=0.0, help="Fail (and write nothing) if accuracy falls by more points than this."
)
_LABELS = typer.Option(
    None, "--labels", help="Class labels for accuracy: a .npy file, or a key of the validation .npz (e.g. y)."
)
_NO_GAIN = typer.Option(
    False, "--allow-no-gain", help="Write the model even when nothing was quantized or it is larger (exit 0)."
)
_VALIDATION = typer.Option(
    None, "--validation", help="Data the report compares models on (.npz by input name; default: the calibration data)."
)


def _finish(report: Report, report_file: Path | None, as_json: bool) -> None:
    from edgefleet.converters.report import render
    from edgefleet.durable import atomic_write_bytes

    data = report.to_dict()
    if report_file is not None:
        try:
            atomic_write_bytes(report_file, (json.dumps(data, indent=2) + "\n").encode())
        except OSError as e:
            raise ConfigError(f"--report {report_file}: cannot write: {e.strerror or e}") from e
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        console.print(render(report))
    if not report.passed:
        raise ModelError(report.gate_message())
    if not as_json:
        console.print(f"wrote {report.output} ({report.size_after:,} bytes)")
    for w in report.no_gain:  # written anyway (--allow-no-gain): say so where a script sees it too
        typer.echo(f"warning: {report.output}: {w}", err=True)


def quantize(
    model: Path = typer.Argument(..., help="The float .onnx model."),
    out: Path = typer.Option(..., "-o", "--out", help="The quantized .onnx to write."),
    calibration: Path | None = typer.Option(
        None, "--calibration", help=".npz keyed by input name, or a folder of images (with --pipeline)."
    ),
    mode: Literal["static", "dynamic"] = typer.Option("static", "--mode"),
    per_channel: bool = typer.Option(False, "--per-channel", help="One scale per output channel of each weight."),
    fmt: Literal["qdq", "qoperator"] | None = typer.Option(None, "--format", help="Static only (default qdq)."),
    method: Literal["minmax", "entropy", "percentile"] | None = typer.Option(
        None, "--method", help="Calibration method, static only (default minmax)."
    ),
    exclude: list[str] = typer.Option([], "--exclude", help="Nodes to keep in float (names, comma separated)."),
    pipeline: Path | None = typer.Option(
        None, "--pipeline", help="Pre-processing for image folders: JSON/TOML pipeline, or a .efb bundle's own."
    ),
    samples: int = typer.Option(300, "--calibration-samples", min=1, help="Calibration samples used, at most."),
    validation: Path | None = _VALIDATION,
    labels: str | None = _LABELS,
    bench_runs: int = _BENCH,
    max_accuracy_drop: float | None = _DROP,
    allow_no_gain: bool = _NO_GAIN,
    report_file: Path | None = _REPORT,
    as_json: bool = _JSON,
) -> None:
    """Quantize an ONNX model to int8 with onnxruntime, and report what it cost."""
    from edgefleet.converters.quantize import QuantizeOptions, exclude_list, quantize_onnx

    if mode == "dynamic" and (fmt is not None or method is not None):
        raise ConfigError("--format and --method apply to static quantization; dynamic has neither")
    options = QuantizeOptions(
        mode=mode,
        fmt=fmt or "qdq",
        method=method or "minmax",
        per_channel=per_channel,
        exclude=exclude_list(exclude),
        max_samples=samples,
        allow_no_gain=allow_no_gain,
    )
    report = quantize_onnx(
        model, out, options, calibration, validation, labels, pipeline, bench_runs, max_accuracy_drop
    )
    _finish(report, report_file, as_json)


def convert(
    src: Path = typer.Argument(..., help="A .keras/.h5 file, a SavedModel folder, a torch .pt, a scikit-learn .pkl."),
    out: Path = typer.Option(..., "-o", "--out", help="The .tflite (from TensorFlow) or .onnx (torch, scikit-learn)."),
    framework: Literal["keras", "savedmodel", "torch", "sklearn"] | None = typer.Option(
        None, "--from", help="Source framework (default: from the name)."
    ),
    quantize: Literal["none", "dynamic", "float16", "int8"] = typer.Option(
        "none", "--quantize", help="int8 = full integer, needs --representative; float16 is TFLite only."
    ),
    io_type: Literal["float32", "int8", "uint8"] = typer.Option(
        "float32", "--io-type", help="Input/output type of a full-integer TFLite model."
    ),
    representative: Path | None = typer.Option(
        None, "--representative", help=".npz keyed by input name: calibration for --quantize int8."
    ),
    input_shape: list[str] = typer.Option(
        [], "--input-shape", help="[NAME:]D1,D2,... per input (torch: an example shape; scikit-learn: features)."
    ),
    opset: int = typer.Option(17, "--opset", min=11, help="ONNX opset of torch and scikit-learn exports."),
    samples: int = typer.Option(300, "--representative-samples", min=1, help="Representative samples used, at most."),
    validation: Path | None = _VALIDATION,
    labels: str | None = _LABELS,
    bench_runs: int = _BENCH,
    max_accuracy_drop: float | None = _DROP,
    allow_no_gain: bool = _NO_GAIN,
    report_file: Path | None = _REPORT,
    as_json: bool = _JSON,
) -> None:
    """Convert Keras/SavedModel to TFLite, or torch/scikit-learn to ONNX, and report what it cost."""
    from edgefleet.converters.convert import ConvertOptions, convert_model, parse_input_shape

    options = ConvertOptions(
        framework=framework,
        quantize=quantize,
        io_type=io_type,
        input_shapes=tuple(parse_input_shape(s) for s in input_shape),
        opset=opset,
        max_samples=samples,
        allow_no_gain=allow_no_gain,
    )
    report = convert_model(src, out, options, representative, validation, labels, bench_runs, max_accuracy_drop)
    _finish(report, report_file, as_json)
