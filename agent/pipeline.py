"""Pre- and post-processing declared in a bundle's manifest, applied with OpenCV and numpy.

Images are handled as OpenCV gives them: HWC, BGR, uint8. Steps run in the order the manifest lists;
after them a batch axis is added when the data is one rank short of the model's input. The result of
:meth:`Pipeline.run` is plain JSON (lists, floats, strings): ``model`` and what the post-processing
steps add; the model's raw outputs only when asked for (``raw_outputs`` in the spec or the call), since
a detector's or segmenter's are hundreds of KB of JSON per sample.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.bundle.manifest import (
    CastStep,
    CenterCropStep,
    ColorStep,
    LayoutStep,
    NormalizeStep,
    PipelineSpec,
    PostStep,
    PreStep,
    ResizeStep,
    ScaleStep,
    SoftmaxStep,
    TopKStep,
)
from edgefleet.errors import PipelineError

__all__ = ["Pipeline", "decode_image", "postprocess", "preprocess"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


def _cv2() -> Any:
    import cv2

    return cv2


def decode_image(data: bytes, where: str = "image") -> np.ndarray[Any, Any]:
    """Encoded image bytes (PNG, JPEG, ...) to an HWC BGR uint8 array."""
    cv2 = _cv2()
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise PipelineError(f"{where}: not a decodable image ({len(data)} bytes)")
    return img  # type: ignore[no-any-return]


def load_input(data: Any) -> Any:
    """Bytes, a path (image, ``.npy``), a list or an array, to an array."""
    if isinstance(data, bytes | bytearray | memoryview):
        return decode_image(bytes(data))
    if isinstance(data, str | os.PathLike):
        p = Path(data)
        if not p.is_file():
            raise PipelineError(f"{p}: no such file")
        if p.suffix.lower() == ".npy":
            try:
                return np.load(p, allow_pickle=False)
            except ValueError as e:
                raise PipelineError(f"{p}: not a readable .npy array: {e}") from e
        if p.suffix.lower() in _IMAGE_SUFFIXES:
            return decode_image(p.read_bytes(), str(p))
        raise PipelineError(f"{p}: unsupported file type {p.suffix!r} (images or .npy)")
    if isinstance(data, np.ndarray | Mapping):
        return data
    try:
        return np.asarray(data)
    except (ValueError, TypeError) as e:
        raise PipelineError(f"input cannot be read as an array: {e}") from e


def _hwc(x: np.ndarray[Any, Any], op: str) -> np.ndarray[Any, Any]:
    if x.ndim == 2:
        return x[:, :, None]
    if x.ndim != 3:
        raise PipelineError(f"step {op}: expected an image (HW or HWC), got shape {list(x.shape)}")
    return x


def _resize(x: np.ndarray[Any, Any], s: ResizeStep) -> np.ndarray[Any, Any]:
    cv2 = _cv2()
    interp = {
        "nearest": cv2.INTER_NEAREST,
        "linear": cv2.INTER_LINEAR,
        "area": cv2.INTER_AREA,
        "cubic": cv2.INTER_CUBIC,
    }[s.interpolation]
    x = _hwc(x, "resize")
    if x.dtype not in (np.uint8, np.float32):
        x = x.astype(np.float32)
    h, w = x.shape[:2]
    if s.keep_aspect:
        return _keep_aspect(x, s, interp)
    assert s.width is not None and s.height is not None  # the manifest requires both without keep_aspect
    if s.mode == "stretch":
        out = cv2.resize(x, (s.width, s.height), interpolation=interp)
    else:
        r = min(s.width / w, s.height / h)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        inner = cv2.resize(x, (nw, nh), interpolation=interp)
        out = np.full((s.height, s.width, x.shape[2]), s.pad_value, dtype=x.dtype)
        top, left = (s.height - nh) // 2, (s.width - nw) // 2
        out[top : top + nh, left : left + nw] = inner.reshape(nh, nw, -1)
    return out.reshape(s.height, s.width, -1)  # type: ignore[no-any-return]


def _keep_aspect(x: np.ndarray[Any, Any], s: ResizeStep, interp: int) -> np.ndarray[Any, Any]:
    """Scale to fit ``width`` and/or ``height`` keeping the aspect ratio, then pad right and bottom
    with ``pad_value`` up to a multiple of ``multiple`` (the image stays at the top left, so a
    coordinate on the model's input maps back by the scale alone)."""
    cv2 = _cv2()
    h, w, c = x.shape
    ratios = [t / d for t, d in ((s.width, w), (s.height, h)) if t is not None]
    r = min(ratios)
    nw, nh = max(1, round(w * r)), max(1, round(h * r))
    inner = cv2.resize(x, (nw, nh), interpolation=interp).reshape(nh, nw, c) if (nw, nh) != (w, h) else x
    m = s.multiple
    ph, pw = -(-nh // m) * m, -(-nw // m) * m
    if (ph, pw) == (nh, nw):
        return inner
    out = np.full((ph, pw, c), s.pad_value, dtype=x.dtype)
    out[:nh, :nw] = inner
    return out


def _crop(x: np.ndarray[Any, Any], s: CenterCropStep) -> np.ndarray[Any, Any]:
    x = _hwc(x, "center_crop")
    h, w = x.shape[:2]
    if s.height > h or s.width > w:
        raise PipelineError(f"step center_crop: {s.width}x{s.height} is larger than the image {w}x{h}")
    top, left = (h - s.height) // 2, (w - s.width) // 2
    return x[top : top + s.height, left : left + s.width]


def _color(x: np.ndarray[Any, Any], s: ColorStep) -> np.ndarray[Any, Any]:
    x = _hwc(x, "color")
    if s.source == s.target:
        return x
    channels = x.shape[2]
    if s.target == "gray" and channels == 1:
        return x  # already one channel (a gray image, or an array fed straight in)
    if s.source == "gray":
        if channels != 1:
            raise PipelineError(f"step color: source gray needs 1 channel, got {channels}")
        return np.repeat(x, 3, axis=2)
    if channels != 3:
        raise PipelineError(f"step color: source {s.source} needs 3 channels, got {channels}")
    if s.target == "gray":
        rgb = x if s.source == "rgb" else x[:, :, ::-1]
        w = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        g = rgb.astype(np.float32) @ w
        return (np.rint(g).astype(x.dtype) if x.dtype.kind in "iu" else g.astype(x.dtype))[:, :, None]
    # The same channel swap either way, but contiguous: the next step's astype on a reversed view
    # costs ~10x a contiguous one (4.4 vs 0.3 ms on a 640x480 frame; bench/flows.py).
    if x.dtype in (np.uint8, np.uint16, np.float32):
        return _cv2().cvtColor(np.ascontiguousarray(x), _cv2().COLOR_BGR2RGB)  # type: ignore[no-any-return]
    return np.ascontiguousarray(x[:, :, ::-1])


def _normalize(x: np.ndarray[Any, Any], s: NormalizeStep) -> np.ndarray[Any, Any]:
    c = x.shape[-1] if x.ndim == 3 else 1
    for field, vals in (("mean", s.mean), ("std", s.std)):
        if len(vals) not in (1, c):
            raise PipelineError(f"step normalize: {field} has {len(vals)} values, the data has {c} channels")
    mean = np.asarray(s.mean, dtype=np.float32)
    std = np.asarray(s.std, dtype=np.float32)
    return (x.astype(np.float32) - mean) / std  # type: ignore[no-any-return]


def _layout(x: np.ndarray[Any, Any], s: LayoutStep) -> np.ndarray[Any, Any]:
    x = _hwc(x, "layout")
    return np.ascontiguousarray(x.transpose(2, 0, 1)) if s.target == "nchw" else x


def preprocess(data: np.ndarray[Any, Any], steps: Sequence[PreStep]) -> np.ndarray[Any, Any]:
    """Apply the steps in order."""
    x = data
    for s in steps:
        if isinstance(s, ResizeStep):
            x = _resize(x, s)
        elif isinstance(s, CenterCropStep):
            x = _crop(x, s)
        elif isinstance(s, ColorStep):
            x = _color(x, s)
        elif isinstance(s, NormalizeStep):
            x = _normalize(x, s)
        elif isinstance(s, ScaleStep):
            x = np.multiply(x, np.float32(s.factor), dtype=np.float32)  # one pass, one new array
            if s.offset:
                x += np.float32(s.offset)
        elif isinstance(s, LayoutStep):
            x = _layout(x, s)
        elif isinstance(s, CastStep):
            x = x.astype(s.dtype)
    return x


def _softmax(x: np.ndarray[Any, Any], axis: int) -> np.ndarray[Any, Any]:
    x = x.astype(np.float32)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)  # type: ignore[no-any-return]


def _axis(x: np.ndarray[Any, Any], axis: int, op: str) -> int:
    if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
        raise PipelineError(f"step {op}: axis {axis} is out of range for shape {list(x.shape)}")
    return axis % x.ndim


def _nest(flat: list[Any], shape: Sequence[int]) -> Any:
    """A flat list as nested lists of ``shape`` (``[]`` shape: the one element)."""
    if not shape:
        return flat[0]
    step = len(flat) // shape[0] if shape[0] else 0
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _ranked(
    x: np.ndarray[Any, Any], axis: int | None, k: int, op: str, labels: Sequence[str] | None
) -> tuple[list[list[dict[str, Any]]], tuple[int, ...]]:
    """The ``k`` best entries of every vector along ``axis`` (None: of the whole output), and the
    shape of the other axes (``()`` when there is one vector)."""
    rest: tuple[int, ...] = ()
    if axis is None:
        rows = x.reshape(1, -1)
    else:
        a = _axis(x, axis, op)
        moved = np.moveaxis(x, a, -1)
        rest = tuple(int(d) for d in moved.shape[:-1])
        rows = moved.reshape(-1, moved.shape[-1])
    if rows.shape[1] == 0:
        raise PipelineError(f"step {op}: the output is empty")
    k = min(k, rows.shape[1])
    idx = np.argsort(-rows, axis=1, kind="stable")[:, :k]
    best = [
        [{"index": int(i), "label": _label(labels, int(i)), "score": float(row[i])} for i in ids]
        for row, ids in zip(rows, idx, strict=True)
    ]
    return best, rest


def postprocess(out: np.ndarray[Any, Any], steps: Sequence[PostStep], labels: Sequence[str] | None) -> dict[str, Any]:
    """Apply post-processing to one sample's output; returns the JSON-ready additions.

    ``argmax``/``topk`` read the whole output as one vector of class scores, or with ``axis`` each
    vector along that axis (then ``class``, ``label``, ``score`` and ``top_k`` are nested lists over
    the other axes; ``label`` is None without labels). Raises :class:`PipelineError` for an axis
    out of range or an empty output.
    """
    result: dict[str, Any] = {}
    x = out
    for s in steps:
        if isinstance(s, SoftmaxStep):
            x = _softmax(x, _axis(x, s.axis, "softmax"))
            result["scores"] = x.tolist()
            continue
        k = s.k if isinstance(s, TopKStep) else 1
        best, rest = _ranked(x, s.axis, k, s.op, labels)
        if isinstance(s, TopKStep):
            result["top_k"] = _nest(best, rest)
        else:
            result["class"] = _nest([b[0]["index"] for b in best], rest)
            result["label"] = _nest([b[0]["label"] for b in best], rest) if labels is not None else None
            result["score"] = _nest([b[0]["score"] for b in best], rest)
    return result


def _label(labels: Sequence[str] | None, i: int) -> str | None:
    return labels[i] if labels is not None and i < len(labels) else None


class Pipeline:
    """A model with its pre- and post-processing: raw data in, a JSON-ready result out.

    Raises :class:`PipelineError` when the spec names an input or output the model does not have.
    """

    def __init__(self, model: Model, spec: PipelineSpec | None = None, labels: Sequence[str] | None = None):
        self.model = model
        self.spec = spec if spec is not None else (model.manifest.pipeline if model.manifest else PipelineSpec())
        self.labels = list(labels) if labels is not None else model.labels
        names = [s.name for s in model.outputs]
        self.input = self.spec.input or model.inputs[0].name
        self.output = self.spec.output or names[0]
        spec_in = next((s for s in model.inputs if s.name == self.input), None)
        if spec_in is None:
            raise PipelineError(
                f"pipeline input {self.input!r}: the model's inputs are {[s.name for s in model.inputs]}"
            )
        if self.output not in names:
            raise PipelineError(f"pipeline output {self.output!r}: the model's outputs are {names}")
        self._rank = len(spec_in.shape)
        self.raw_outputs = self._raw(self.spec.raw_outputs)

    def _raw(self, raw: bool | Sequence[str]) -> tuple[str, ...]:
        names = [s.name for s in self.model.outputs]
        if isinstance(raw, bool):
            return tuple(names) if raw else ()
        unknown = [n for n in raw if n not in names]
        if unknown:
            raise PipelineError(f"raw_outputs: no output(s) {unknown}; the model's outputs are {names}")
        return tuple(raw)

    def prepare(self, data: Any) -> dict[str, Any]:
        """Raw data to the model's input feeds."""
        x = load_input(data)
        if isinstance(x, Mapping):
            feeds = dict(x)
            if self.input in feeds:
                feeds[self.input] = self._pre(load_input(feeds[self.input]))
            return feeds
        return {self.input: self._pre(x)}

    def _pre(self, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        x = preprocess(x, self.spec.preprocess)
        if x.ndim == self._rank - 1:
            x = x[None]
        return x

    def run(self, data: Any, raw_outputs: bool | Sequence[str] | None = None) -> dict[str, Any]:
        """Pre-process, predict, post-process one sample; the result is plain JSON.

        ``raw_outputs`` (default: the spec's, which defaults to off) adds ``"outputs"``, the model's
        raw outputs as lists: ``True`` for all, or the names wanted. Raises :class:`PipelineError`
        for data the steps cannot take or an unknown output name, and
        :class:`~edgefleet.errors.ModelError` when the model refuses the prepared input.
        """
        raw = self.raw_outputs if raw_outputs is None else self._raw(raw_outputs)
        outputs = self.model.predict(self.prepare(data))
        return {"model": self.model.name, **self.finish(outputs, raw)}

    def finish(self, outputs: Mapping[str, np.ndarray[Any, Any]], raw: Sequence[str] = ()) -> dict[str, Any]:
        """The post-processed result of one sample's model outputs (a batch of one is unwrapped), with
        ``"outputs"`` holding the ``raw`` ones as lists."""
        result: dict[str, Any] = {}
        if raw:
            result["outputs"] = {k: outputs[k].tolist() for k in raw}
        out = outputs[self.output]
        if out.ndim >= 1 and out.shape[0] == 1:
            out = out[0]
        result.update(postprocess(out, self.spec.postprocess, self.labels))
        return result
