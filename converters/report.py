"""What a conversion or quantization cost, measured: size, latency, agreement, accuracy, error.

Both models run through edgefleet's own runtime (:func:`edgefleet.agent.load_model`) and latency
comes from :func:`edgefleet.agent.benchmark.bench_model`, the harness of ``edgefleet model bench``,
so the figures are the ones a device would see on this machine's CPU. Comparing outputs is pure
numpy (:func:`compare_outputs`); the nodes left in float are read from the model files
(:func:`onnx_float_nodes`, :func:`tflite_float_ops`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.converters.calibration import SampleSet

__all__ = ["Report", "compare_outputs", "measure", "onnx_float_nodes", "render", "tflite_float_ops"]

Array = np.ndarray[Any, Any]
_FLOAT_ONNX = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto)
_QDQ = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_SHAPE_ONLY = {"Shape", "Size", "SHAPE"}  # read a tensor's shape, never its values


@dataclass
class Report:
    """One conversion's figures; ``to_dict`` is the JSON every command prints with ``--json``.

    ``before`` is the float model (the input of ``quantize``; the float conversion for ``convert``),
    ``after`` the model written. Accuracies are fractions in [0, 1]; the drop is in points (0-100).
    """

    command: str
    source: str
    output: str
    before: str
    settings: dict[str, Any]
    size_before: int
    size_after: int
    latency_runs: int = 0
    latency_before: dict[str, float] | None = None
    latency_after: dict[str, float] | None = None
    validation: str | None = None
    samples: int = 0
    compared_output: str | None = None
    top1_agreement: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    max_abs_error: float | None = None
    mean_abs_error: float | None = None
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)
    quantized_nodes: int = 0
    max_accuracy_drop: float | None = None
    passed: bool = True

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return round((self.accuracy_before - self.accuracy_after) * 100.0, 4)

    def apply_gate(self, max_drop: float | None) -> None:
        """Mark the report failed when accuracy fell by more than ``max_drop`` points."""
        self.max_accuracy_drop = max_drop
        drop = self.accuracy_drop_points
        self.passed = max_drop is None or (drop is not None and drop <= max_drop)

    def gate_message(self) -> str:
        return (
            f"{self.output}: accuracy fell {self.accuracy_drop_points:.2f} points "
            f"({_pct(self.accuracy_before)} -> {_pct(self.accuracy_after)} on {self.samples} samples of "
            f"{self.validation}), more than --max-accuracy-drop {self.max_accuracy_drop:g}; nothing written"
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {
            "command": d["command"],
            "source": d["source"],
            "output": d["output"],
            "before": d["before"],
            "settings": d["settings"],
            "size_bytes": {
                "before": self.size_before,
                "after": self.size_after,
                "ratio": round(self.size_before / self.size_after, 3) if self.size_after else None,
            },
            "latency_us": {"runs": self.latency_runs, "before": self.latency_before, "after": self.latency_after},
            "validation": {"data": self.validation, "samples": self.samples, "output": self.compared_output},
            "top1_agreement": self.top1_agreement,
            "accuracy": {
                "before": self.accuracy_before,
                "after": self.accuracy_after,
                "drop_points": self.accuracy_drop_points,
            },
            "max_abs_error": self.max_abs_error,
            "mean_abs_error": self.mean_abs_error,
            "outputs": d["outputs"],
            "float_nodes": d["float_nodes"],
            "quantized_nodes": self.quantized_nodes,
            "gate": {"max_accuracy_drop": self.max_accuracy_drop, "passed": self.passed},
        }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _run_all(model: Model, samples: SampleSet) -> dict[str, Array]:
    parts: dict[str, list[Array]] = {}
    for feed in samples.feeds(64):
        for k, v in model.predict(feed).items():
            parts.setdefault(k, []).append(v if samples.batchable else v[None])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _scores_output(outs: dict[str, Array]) -> str | None:
    """The output a top-1 is read from: the first float one with a class axis."""
    return next((k for k, v in outs.items() if v.dtype.kind == "f" and v.ndim >= 2), None)


def compare_outputs(before: dict[str, Array], after: dict[str, Array], labels: Array | None) -> dict[str, Any]:
    """Agreement, errors and accuracies of two models' outputs on the same samples (pure numpy).

    Outputs are paired by name, else by position. Returns the fields of :class:`Report` it fills.
    """
    pairs = [(k, k) for k in before] if set(before) == set(after) else list(zip(before, after, strict=False))
    per: dict[str, dict[str, float]] = {}
    for kb, ka in pairs:
        b, a = before[kb], after[ka]
        if b.dtype.kind == "f" and a.shape == b.shape and b.size:
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            per[kb] = {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean())}
    name = _scores_output(before)
    result: dict[str, Any] = {"outputs": per, "compared_output": name}
    if name is None:
        return result
    after_name = dict(pairs)[name]
    pb = before[name].argmax(axis=-1).reshape(before[name].shape[0], -1)
    pa = after[after_name].argmax(axis=-1).reshape(after[after_name].shape[0], -1)
    result["top1_agreement"] = float((pb == pa).mean())
    if name in per:
        result["max_abs_error"] = per[name]["max_abs_error"]
        result["mean_abs_error"] = per[name]["mean_abs_error"]
    if labels is not None and pb.shape[1] == 1:
        result["accuracy_before"] = float((pb[:, 0] == labels).mean())
        result["accuracy_after"] = float((pa[:, 0] == labels).mean())
    return result


def measure(
    report: Report, before: Model, after: Model, samples: SampleSet | None, labels: Array | None, runs: int
) -> Report:
    """Fill ``report`` with latency (``runs`` timed calls each; 0 skips it) and, given samples,
    the output comparison."""
    from edgefleet.agent.benchmark import bench_model, random_inputs

    if runs > 0:
        feeds = samples.feed(0, 1) if samples is not None else random_inputs(before.inputs)
        report.latency_runs = runs
        for side, model in (("before", before), ("after", after)):
            r = bench_model(model, feeds, runs=runs, warmup=min(20, runs))["agent"]
            setattr(report, f"latency_{side}", {"p50": round(r["p50_us"], 2), "p99": round(r["p99_us"], 2)})
    if samples is not None:
        report.validation, report.samples = samples.source, samples.count
        fields = compare_outputs(_run_all(before, samples), _run_all(after, samples), labels)
        for k, v in fields.items():
            setattr(report, k, v)
    return report


def _onnx_types(model: Any) -> dict[str, int]:
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here; the declared types still count
        pass
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in (*g.input, *g.value_info, *g.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    return types


def onnx_float_nodes(float_model: Any, quantized: Any, qdq: bool) -> tuple[list[str], int]:
    """``(nodes left in float, nodes quantized)`` among the float model's nodes that compute on float
    tensors, as ``"name (Op)"``.

    A node is quantized when the quantizer replaced it by an integer op (or fused it away), or, in QDQ
    format, when every input that was float is now fed by a ``DequantizeLinear`` (onnxruntime then runs
    it as an integer kernel). In QOperator form a node that kept its op is float if a float tensor
    reaches it (float tensors are traced from the graph inputs and ``DequantizeLinear`` outputs).
    """
    types = _onnx_types(float_model)
    floaty = [
        (k, n)
        for k, n in enumerate(float_model.graph.node)
        if n.op_type not in _QDQ | _SHAPE_ONLY and any(types.get(i, 1) in _FLOAT_ONNX for i in n.input if i)
    ]
    if quantized is float_model:  # nothing was quantized
        return [f"{n.name or f'{n.op_type}_{k}'} ({n.op_type})" for k, n in floaty], 0
    qg = quantized.graph
    by_name = {n.name: n for n in qg.node if n.name}
    producer = {o: n.op_type for n in qg.node for o in n.output}
    float_tensors = {i.name for i in qg.input if i.type.tensor_type.elem_type in _FLOAT_ONNX}
    float_tensors |= {t.name for t in qg.initializer if t.data_type in _FLOAT_ONNX}
    for n in qg.node:  # graph nodes are topologically sorted
        op = n.op_type
        if op == "DequantizeLinear" or (op.startswith("DynamicQuantize") and op != "DynamicQuantizeLinear"):
            out_float = True
        elif op in _QDQ or op.startswith("QLinear") or op in ("QGemm", "QAttention") or op.endswith("Integer"):
            out_float = False
        elif op == "Cast":
            out_float = any(a.name == "to" and a.i in _FLOAT_ONNX for a in n.attribute)
        elif op in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero"):
            out_float = False
        else:
            out_float = op == "ConstantOfShape" or any(i in float_tensors for i in n.input if i)
        if out_float:
            float_tensors.update(n.output)
    left: list[str] = []
    for _, n in floaty:
        q = by_name.get(n.name)
        if q is None or q.op_type != n.op_type or len(q.input) != len(n.input):
            continue  # replaced by an integer op, or fused
        was_float = [qi for fi, qi in zip(n.input, q.input, strict=True) if fi and types.get(fi, 1) in _FLOAT_ONNX]
        if qdq:
            is_float = any(producer.get(qi) != "DequantizeLinear" for qi in was_float)
        else:
            is_float = any(qi in float_tensors for qi in q.input if qi)
        if is_float:
            left.append(f"{n.name} ({n.op_type})")
    return left, len(floaty) - len(left)


def tflite_float_ops(model: bytes) -> tuple[list[str], int]:
    """``(ops still float, ops quantized)`` of a TFLite model, as ``"OP#index"``.

    An op is float when any of its tensors is float32/float16 (a dynamic-range "hybrid" op with int8
    weights and float activations counts as float); QUANTIZE/DEQUANTIZE and delegate nodes are left out.
    """
    from edgefleet.agent.backends.litert import import_litert

    interpreter_cls, _, _ = import_litert()
    it = interpreter_cls(model_content=model)
    dtypes = {d["index"]: np.dtype(d["dtype"]) for d in it.get_tensor_details()}
    left: list[str] = []
    quantized = 0
    for op in it._get_ops_details():
        name = op["op_name"]
        if name in ("DELEGATE", "QUANTIZE", "DEQUANTIZE") or name in _SHAPE_ONLY:
            continue
        kinds = {dtypes[i] for i in (*op["inputs"], *op["outputs"]) if i >= 0 and i in dtypes}
        if any(k in (np.float32, np.float16) for k in kinds):
            left.append(f"{name}#{op['index']}")
        elif any(k in (np.int8, np.uint8, np.int16) for k in kinds):
            quantized += 1
    return left, quantized


def _fmt_lat(lat: dict[str, float] | None, key: str) -> str:
    return "-" if lat is None else f"{lat[key]:.1f}"


def render(report: Report) -> Any:
    """The report as a rich renderable (a table and a few lines)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(
        "", "before", "after", title=f"{report.command} {Path(report.source).name} -> {Path(report.output).name}"
    )
    ratio = report.size_before / report.size_after if report.size_after else 0.0
    table.add_row("size (bytes)", f"{report.size_before:,}", f"{report.size_after:,}  ({ratio:.2f}x smaller)")
    table.add_row("latency p50 (µs)", _fmt_lat(report.latency_before, "p50"), _fmt_lat(report.latency_after, "p50"))
    table.add_row("latency p99 (µs)", _fmt_lat(report.latency_before, "p99"), _fmt_lat(report.latency_after, "p99"))
    if report.accuracy_before is not None:
        drop = report.accuracy_drop_points
        table.add_row("accuracy", _pct(report.accuracy_before), f"{_pct(report.accuracy_after)}  (drop {drop:.2f} pts)")
    lines: list[Any] = [table, Text(f"before = {report.before}")]
    if report.validation is not None:
        lines.append(
            Text(
                f"on {report.samples} samples of {report.validation} (output {report.compared_output}): "
                f"top-1 agreement {_pct(report.top1_agreement)}, max |error| {_num(report.max_abs_error)}, "
                f"mean |error| {_num(report.mean_abs_error)}"
            )
        )
    shown = ", ".join(report.float_nodes[:12]) + (" ..." if len(report.float_nodes) > 12 else "")
    lines.append(
        Text(f"quantized nodes {report.quantized_nodes}; left in float {len(report.float_nodes)}: {shown or 'none'}")
    )
    if report.max_accuracy_drop is not None:
        verdict = "passed" if report.passed else "FAILED"
        lines.append(Text(f"gate --max-accuracy-drop {report.max_accuracy_drop:g}: {verdict}"))
    return Group(*lines)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"
