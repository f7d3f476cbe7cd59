"""The golden self-test: a bundle's stored inputs must give its stored outputs within tolerance; and
the pipeline check: the bundle's pre- and post-processing must fit its model.

``golden.npz`` holds ``input.NAME`` and ``output.NAME`` arrays whose first axis is the sample; each
sample is exactly what ``predict`` is fed (so a model with a fixed batch of one is fed one at a time).

:func:`check_pipeline` runs the pipeline on a synthetic input made from what it declares: an image
(HWC, uint8, BGR or gray as the colour step's source) of the resize step's size, else of the crop's,
else of the model input's height and width; zeros of the model's input shape when no step takes an
image. Other inputs of a multi-input model get the golden sample's values, else zeros. A pipeline
whose prepared input does not fit the model (layout, shape, dtype), that the model refuses, or whose
post-processing names a missing output or an axis out of range is refused with one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.bundle.archive import read_npz
from edgefleet.bundle.manifest import (
    CenterCropStep,
    ColorStep,
    GoldenRef,
    LayoutStep,
    PipelineSpec,
    ResizeStep,
    shown,
)
from edgefleet.errors import BundleError, EdgefleetError

__all__ = ["GoldenReport", "check_pipeline", "load_golden", "run_golden", "synthetic_input", "verify_bundle"]


@dataclass
class GoldenReport:
    passed: bool
    samples: int
    max_abs_error: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "samples": self.samples,
            "max_abs_error": self.max_abs_error,
            "failures": self.failures,
        }


def load_golden(
    data: bytes, where: str = "golden.npz"
) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, np.ndarray[Any, Any]]]:
    """(inputs, outputs) by tensor name. Raises :class:`BundleError` for a malformed file, or one whose
    arrays declare more than their bytes hold (checked before anything is allocated)."""
    arrays = read_npz(data, where)
    ins = {k[6:]: v for k, v in arrays.items() if k.startswith("input.")}
    outs = {k[7:]: v for k, v in arrays.items() if k.startswith("output.")}
    if not ins or not outs:
        raise BundleError(f"{where}: needs input.NAME and output.NAME arrays, has {shown(sorted(arrays))}")
    counts = {v.shape[0] if v.ndim else -1 for v in (*ins.values(), *outs.values())}
    if len(counts) != 1 or -1 in counts:
        raise BundleError(f"{where}: every array must have the same number of samples on its first axis")
    return ins, outs


def run_golden(model: Model, data: bytes, ref: GoldenRef, where: str = "golden.npz") -> GoldenReport:
    """Run every golden sample and compare with ``ref``'s tolerance; never raises for a mismatch.

    A stateful model runs the samples in order from its initial state (as they were recorded) and is
    reset afterwards, so that what it serves next does not start from the self-test's state."""
    ins, outs = load_golden(data, where)
    model.reset()
    try:
        return _compare(model, ins, outs, ref)
    finally:
        model.reset()


def _compare(
    model: Model, ins: dict[str, np.ndarray[Any, Any]], outs: dict[str, np.ndarray[Any, Any]], ref: GoldenRef
) -> GoldenReport:
    n = next(iter(ins.values())).shape[0]
    report = GoldenReport(passed=True, samples=n)
    for i in range(n):
        try:
            got = model.predict({k: v[i] for k, v in ins.items()})
        except EdgefleetError as e:
            report.passed = False
            report.failures.append(f"sample {i}: {e}")
            continue
        for name, want in outs.items():
            if name not in got:
                report.passed = False
                report.failures.append(f"sample {i}: output {name!r} missing")
                continue
            g = got[name]
            if g.shape != want[i].shape:
                report.passed = False
                report.failures.append(
                    f"sample {i}: output {name!r} shape {list(g.shape)}, expected {list(want[i].shape)}"
                )
                continue
            err = float(np.max(np.abs(g.astype(np.float64) - want[i].astype(np.float64)))) if g.size else 0.0
            report.max_abs_error[name] = max(report.max_abs_error.get(name, 0.0), err)
            if not np.allclose(g, want[i], rtol=ref.rtol, atol=ref.atol):
                report.passed = False
                report.failures.append(
                    f"sample {i}: output {name!r} differs by {err:.3g} (rtol={ref.rtol}, atol={ref.atol})"
                )
    return report


