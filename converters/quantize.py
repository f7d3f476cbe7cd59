"""``edgefleet model quantize``: an ONNX model to int8 with onnxruntime's quantizer, and what it cost.

Order of work, so that a failure leaves nothing behind:

1. load the float model with edgefleet's runtime and refuse ops onnxruntime cannot run (a custom
   domain op cannot be calibrated nor rewritten);
2. check the calibration / validation data and the labels against the model's inputs;
3. in a private temp folder: shape-inference pre-processing (``quant_pre_process``), name unnamed
   nodes (so ``--exclude`` and the report can name them), quantize, load the result;
4. measure the report (:mod:`edgefleet.converters.report`) and apply ``--max-accuracy-drop``;
5. only then copy the model to its destination atomically (temp file in the same folder, fsync,
   ``os.replace``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edgefleet.agent.runtime import Model, detect_runtime, load_model
from edgefleet.converters.calibration import SampleSet, load_data, load_labels, make_samples, ort_reader
from edgefleet.converters.report import Report, is_quant_op, measure, onnx_float_nodes, onnx_nodes
from edgefleet.durable import atomic_writer
from edgefleet.errors import ConfigError, ModelError

__all__ = [
    "QuantizeOptions",
    "check_gate_options",
    "check_output",
    "commit",
    "exclude_list",
    "load_pipeline_for",
    "quantize_onnx",
    "quiet",
    "require",
]

log = logging.getLogger(__name__)

# Domains onnxruntime's CPU build has kernels for; an op from any other domain is a custom op.
_ORT_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc"}


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize. ``fmt`` and ``method`` apply to static quantization only."""

    mode: Literal["static", "dynamic"] = "static"
    fmt: Literal["qdq", "qoperator"] = "qdq"
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = False
    exclude: tuple[str, ...] = ()
    max_samples: int = 300  # calibration samples used, at most (the validation set is used whole)
    allow_no_gain: bool = False  # write the model even when nothing was quantized or it grew


def require(module: str, extra: str) -> Any:
    """Import ``module`` or raise a :class:`ModelError` naming the extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelError(
            f"{module} is not installed: install the [{extra}] extra (pip install -e '.[{extra}]' from a "
            f"checkout, or 'edgefleet-VERSION-py3-none-any.whl[{extra}]'; make test-full installs them all)"
        ) from e


def commit(tmp: Path, out: Path) -> None:
    """Copy a finished file to ``out`` atomically and durably (edgefleet's one durable-write helper)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(out) as f, tmp.open("rb") as src:
            shutil.copyfileobj(src, f, 1 << 20)
    except OSError as e:
        raise ConfigError(f"-o {out}: cannot write: {e.strerror or e}") from e


def check_output(out: Path, src: Path) -> None:
    """Refuse an output path that is a folder or the source itself."""
    if out.is_dir():
        raise ConfigError(f"-o {out}: is a folder; give the model file to write")
    if out.exists() and out.resolve() == src.resolve():
        raise ConfigError(f"-o {out}: the output would overwrite the input model")


def load_pipeline_for(model: Model, pipeline: str | os.PathLike[str] | None) -> Any:
    """A :class:`~edgefleet.agent.pipeline.Pipeline` from a JSON/TOML file or a bundle's manifest."""
    from edgefleet.agent.pipeline import Pipeline

    if pipeline is None:
        return None
    p = Path(pipeline)
    if p.suffix == ".efb":
        from edgefleet.bundle.archive import read_manifest

        return Pipeline(model, read_manifest(p).pipeline)
    from edgefleet.converters.package import load_pipeline

    return Pipeline(model, load_pipeline(p))


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence what the frameworks print while they work (fds 1 and 2, ``sys.stdout``, warnings, and
    log records below ERROR: onnxruntime's quantizer logs through the root logger), so that stdout
    holds only the report and stderr only edgefleet's one line. Process-wide: meant for the CLI and
    scripts, not for a server thread."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no fds 1/2 to silence (a daemon): the Python-level silencing still applies
        saved = []
    disabled = logging.root.manager.disable
    try:
        with open(os.devnull, "wb") as null, contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            for fd in (1, 2)[: len(saved)]:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=False):
            os.dup2(copy, fd)
            os.close(copy)
        logging.disable(disabled)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_ops(proto: Any, where: Path) -> None:
    """Refuse custom-domain ops and a model that is already quantized (one line each)."""
    quant: dict[str, int] = {}
    for name, n, _ in onnx_nodes(proto.graph):
        if n.domain not in _ORT_DOMAINS:
            raise ModelError(
                f"{where}: node {n.name or name!r} is the custom op {n.domain}::{n.op_type}, which "
                "onnxruntime has no kernel for: it can be neither calibrated nor quantized (and no device can run it)"
            )
        if is_quant_op(n.op_type):
            quant[n.op_type] = quant.get(n.op_type, 0) + 1
    if quant:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(quant.items()))
        raise ModelError(
            f"{where}: already quantized ({ops}): quantizing it again would stack new scales on the old "
            "ones; quantize its float original instead"
        )


