"""Input drift of live feeds against a bundle's ``baseline.json``: pure accumulators, fixed memory.

The baseline (made by ``converters/package.py`` with :func:`edgefleet.stats.feature_stats`) holds, per
model input, per feature (one element of one sample) the training data's mean, standard deviation and a
histogram (edges and counts, 10 bins). Inputs of more than 256 elements per sample (images, audio) hold
one feature for the whole tensor (``granularity: "tensor"``): every value of every sample pooled.

What is measured, per feature, over the samples seen since the last reset:

- **mean shift**: ``|live mean - baseline mean| / baseline std``, in baseline standard deviations;
- **std ratio**: ``live std / baseline std``; the summary's ``std_ratio_max`` is the largest factor
  either way (``max(r, 1/r)``, so >= 1: a spread halved and a spread doubled both give 2);
- **PSI**, the population stability index ``sum((q - p) * ln(q / p))`` of the live proportions ``q`` on
  the baseline's own bin edges against the baseline's proportions ``p``. Values outside the edges go to
  the end bins (as :func:`edgefleet.stats.histogram` does); a proportion of 0 (an empty bin) counts as
  ``PSI_EPS`` = 1e-4, as :func:`edgefleet.stats.psi` does, so an empty bin gives a large, finite term.

Standard deviations are population ones (``ddof=0``, as the baseline's). A baseline std of 0 (a feature
constant in training, like an always-blank pixel) is floored at ``STD_FLOOR`` (0.1%) of the feature's
histogram range (which is 1 for a constant feature), so its shift is large but finite; the live std is
floored the same way, so a feature constant on both sides has a ratio of 1.

Images and audio (``"tensor"``): the summary features are the pooled mean, std and 10-bin histogram of
the tensor's values, compared with the baseline's pooled ones as above. Each sampled tensor contributes
a fixed random subset of at most ``TENSOR_VALUES`` (4096) of its values, at the same positions every
time (drawn once per input and size, seeded), so a change anywhere in the frame shows at a fixed cost
whatever the resolution; positions are random rather than strided so that no channel or column is
favoured.

Memory: per feature a bin-count row, a sum and a sum of squares (sums of values minus the baseline mean,
which keeps the variance exact in float64 when live data sits near the baseline), never the samples.
Quantized inputs: an integer feed of an input with a scale and zero point is dequantized before it is
measured, since baselines are made from the float data quantized models are calibrated with.
"""

from __future__ import annotations

import math
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import BundleError

__all__ = [
    "MAX_BASELINE_BYTES",
    "PSI_EPS",
    "STD_FLOOR",
    "TENSOR_VALUES",
    "DriftMeter",
    "InputBaseline",
    "InputDrift",
    "load_baseline",
    "parse_baseline",
    "psi_rows",
]

PSI_EPS = 1e-4  # proportion an empty bin counts as (edgefleet.stats.psi's eps)
STD_FLOOR = 1e-3  # floor of a std, as a fraction of the feature's baseline histogram range
TENSOR_VALUES = 4096  # values taken from each sampled tensor of a "tensor" input
MAX_BASELINE_BYTES = 16 << 20  # a baseline.json larger than this is refused, not parsed
_MAX_FEATURES = 1 << 16  # a baseline cannot make the agent allocate more than this many rows
_MAX_BINS = 1024
_SEED = 0x5EED

Array = np.ndarray[Any, Any]


def _sig(v: float) -> float:
    """``v`` to 6 significant digits (telemetry is read by people and thresholds, not re-derived)."""
    return float(f"{v:.6g}") if math.isfinite(v) else v