def verify_bundle(path: str, threads: int | None = None) -> dict[str, Any]:
    """Check a bundle end to end: every member's hash, the manifest, that the model loads and matches
    the manifest, and the golden self-test. Returns a JSON-ready report with ``ok``; raises
    :class:`BundleError` / :class:`~edgefleet.errors.ModelError` for a bundle that cannot be read."""
    from edgefleet.agent.runtime import load_model
    from edgefleet.bundle.archive import BundleReader

    with BundleReader(path) as b:
        b.verify_hashes()
        manifest = b.manifest
        golden = b.read(manifest.golden.path) if manifest.golden else None
    model = load_model(path, threads=threads)
    report: dict[str, Any] = {
        "bundle": str(path),
        "name": manifest.name,
        "version": manifest.version,
        "runtime": manifest.runtime,
        "hashes": "ok",
        "model": "loads, tensors match the manifest",
        "golden": None,
        "ok": True,
    }
    if manifest.golden is not None and golden is not None:
        g = run_golden(model, golden, manifest.golden, f"{path}: {manifest.golden.path}")
        report["golden"] = g.to_dict()
        report["ok"] = g.passed
    try:
        report["pipeline"] = {"checked": check_pipeline(model, manifest.pipeline, where=f"{path}: pipeline")}
    except BundleError as e:
        report["pipeline"] = {"checked": None, "error": str(e)}
        report["ok"] = False
    return report


_IMAGE_STEPS = (ResizeStep, CenterCropStep, ColorStep, LayoutStep)
_FALLBACK_SIDE = 64  # pixels: the synthetic image's side when nothing declares one


def _dims(shape: tuple[int | None, ...], example: np.ndarray[Any, Any] | None) -> tuple[int, ...] | None:
    """A concrete shape: the example's, else the fixed dims with a leading dynamic batch of one;
    None when another dim is dynamic."""
    if example is not None:
        return tuple(int(d) for d in example.shape)
    out = []
    for i, d in enumerate(shape):
        if d is None:
            if i != 0 or len(shape) < 2:
                return None
            d = 1
        out.append(d)
    return tuple(out)


def synthetic_input(model: Model, spec: PipelineSpec) -> tuple[Any, str] | None:
    """Raw data for the pipeline's input made from what the pipeline declares (see the module
    docstring), and a description of it; None when nothing says what shape would be valid."""
    name = spec.input or model.inputs[0].name
    tensor = next((s for s in model.inputs if s.name == name), None)
    if tensor is None:
        return None  # Pipeline() names the missing input
    example = (model.example_inputs or {}).get(name)
    if not any(isinstance(s, _IMAGE_STEPS) for s in spec.preprocess):
        dims = _dims(tensor.shape, example)
        if dims is None:
            return None
        dtype = tensor.dtype if tensor.quantization is None or spec.preprocess else np.dtype(np.float32)
        return np.zeros(dims, dtype=dtype), f"{dtype} zeros of shape {list(dims)}"
    color = next((s for s in spec.preprocess if isinstance(s, ColorStep)), None)
    layout = next((s for s in spec.preprocess if isinstance(s, LayoutStep)), None)
    resize = next((s for s in spec.preprocess if isinstance(s, ResizeStep)), None)
    crop = next((s for s in spec.preprocess if isinstance(s, CenterCropStep)), None)
    hw_c = _image_dims(tensor.shape, layout)
    h: int | None
    w: int | None
    if resize is not None:
        h, w = resize.height or resize.width, resize.width or (2 * resize.height if resize.height else None)
    elif crop is not None:
        h, w = crop.height, crop.width
    else:
        h, w = hw_c[0], hw_c[1]
    h, w = h or _FALLBACK_SIDE, w or _FALLBACK_SIDE
    channels = hw_c[2] or 3  # the model's own channels, unless a colour step says what it takes
    if color is not None:
        channels = 1 if color.source == "gray" else 3
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    return image, f"{w}x{h} image, {channels} channel(s), uint8"