def _preprocess(src: Path, dst: Path) -> Any:
    """Shape inference and basic optimization (onnxruntime's recommended first step), then a name
    for every node. Falls back to ONNX's shape inference alone where the symbolic one gives up."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    require("sympy", "convert")  # the symbolic shape inference needs it
    try:
        with quiet():
            quant_pre_process(str(src), str(dst))
    except Exception as e:  # onnxruntime raises bare Exceptions here
        log.info("%s: symbolic shape inference failed (%s); using ONNX shape inference only", src, _first_line(e))
        try:
            with quiet():
                quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception as e2:
            raise ModelError(f"{src}: shape inference before quantization failed: {_first_line(e2)}") from e2
    proto = onnx.load(str(dst))
    _name_nodes(proto.graph)
    onnx.save(proto, str(dst))
    return proto


def _name_nodes(graph: Any) -> None:
    """``OpType_index`` for every unnamed node, unique within its graph, in subgraph bodies too (the
    report names a body node by its If/Loop/Scan, its body and its own name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, n in enumerate(graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
        for a in n.attribute:
            for g in [a.g] if a.HasField("g") else list(a.graphs):
                _name_nodes(g)


_NO_KERNEL = re.compile(r"implementation for (\w+)\(\d+\) node with name '([^']*)'")


def _load_quantized(path: Path, src: Path, opts: QuantizeOptions) -> Model:
    try:
        return load_model(path)
    except ModelError as e:
        m = _NO_KERNEL.search(str(e))
        if m is None:
            raise ModelError(f"{src}: the quantized model does not load in onnxruntime: {_first_line(e)}") from e
        hint = "try --format qdq" if opts.fmt == "qoperator" else "try --mode static --format qdq"
        raise ModelError(
            f"{src}: node {m.group(2)!r} quantized to {m.group(1)}, which onnxruntime has no kernel for; "
            f"{hint}, or --exclude {m.group(2)}"
        ) from e


def _run_quantizer(pre: Path, out: Path, opts: QuantizeOptions, cal: SampleSet | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    common: dict[str, Any] = {
        "per_channel": opts.per_channel,
        "weight_type": QuantType.QInt8,
        "nodes_to_exclude": list(opts.exclude) or None,
    }
    with quiet():
        if opts.mode == "dynamic":
            quantize_dynamic(pre, out, **common)
            return
        assert cal is not None
        histogram = opts.method != "minmax"
        quantize_static(
            pre,
            out,
            # The histogram calibrators stack every batch's outputs: they need batches of one size.
            ort_reader(cal, batch=32 if opts.method == "minmax" else 1),
            quant_format=QuantFormat.QDQ if opts.fmt == "qdq" else QuantFormat.QOperator,
            activation_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
                "percentile": CalibrationMethod.Percentile,
            }[opts.method],
            # onnxruntime 1.2x-1.3x: with per-channel weights, the int32-bias scale check breaks on the
            # histogram calibrators' thresholds ("truth value of an array ... is ambiguous").
            extra_options={"QDQDisableWeightAdjustForInt32Bias": True} if histogram and opts.per_channel else None,
            **common,
        )


def quantize_onnx(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: QuantizeOptions = QuantizeOptions(),
    calibration: str | os.PathLike[str] | None = None,
    validation: str | os.PathLike[str] | None = None,
    labels: str | None = None,
    pipeline: str | os.PathLike[str] | None = None,
    bench_runs: int = 200,
    max_accuracy_drop: float | None = None,
) -> Report:
    """Quantize ``src`` to ``out`` and return the report.

    ``calibration`` (required for static) is an ``.npz`` keyed by input name or a folder of images
    run through ``pipeline``; ``validation`` (default: the calibration data) is what the report
    compares the two models on; ``labels`` is a ``.npy`` file or a key of the validation ``.npz``.
    ``out`` is written only when the report passes ``max_accuracy_drop`` (points) and, unless
    ``options.allow_no_gain``, quantizing gained something (some node quantized, the file no larger);
    otherwise the returned report has ``passed`` false and nothing is written.

    Raises :class:`ModelError` for a model or data problem (naming the file, node or input; an
    already-quantized model is one) and
    :class:`ConfigError` for options that do not fit together; nothing is written then either.
    """
    src_p, out_p = Path(src), Path(out)
    _check_options(options, calibration, validation, labels, max_accuracy_drop)
    check_output(out_p, src_p)
    onnx = require("onnx", "convert")
    require("onnxruntime.quantization", "convert")
    if src_p.is_file() and detect_runtime(src_p) == "tflite":
        raise ModelError(
            f"{src_p}: a TFLite model; model quantize takes ONNX models (TFLite models are quantized "
            "when converted: model convert --quantize int8|dynamic|float16)"
        )
    try:
        proto = onnx.load(str(src_p), load_external_data=False)
    except FileNotFoundError as e:
        raise ModelError(f"{src_p}: no such model file") from e
    except Exception as e:  # protobuf's DecodeError and friends
        raise ModelError(f"{src_p}: not an ONNX model: {_first_line(e)}") from e
    _check_ops(proto, src_p)
    before = load_model(src_p)
    pipe = load_pipeline_for(before, pipeline)
    cal = val = None
    raw: dict[str, Any] = {}
    if calibration is not None:
        raw = load_data(calibration, before.inputs, pipe)
        val = cal = make_samples(raw, before.inputs, str(calibration))
        cal = cal.head(options.max_samples)
    if validation is not None:
        raw = load_data(validation, before.inputs, pipe)
        val = make_samples(raw, before.inputs, str(validation))
    y = load_labels(labels, raw, val.count, val.source) if labels is not None and val is not None else None
    skip = ("allow_no_gain",) if options.mode == "static" else ("allow_no_gain", "fmt", "method")
    settings = {k: v for k, v in asdict(options).items() if k not in skip}
    report = Report("quantize", str(src_p), str(out_p), f"float model {src_p}", settings, src_p.stat().st_size, 0)
    with tempfile.TemporaryDirectory(prefix="edgefleet-quantize-") as tmp:
        pre, q = Path(tmp) / "preprocessed.onnx", Path(tmp) / "quantized.onnx"
        pre_proto = _preprocess(src_p, pre)
        names = {n.name for _, n, _ in onnx_nodes(pre_proto.graph)}
        unknown = [n for n in options.exclude if n not in names]
        if unknown:
            some = sorted(names)[:12]
            raise ConfigError(f"--exclude: no node named {unknown} in {src_p}; its nodes include {some}")
        try:
            _run_quantizer(pre, q, options, cal)
        except Exception as e:  # onnxruntime's quantizer raises whatever its step raised
            hint = ""
            if options.fmt == "qoperator" and options.per_channel and options.method != "minmax":
                hint = " (a known onnxruntime failure of --per-channel with this --method: try --format qdq)"
            raise ModelError(f"{src_p}: onnxruntime's quantizer failed: {_first_line(e)}{hint}") from e
        after = _load_quantized(q, src_p, options)
        report.size_after = q.stat().st_size
        measure(report, before, after, val, y, bench_runs)
        nodes = onnx_float_nodes(pre_proto, onnx.load(str(q)), qdq=options.mode == "static" and options.fmt == "qdq")
        report.float_nodes, report.quantized_nodes, report.subgraph_nodes = nodes[:3]
        if nodes.float_in_bodies:
            report.warnings.append(
                f"{nodes.float_in_bodies} node(s) inside If/Loop/Scan bodies left in float: onnxruntime's "
                "quantizer does not quantize subgraphs"
            )
        report.check_gain()
        report.apply_gate(max_accuracy_drop, options.allow_no_gain)
        if report.passed:
            commit(q, out_p)
    return report


def _check_options(
    o: QuantizeOptions,
    calibration: object,
    validation: object,
    labels: str | None,
    max_drop: float | None,
) -> None:
    if o.mode not in ("static", "dynamic"):
        raise ConfigError(f"--mode: expected static or dynamic, got {o.mode!r}")
    if o.fmt not in ("qdq", "qoperator"):
        raise ConfigError(f"--format: expected qdq or qoperator, got {o.fmt!r}")
    if o.method not in ("minmax", "entropy", "percentile"):
        raise ConfigError(f"--method: expected minmax, entropy or percentile, got {o.method!r}")
    if o.mode == "static" and calibration is None:
        raise ConfigError("--calibration: static quantization needs calibration data (.npz or a folder of images)")
    if o.max_samples < 1:
        raise ConfigError(f"--calibration-samples: expected at least 1, got {o.max_samples}")
    check_gate_options(calibration or validation, labels, max_drop)


def check_gate_options(data: object, labels: str | None, max_drop: float | None) -> None:
    if labels is not None and data is None:
        raise ConfigError("--labels: needs validation data (--validation or --calibration) to compare on")
    if max_drop is not None and labels is None:
        raise ConfigError("--max-accuracy-drop: needs --labels (accuracy is measured against them)")
    if max_drop is not None and max_drop < 0:
        raise ConfigError(f"--max-accuracy-drop: expected points >= 0, got {max_drop}")


def exclude_list(values: Sequence[str]) -> tuple[str, ...]:
    """``--exclude a,b --exclude c`` to ``("a", "b", "c")``."""
    return tuple(n.strip() for v in values for n in v.split(",") if n.strip())
