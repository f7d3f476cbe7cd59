"""What a conversion or quantization cost, measured: size, latency, agreement, accuracy, error.

Both models run through edgefleet's own runtime (:func:`edgefleet.agent.load_model`) and latency
comes from :func:`edgefleet.agent.benchmark.bench_model`, the harness of ``edgefleet model bench``,
so the figures are the ones a device would see on this machine's CPU. Comparing outputs is pure
numpy (:func:`compare_outputs`); the nodes left in float are read from the model files
(:func:`onnx_float_nodes`, :func:`tflite_float_ops`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.converters.calibration import SampleSet, iter_samples

__all__ = [
    "NodeCount",
    "Report",
    "compare_outputs",
    "is_quant_op",
    "measure",
    "onnx_float_nodes",
    "onnx_nodes",
    "output_kind",
    "render",
    "tflite_float_ops",
]

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
    cosine_similarity: float | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)
    quantized_nodes: int = 0
    subgraph_nodes: int = 0  # nodes inside If/Loop/Scan bodies (counted in the two figures above)
    max_accuracy_drop: float | None = None
    allow_no_gain: bool = False
    no_gain: list[str] = field(default_factory=list)  # why quantizing gained nothing (empty: it did)
    warnings: list[str] = field(default_factory=list)
    passed: bool = True

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.accuracy_before is None or self.accuracy_after is None:
            return None
        return round((self.accuracy_before - self.accuracy_after) * 100.0, 4)

    def check_gain(self, nodes: bool = True) -> None:
        """Record in ``no_gain`` (and ``warnings``) that nothing was quantized (when ``nodes``: the
        float model had nodes to quantize and none was) or that the output is larger than the input."""
        self.no_gain = []
        if nodes and self.quantized_nodes == 0:
            self.no_gain.append(f"nothing was quantized ({len(self.float_nodes)} node(s) left in float)")
        if self.size_after > self.size_before:
            self.no_gain.append(f"the output is larger ({self.size_after:,} > {self.size_before:,} bytes)")
        self.warnings.extend(self.no_gain)

    def apply_gate(self, max_drop: float | None, allow_no_gain: bool = True) -> None:
        """Mark the report failed when accuracy fell by more than ``max_drop`` points, or, unless
        ``allow_no_gain``, when :meth:`check_gain` found no gain."""
        self.max_accuracy_drop = max_drop
        self.allow_no_gain = allow_no_gain
        drop = self.accuracy_drop_points
        accuracy_ok = max_drop is None or (drop is not None and drop <= max_drop)
        self.passed = accuracy_ok and (allow_no_gain or not self.no_gain)

    def gate_message(self) -> str:
        """One line saying why the gate failed (and that nothing was written)."""
        drop, why = self.accuracy_drop_points, []
        if self.max_accuracy_drop is not None and drop is None:
            why.append(
                f"--max-accuracy-drop: no accuracy measured (output {self.compared_output} is not one row of "
                "class scores per sample)"
            )
        elif self.max_accuracy_drop is not None and drop is not None and drop > self.max_accuracy_drop:
            why.append(
                f"accuracy fell {drop:.2f} points ({_pct(self.accuracy_before)} -> {_pct(self.accuracy_after)} "
                f"on {self.samples} samples of {self.validation}), more than --max-accuracy-drop "
                f"{self.max_accuracy_drop:g}"
            )
        if self.no_gain and not self.allow_no_gain:
            why.append("; ".join(self.no_gain) + " (--allow-no-gain writes it anyway)")
        return f"{self.output}: {'; '.join(why)}; nothing written"

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
            "cosine_similarity": self.cosine_similarity,
            "outputs": d["outputs"],
            "float_nodes": d["float_nodes"],
            "quantized_nodes": self.quantized_nodes,
            "subgraph_nodes": self.subgraph_nodes,
            "warnings": d["warnings"],
            "gate": {
                "max_accuracy_drop": self.max_accuracy_drop,
                "allow_no_gain": self.allow_no_gain,
                "no_gain": d["no_gain"],
                "passed": self.passed,
            },
        }


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.2f}%"


def _run_all(model: Model, samples: SampleSet) -> dict[str, Array]:
    """Every output for every sample, one sample per call, stacked: ``(N, *output shape)``."""
    parts: dict[str, list[Array]] = {}
    for feed in iter_samples(samples.arrays):
        for k, v in model.predict(feed).items():
            parts.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in parts.items()}


def output_kind(stacked: Array, shape: Sequence[int | None] | None = None) -> tuple[str, int | None]:
    """``("scores", class axis of stacked)`` for class scores, ``("dense", None)`` for a float map,
    sequence or other tensor, ``("other", None)`` for a non-float output.

    ``stacked`` is ``(N, *output shape)``; ``shape`` the output's declared shape. Class scores have
    exactly one fixed axis of two or more (the classes) and every other axis 1 or a dynamic leading
    batch axis, as ``[batch, 10]``; ``[1, T, 12]`` (a sequence), ``[1, 4, H, W]`` (a map) and
    ``[batch, 1]`` (one probability) are dense. Without ``shape``, the data's own: one axis of two or
    more. An embedding ``[1, 128]`` looks like scores: its top-1 means nothing, its errors do.
    """
    if stacked.dtype.kind != "f":
        return "other", None
    dims = list(stacked.shape[1:]) if shape is None else list(shape)
    if len(dims) != stacked.ndim - 1:
        return "dense", None
    big = [i for i, d in enumerate(dims) if d is not None and d >= 2]
    rest_ok = all(d == 1 or (d is None and i == 0 and shape is not None) for i, d in enumerate(dims) if i not in big)
    return ("scores", big[0] + 1) if len(big) == 1 and rest_ok else ("dense", None)


def _cosine(a: Array, b: Array) -> float:
    """Mean over samples of the cosine similarity of the flattened outputs (1 where both are zero)."""
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    na, nb = np.linalg.norm(a2, axis=1), np.linalg.norm(b2, axis=1)
    dot = (a2 * b2).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, np.finfo(np.float64).tiny))
    return float(np.clip(cos, -1.0, 1.0).mean())


def compare_outputs(
    before: dict[str, Array],
    after: dict[str, Array],
    labels: Array | None,
    shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> dict[str, Any]:
    """Agreement, errors and accuracies of two models' outputs on the same samples (pure numpy).

    Outputs are ``(N, *output shape)`` per model, paired by name, else by position; ``shapes`` are
    the declared output shapes by name (see :func:`output_kind`). Every float output gets
    ``max_abs_error``, ``mean_abs_error`` and ``cosine_similarity``; a class-score output also
    ``top1_agreement`` (over every row of every sample) and, given ``labels`` and one row per
    sample, accuracies. The compared output is the first class-score output, else the first float
    one. Returns the fields of :class:`Report` it fills.
    """
    pairs = [(k, k) for k in before] if set(before) == set(after) else list(zip(before, after, strict=False))
    per: dict[str, dict[str, Any]] = {}
    top1: dict[str, tuple[Array, Array]] = {}
    for kb, ka in pairs:
        b, a = before[kb], after[ka]
        kind, axis = output_kind(b, (shapes or {}).get(kb))
        if kind == "other" or a.shape != b.shape or not b.size:
            continue
        b64, a64 = b.astype(np.float64), a.astype(np.float64)
        diff = np.abs(a64 - b64)
        per[kb] = {
            "kind": kind,
            "max_abs_error": float(diff.max()),
            "mean_abs_error": float(diff.mean()),
            "cosine_similarity": round(_cosine(b64, a64), 6),
        }
        if axis is not None:
            pb, pa = (x.argmax(axis=axis).reshape(x.shape[0], -1) for x in (b, a))
            top1[kb] = (pb, pa)
            per[kb]["top1_agreement"] = float((pb == pa).mean())
    name = next((k for k in per if per[k]["kind"] == "scores"), next(iter(per), None))
    result: dict[str, Any] = {"outputs": per, "compared_output": name}
    if name is None:
        return result
    for k in ("max_abs_error", "mean_abs_error", "cosine_similarity", "top1_agreement"):
        if k in per[name]:
            result[k] = per[name][k]
    if labels is not None and name in top1 and top1[name][0].shape[1] == 1:
        pb, pa = top1[name]
        result["accuracy_before"] = float((pb[:, 0] == labels).mean())
        result["accuracy_after"] = float((pa[:, 0] == labels).mean())
    return result


def measure(
    report: Report, before: Model, after: Model, samples: SampleSet | None, labels: Array | None, runs: int
) -> Report:
    """Fill ``report`` with latency (``runs`` timed calls each on sample 0, or on the inputs
    :func:`~edgefleet.agent.benchmark.bench_inputs` chooses; 0 skips it) and, given samples, the
    output comparison. A model with dynamic dims and no samples gets no latency, and a warning."""
    from edgefleet.agent.benchmark import bench_inputs, bench_model
    from edgefleet.errors import ModelError

    if runs > 0:
        feeds: dict[str, Array] | None = None
        if samples is not None:
            feeds = samples.feed(0, 1)
        else:
            try:
                feeds = bench_inputs(before)
            except ModelError:  # dynamic dims other than the batch: no shape known to be valid
                dyn = [s.describe() for s in before.inputs if None in s.shape]
                report.warnings.append(
                    f"latency not measured: no samples to take a shape from for input(s) {', '.join(dyn)} "
                    "(give --validation or --calibration data)"
                )
        if feeds is not None:
            report.latency_runs = runs
            for side, model in (("before", before), ("after", after)):
                r = bench_model(model, feeds, runs=runs, warmup=min(20, runs))["agent"]
                setattr(report, f"latency_{side}", {"p50": round(r["p50_us"], 2), "p99": round(r["p99_us"], 2)})
    if samples is not None:
        report.validation, report.samples = samples.source, samples.count
        shapes = {o.name: o.shape for o in before.outputs}
        fields = compare_outputs(_run_all(before, samples), _run_all(after, samples), labels, shapes)
        for k, v in fields.items():
            setattr(report, k, v)
    return report


def onnx_nodes(graph: Any, scope: str = "") -> Iterator[tuple[str, Any, str]]:
    """Every node of ``graph`` and, depth first, of the ``If``/``Loop``/``Scan`` bodies inside it:
    ``(qualified name, node, scope)``. A body node's name is ``OUTER/ATTRIBUTE/NAME`` (for example
    ``If_1/then_branch/MatMul_0``), its scope ``OUTER/ATTRIBUTE/`` (``""`` for the main graph); an
    unnamed node is ``OpType_index``."""
    for k, n in enumerate(graph.node):
        name = f"{scope}{n.name or f'{n.op_type}_{k}'}"
        yield name, n, scope
        for a in n.attribute:
            for j, g in enumerate([a.g] if a.HasField("g") else list(a.graphs)):
                tag = a.name if a.HasField("g") else f"{a.name}[{j}]"
                yield from onnx_nodes(g, f"{name}/{tag}/")


def is_quant_op(op: str) -> bool:
    """An op that only a quantized model holds (Q/DQ, QLinear*, *Integer, dynamic quantization)."""
    return (
        op in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QGemm", "QAttention")
        or op.startswith(("QLinear", "DynamicQuantize"))
        or op.endswith("Integer")
    )


class NodeCount(NamedTuple):
    """What :func:`onnx_float_nodes` found."""

    float_nodes: list[str]  # "name (Op)", left in float
    quantized: int
    in_bodies: int  # of all the nodes counted, those inside If/Loop/Scan bodies
    float_in_bodies: int  # of float_nodes, those inside bodies


def _graphs(graph: Any) -> Iterator[Any]:
    yield graph
    for _, n, _ in onnx_nodes(graph):
        for a in n.attribute:
            yield from ([a.g] if a.HasField("g") else list(a.graphs))


def _onnx_types(model: Any) -> dict[str, int]:
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort here; the declared types still count
        pass
    types: dict[str, int] = {}
    for g in _graphs(model.graph):  # body tensors are scoped, but their names rarely clash
        types.update({t.name: t.data_type for t in g.initializer})
        for v in (*g.input, *g.value_info, *g.output):
            if v.type.HasField("tensor_type"):
                types[v.name] = v.type.tensor_type.elem_type
    return types


def _float_outputs(graph: Any, float_tensors: set[str]) -> None:
    """Trace float tensors through ``graph`` (topologically sorted) into ``float_tensors``."""
    float_tensors |= {i.name for i in graph.input if i.type.tensor_type.elem_type in _FLOAT_ONNX}
    float_tensors |= {t.name for t in graph.initializer if t.data_type in _FLOAT_ONNX}
    for n in graph.node:
        op = n.op_type
        bodies = [g for a in n.attribute for g in ([a.g] if a.HasField("g") else list(a.graphs))]
        for g in bodies:
            _float_outputs(g, float_tensors)
        if bodies:
            out_float = any(o.name in float_tensors for g in bodies for o in g.output)
        elif op == "DequantizeLinear" or (op.startswith("DynamicQuantize") and op != "DynamicQuantizeLinear"):
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


def onnx_float_nodes(float_model: Any, quantized: Any, qdq: bool) -> NodeCount:
    """The float model's nodes that compute on float tensors, split into left in float and
    quantized, counting the nodes inside ``If``/``Loop``/``Scan`` bodies (onnxruntime's quantizer
    leaves those in float: a count of ``graph.node`` alone would show "nothing left in float" for
    a model it did not touch).

    In a scope (the main graph, or one body) holding no quantization op at all, every such node is
    left in float, whatever the quantizer renamed. Elsewhere a node is quantized when the quantizer
    replaced it by an integer op (or fused it away), or, in QDQ format, when every input that was
    float is now fed by a ``DequantizeLinear`` (onnxruntime then runs it as an integer kernel). In
    QOperator form a node that kept its op is float if a float tensor reaches it (float tensors are
    traced from the graph inputs and ``DequantizeLinear`` outputs). Nodes that hold a body (``If``,
    ``Loop``) are not counted themselves: their body nodes are.
    """
    types = _onnx_types(float_model)

    def computes_on_float(n: Any) -> bool:
        if n.op_type in _QDQ | _SHAPE_ONLY or any(a.HasField("g") or len(a.graphs) for a in n.attribute):
            return False
        return any(types.get(i, 1) in _FLOAT_ONNX for i in n.input if i)

    floaty = [(name, n, scope) for name, n, scope in onnx_nodes(float_model.graph) if computes_on_float(n)]
    in_bodies = sum(1 for _, _, scope in floaty if scope)
    left: list[tuple[str, str]] = []  # (name with op, scope)
    if quantized is float_model:  # nothing was quantized
        left = [(f"{name} ({n.op_type})", scope) for name, n, scope in floaty]
        return NodeCount([x for x, _ in left], 0, in_bodies, sum(1 for _, sc in left if sc))
    q_nodes = list(onnx_nodes(quantized.graph))
    by_name = {name: n for name, n, _ in q_nodes}
    producer = {o: n.op_type for _, n, _ in q_nodes for o in n.output}
    touched = {scope for _, n, scope in q_nodes if is_quant_op(n.op_type)}
    float_tensors: set[str] = set()
    _float_outputs(quantized.graph, float_tensors)
    for name, n, scope in floaty:
        q = by_name.get(name)
        if scope not in touched:
            is_float = True
        elif q is None or q.op_type != n.op_type or len(q.input) != len(n.input):
            continue  # replaced by an integer op, or fused
        elif qdq:
            was_float = [qi for fi, qi in zip(n.input, q.input, strict=True) if fi and types.get(fi, 1) in _FLOAT_ONNX]
            is_float = any(producer.get(qi) != "DequantizeLinear" for qi in was_float)
        else:
            is_float = any(qi in float_tensors for qi in q.input if qi)
        if is_float:
            left.append((f"{name} ({n.op_type})", scope))
    return NodeCount([x for x, _ in left], len(floaty) - len(left), in_bodies, sum(1 for _, sc in left if sc))


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
    change = f"{ratio:.2f}x smaller" if ratio >= 1 or not ratio else f"{1 / ratio:.2f}x larger"
    table.add_row("size (bytes)", f"{report.size_before:,}", f"{report.size_after:,}  ({change})")
    table.add_row("latency p50 (µs)", _fmt_lat(report.latency_before, "p50"), _fmt_lat(report.latency_after, "p50"))
    table.add_row("latency p99 (µs)", _fmt_lat(report.latency_before, "p99"), _fmt_lat(report.latency_after, "p99"))
    if report.accuracy_before is not None:
        drop = report.accuracy_drop_points
        table.add_row("accuracy", _pct(report.accuracy_before), f"{_pct(report.accuracy_after)}  (drop {drop:.2f} pts)")
    lines: list[Any] = [table, Text(f"before = {report.before}")]
    if report.validation is not None:
        kind = report.outputs.get(report.compared_output or "", {}).get("kind", "-")
        top1 = f"top-1 agreement {_pct(report.top1_agreement)}, " if report.top1_agreement is not None else ""
        lines.append(
            Text(
                f"on {report.samples} samples of {report.validation} (output {report.compared_output}, {kind}): "
                f"{top1}max |error| {_num(report.max_abs_error)}, mean |error| {_num(report.mean_abs_error)}, "
                f"cosine similarity {_num(report.cosine_similarity, 6)}"
            )
        )
    shown = ", ".join(report.float_nodes[:12]) + (" ..." if len(report.float_nodes) > 12 else "")
    bodies = f" (of them {report.subgraph_nodes} in If/Loop/Scan bodies)" if report.subgraph_nodes else ""
    lines.append(
        Text(
            f"quantized nodes {report.quantized_nodes}; left in float {len(report.float_nodes)}{bodies}: "
            f"{shown or 'none'}"
        )
    )
    lines.extend(Text(f"warning: {w}") for w in report.warnings)
    if report.max_accuracy_drop is not None:
        verdict = "passed" if report.passed else "FAILED"
        lines.append(Text(f"gate --max-accuracy-drop {report.max_accuracy_drop:g}: {verdict}"))
    if report.no_gain:
        lines.append(Text(f"gate no gain: {'allowed (--allow-no-gain)' if report.allow_no_gain else 'FAILED'}"))
    return Group(*lines)


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"