@dataclass(frozen=True)
class InputBaseline:
    """One input's baseline, checked and as arrays: ``mean``/``std`` of shape (F,), ``edges`` (F, B+1)
    increasing, ``counts`` (F, B)."""

    name: str
    granularity: str
    mean: Array
    std: Array
    edges: Array
    counts: Array

    @property
    def features(self) -> int:
        return int(self.mean.shape[0])

    @classmethod
    def from_dict(cls, name: str, d: Any, where: str = "baseline.json") -> InputBaseline:
        """Parse ``feature_stats``' output. Raises :class:`BundleError` naming the field at fault."""
        at = f"{where}: inputs.{name}"
        if not isinstance(d, Mapping):
            raise BundleError(f"{at}: expected an object, got {type(d).__name__}")
        gran = d.get("granularity")
        if gran not in ("feature", "tensor"):
            raise BundleError(f"{at}.granularity: expected 'feature' or 'tensor', got {gran!r}")

        def arr(key: str, ndim: int) -> Array:
            try:
                a = np.asarray(d.get(key), dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise BundleError(f"{at}.{key}: expected numbers: {e}") from e
            if a.ndim != ndim or a.size == 0:
                raise BundleError(f"{at}.{key}: expected a non-empty {ndim}-D list of numbers")
            if not np.isfinite(a).all():
                raise BundleError(f"{at}.{key}: holds NaN or infinity")
            return a

        mean, std, edges, counts = arr("mean", 1), arr("std", 1), arr("edges", 2), arr("counts", 2)
        f = mean.shape[0]
        if f > _MAX_FEATURES:
            raise BundleError(f"{at}.mean: {f} features; at most {_MAX_FEATURES}")
        if gran == "tensor" and f != 1:
            raise BundleError(f"{at}.mean: a 'tensor' baseline has one feature, got {f}")
        if std.shape != (f,) or edges.shape[0] != f or counts.shape[0] != f:
            raise BundleError(
                f"{at}: mean, std, edges and counts must describe the same {f} features "
                f"(got {std.shape[0]}, {edges.shape[0]}, {counts.shape[0]})"
            )
        bins = counts.shape[1]
        if not 1 <= bins <= _MAX_BINS or edges.shape[1] != bins + 1:
            raise BundleError(f"{at}.edges: expected {bins + 1} edges per feature, {bins} bins (at most {_MAX_BINS})")
        if (np.diff(edges, axis=1) <= 0).any():
            raise BundleError(f"{at}.edges: each feature's edges must increase")
        if (std < 0).any() or (counts < 0).any():
            raise BundleError(f"{at}: std and counts must not be negative")
        return cls(name, gran, mean, std, edges, counts)


def parse_baseline(doc: Any, where: str = "baseline.json") -> dict[str, InputBaseline]:
    """``{"inputs": {name: feature_stats(...)}}`` (or the inner mapping alone) as checked baselines.
    Raises :class:`BundleError` naming the field at fault."""
    if isinstance(doc, Mapping) and "inputs" in doc:
        doc = doc["inputs"]
    if not isinstance(doc, Mapping):
        raise BundleError(f"{where}: inputs: expected an object of input name to statistics")
    return {str(k): InputBaseline.from_dict(str(k), v, where) for k, v in doc.items()}


def load_baseline(path: str | os.PathLike[str]) -> dict[str, InputBaseline] | None:
    """The baseline of the bundle at ``path``, or None when it has none (or ``path`` is a bare model
    file). Raises :class:`BundleError` for a bundle whose baseline is tampered with or malformed."""
    import json

    from edgefleet.bundle.archive import BundleReader

    p = Path(path)
    if not p.is_file() or not tarfile.is_tarfile(p):  # a bare .onnx / .tflite file has no baseline
        return None
    with BundleReader(p) as bundle:
        ref = bundle.manifest.baseline
        if ref is None:
            return None
        if ref.size > MAX_BASELINE_BYTES:
            raise BundleError(f"{p}: {ref.path}: {ref.size} bytes; a baseline is at most {MAX_BASELINE_BYTES}")
        blob = bundle.read(ref.path)
    try:
        doc = json.loads(blob)
    except ValueError as e:
        raise BundleError(f"{p}: {ref.path}: not valid JSON: {e}") from e
    return parse_baseline(doc, f"{p}: {ref.path}")


def psi_rows(expected: Array, actual: Array, eps: float = PSI_EPS) -> Array:
    """PSI of each row of ``actual`` counts against the same row of ``expected`` counts (shape (F, B)
    each); rows with no counts on either side give 0. The vectorised form of :func:`edgefleet.stats.psi`."""
    p_tot = expected.sum(axis=1, keepdims=True)
    q_tot = actual.sum(axis=1, keepdims=True)
    empty = (p_tot[:, 0] == 0) | (q_tot[:, 0] == 0)
    p = np.clip(expected / np.where(p_tot == 0, 1, p_tot), eps, None)
    q = np.clip(actual / np.where(q_tot == 0, 1, q_tot), eps, None)
    out: Array = np.sum((q - p) * np.log(q / p), axis=1)
    out[empty] = 0.0
    return out


class InputDrift:
    """The live side of one input's baseline: bin counts, sums and sums of squares per feature.

    ``add`` takes one feed (any shape: a batch of samples, or one tensor); not thread-safe (the caller
    holds its lock). Feeds whose size does not split into the baseline's features are counted in
    ``skipped`` and otherwise ignored, as are samples holding NaN or infinity."""

    def __init__(self, base: InputBaseline, scale: float | None = None, zero_point: int = 0) -> None:
        self.base = base
        self._inner = np.ascontiguousarray(base.edges[:, 1:-1])  # (F, B-1): bin i is between inner i-1 and i
        self._bins = base.counts.shape[1]
        self._offsets = np.arange(base.features) * self._bins
        rng = base.edges[:, -1] - base.edges[:, 0]
        self._floor = np.maximum(STD_FLOOR * rng, 1e-12)
        self._dequant = (scale, zero_point) if scale is not None else None
        self._positions: tuple[int, Array] | None = None  # (tensor size, value positions) of a "tensor" input
        self.reset()

    def reset(self) -> None:
        f = self.base.features
        self.samples = 0  # samples (rows) measured
        self.values = 0  # values per feature measured (== samples for "feature" inputs)
        self.skipped = 0
        self.sums = np.zeros(f)
        self.squares = np.zeros(f)
        self.counts = np.zeros((f, self._bins), dtype=np.int64)

    def _rows(self, x: Array) -> Array | None:
        f = self.base.features
        if self.base.granularity == "tensor":
            flat = x.reshape(-1)
            size = flat.shape[0]
            if size == 0:
                return None
            if size > TENSOR_VALUES:
                if self._positions is None or self._positions[0] != size:
                    picks = np.random.default_rng(_SEED).choice(size, TENSOR_VALUES, replace=False)
                    self._positions = (size, np.sort(picks))
                flat = flat[self._positions[1]]
            return flat.reshape(-1, 1)
        if x.size == 0 or x.size % f:
            return None
        return x.reshape(-1, f)

    def add(self, x: Array) -> None:
        """Measure one feed of this input."""
        rows = self._rows(np.asarray(x))
        if rows is None:
            self.skipped += 1
            return
        if self._dequant is not None and rows.dtype.kind in "iu":
            scale, zp = self._dequant
            rows = (rows.astype(np.float64) - zp) * scale
        else:
            rows = rows.astype(np.float64, copy=False)
        if rows.dtype.kind == "f" and not np.isfinite(rows).all():
            rows = rows[np.isfinite(rows).all(axis=1)]
            if not rows.shape[0]:
                self.skipped += 1
                return
        d = rows - self.base.mean
        self.sums += d.sum(axis=0)
        self.squares += (d * d).sum(axis=0)
        # bin index = how many inner edges the value reaches: below the first edge -> bin 0, at or past
        # the last -> the last bin, a value on an inner edge -> the bin it opens (numpy's half-open bins)
        if rows.shape[1] == 1:  # one feature (a whole tensor): a binary search per value
            idx = np.searchsorted(self._inner[0], rows[:, 0], side="right").reshape(-1, 1)
        else:
            idx = (rows[:, :, None] >= self._inner[None]).sum(axis=2)
        flat = self.counts.reshape(-1)
        if rows.shape[0] == 1:
            flat[idx[0] + self._offsets] += 1  # one row: each feature's bin once, no repeated index
        else:
            flat += np.bincount((idx + self._offsets).reshape(-1), minlength=flat.shape[0])
        n = rows.shape[0]
        self.values += n
        self.samples += 1 if self.base.granularity == "tensor" else n

    def features(self) -> dict[str, Array] | None:
        """Per feature ``mean_shift``, ``std_ratio``, ``psi`` (arrays of shape (F,)), or None before any
        sample."""
        n = self.values
        if not n:
            return None
        b = self.base
        d_mean = self.sums / n
        live_mean = b.mean + d_mean
        live_var = np.maximum(self.squares / n - d_mean * d_mean, 0.0)
        live_std = np.sqrt(live_var)
        base_std = np.maximum(b.std, self._floor)
        return {
            "mean": live_mean,
            "std": live_std,
            "mean_shift": np.abs(d_mean) / base_std,
            "std_ratio": np.maximum(live_std, self._floor) / base_std,
            "psi": psi_rows(b.counts, self.counts.astype(np.float64)),
        }


class DriftMeter:
    """Drift of all a model's inputs that have a baseline. ``add(feeds)`` on sampled calls,
    ``summary()`` for telemetry, ``reset()`` per interval. Not thread-safe (the caller locks).

    ``quantization`` maps an input name to its (scale, zero point), for inputs fed as integers."""

    def __init__(
        self,
        baseline: Mapping[str, InputBaseline],
        quantization: Mapping[str, tuple[float, int]] | None = None,
    ) -> None:
        q = quantization or {}
        self.inputs = {
            name: InputDrift(b, *q.get(name, (None, 0))) for name, b in baseline.items()
        }
        self.granularity = "tensor" if any(b.granularity == "tensor" for b in baseline.values()) else "feature"

    def add(self, feeds: Mapping[str, Array]) -> None:
        for name, acc in self.inputs.items():
            x = feeds.get(name)
            if x is not None:
                acc.add(x)

    def reset(self) -> None:
        for acc in self.inputs.values():
            acc.reset()

    def summary(self) -> dict[str, Any] | None:
        """The telemetry ``drift`` object: ``samples`` (the fewest samples of any measured input), ``features``
        (over all inputs), ``psi_max``, ``psi_mean``, ``mean_shift_max``, ``std_ratio_max`` and
        ``granularity`` (``"tensor"`` when any input is summarised as a whole tensor); None before any
        sample."""
        per = [acc.features() for acc in self.inputs.values()]
        got = [p for p in per if p is not None]
        if not got:
            return None
        psi = np.concatenate([p["psi"] for p in got])
        shift = np.concatenate([p["mean_shift"] for p in got])
        ratio = np.concatenate([p["std_ratio"] for p in got])
        either = np.maximum(ratio, 1.0 / ratio)
        return {
            "samples": min(acc.samples for acc in self.inputs.values() if acc.values),
            "features": int(psi.shape[0]),
            "psi_max": _sig(float(psi.max())),
            "psi_mean": _sig(float(psi.mean())),
            "mean_shift_max": _sig(float(shift.max())),
            "std_ratio_max": _sig(float(either.max())),
            "granularity": self.granularity,
        }