def _image_dims(shape: tuple[int | None, ...], layout: LayoutStep | None) -> tuple[int | None, ...]:
    """(height, width, channels) of an image input, from the model's shape alone: channels are the
    side (first or last of the last three dims) of 1, 3 or 4 values; the layout step decides only
    when both sides could be (the synthetic image must not take the pipeline's word for it)."""
    if len(shape) < 3:
        return (None, None, None)
    a, b, c = shape[-3:]
    first, last = a in (1, 3, 4), c in (1, 3, 4)
    channels_first = first and not last if first != last else (layout is not None and layout.target == "nchw")
    return (b, c, a) if channels_first else (a, b, c)


def _prepared_shapes(feeds: dict[str, Any]) -> str:
    return ", ".join(f"{k} {list(np.shape(v))} {np.asarray(v).dtype}" for k, v in feeds.items())


def check_pipeline(
    model: Model, spec: PipelineSpec, labels: list[str] | None = None, where: str = "pipeline"
) -> str | None:
    """Run ``spec`` with ``model`` on a synthetic input; returns what was fed (None when the
    pipeline has no steps, or no valid shape is known: dynamic dims and no golden sample).

    Raises :class:`BundleError` naming ``where`` and the cause when the pipeline does not fit the
    model (an input or output it names that the model lacks, a prepared input of the wrong layout,
    shape or dtype, a model error on it, a post-processing axis out of range). A stateful model is
    reset afterwards."""
    import json

    from edgefleet.agent.pipeline import Pipeline

    if spec == PipelineSpec():
        return None
    try:
        pipeline = Pipeline(model, spec, labels=labels)
    except EdgefleetError as e:
        raise BundleError(f"{where}: {e}") from e
    made = synthetic_input(model, spec)
    if made is None:
        return None
    data, desc = made
    try:
        prepared = pipeline.prepare(data)
    except EdgefleetError as e:
        raise BundleError(f"{where}: on a synthetic {desc}: preprocess fails: {e}") from e
    feeds: dict[str, Any] = {}
    for s in model.inputs:
        if s.name in prepared:
            feeds[s.name] = prepared[s.name]
            continue
        example = (model.example_inputs or {}).get(s.name)
        dims = _dims(s.shape, example)
        if dims is None:
            return None
        feeds[s.name] = example if example is not None else np.zeros(dims, dtype=s.dtype)
    try:
        model.prepare(feeds)
    except EdgefleetError as e:
        hint = _layout_hint(model, pipeline.input, prepared.get(pipeline.input))
        raise BundleError(
            f"{where}: on a synthetic {desc}, the preprocess gives {_prepared_shapes(prepared)}, which does "
            f"not fit the model: {e}{hint}"
        ) from e
    try:
        others = {k: v for k, v in feeds.items() if k != pipeline.input}
        result = pipeline.run({**others, pipeline.input: data} if others else data)
        json.dumps(result)
    except EdgefleetError as e:
        raise BundleError(f"{where}: on a synthetic {desc}: {e}") from e
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: on a synthetic {desc}: the result is not JSON: {e}") from e
    finally:
        model.reset()
    return desc


def _layout_hint(model: Model, name: str, x: Any) -> str:
    """A hint when a rank-4 image input has its channels on the other side from the model's."""
    spec = next((s for s in model.inputs if s.name == name), None)
    if spec is None or x is None or np.ndim(x) != 4 or len(spec.shape) != 4:
        return ""
    got, want = list(np.shape(x)), list(spec.shape)
    first, last = want[1] in (1, 3, 4), want[3] in (1, 3, 4)
    if first and not last and got[3] == want[1] and got[1] != want[1]:
        return " (channels last, the model takes them first: a layout step with target 'nchw'?)"
    if last and not first and got[1] == want[3] and got[3] != want[3]:
        return " (channels first, the model takes them last: a layout step with target 'nhwc'?)"
    return ""
