"""What the agent measures per model version for telemetry: counts, latency, drift, classes, accuracy.

:class:`ModelStats` is fed by every inference (``observe``) and read once per telemetry interval
(``snapshot``), which gives the ``models[]`` entry of the telemetry message (SPEC.md, issue 11):

- ``inferences``: runtime calls, failed ones included; ``errors``: the failed ones;
- ``latency``: a :class:`LatencyHistogram` of the successful calls, on the fixed ``BOUNDS``;
- ``drift``: a :class:`~edgefleet.agent.telemetry.drift.DriftMeter` against the bundle's baseline, fed a
  sample of the calls (at most one per ``drift_interval_s``, 20 a second by default), None without a
  baseline or before a sample;
- ``classes``: how often each class index was the top-1 output (a :class:`ClassCounts`), ``{}`` for a
  model that is not a classifier;
- ``accuracy``: :class:`LiveAccuracy` over the last ``window`` predictions that got ground truth
  (feedback), None before any.

Counts, latency, classes and drift are per interval (``snapshot(reset=True)`` starts a new one);
accuracy is a sliding window and is not reset. Memory is fixed whatever the run length: a histogram is
16 integers, classes one integer per class (at most ``MAX_CLASSES``), drift a few arrays per feature,
accuracy two integer rings.

``observe`` costs a lock, a bisect, an argmax for classifiers (1-5 µs) and, on a sampled call, the
drift update (10-25 µs for 64 features, about 50 µs for an image); tests/telemetry/test_measure.py prints it.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.metrics import BUCKETS
from edgefleet.agent.shadow import ServedSpec
from edgefleet.agent.telemetry.drift import DriftMeter, InputBaseline, load_baseline, parse_baseline
from edgefleet.errors import EdgefleetError

if TYPE_CHECKING:
    from edgefleet.agent.runtime import Model
    from edgefleet.agent.shadow import ShadowRunner

__all__ = [
    "BOUNDS",
    "MAX_CLASSES",
    "ClassCounts",
    "LatencyHistogram",
    "LiveAccuracy",
    "ModelStats",
    "TelemetryFormatError",
    "TelemetryRegistry",
    "classifier_output",
]

BOUNDS: tuple[float, ...] = BUCKETS
"""Upper bounds (seconds) of the latency buckets: 0.0001 ... 5.0; ``counts[i]`` holds the calls with
``BOUNDS[i-1] < latency <= BOUNDS[i]`` (``0 <= latency`` for the first) and the last count those over
``BOUNDS[-1]``. Fixed, so a server merges the histograms of many devices exactly."""
MAX_CLASSES = 1024  # class indices counted per model; higher ones are not counted
QUANTILES = (("p50_s", 0.50), ("p95_s", 0.95), ("p99_s", 0.99))

Array = np.ndarray[Any, Any]


class TelemetryFormatError(EdgefleetError, ValueError):
    """A telemetry dict (a device's message) is malformed; the message names the field."""


def _sig(v: float) -> float:
    return float(f"{v:.6g}")


class LatencyHistogram:
    """Call latencies on the fixed :data:`BOUNDS`: counts per bucket and the sum of seconds."""

    __slots__ = ("counts", "sum_s")

    def __init__(self) -> None:
        self.counts: list[int] = [0] * (len(BOUNDS) + 1)
        self.sum_s = 0.0

    def add(self, seconds: float) -> None:
        """Count one call of ``seconds`` (bisect_left: a latency equal to a bound is in that bound's bucket)."""
        self.counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.sum_s += seconds

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        """Add ``other``'s counts and sum into this one (exact: the histogram of the union); returns self."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum_s += other.sum_s
        return self

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1) estimated from the buckets; None when empty.

        With ``n`` calls the rank is ``q * n``; the answer lies in the first bucket whose cumulative
        count reaches it (the bucket holding the ``ceil(q * n)``-th smallest latency), linearly
        interpolated between the bucket's lower bound (the previous bound, 0 for the first bucket) and
        its upper bound by ``(rank - calls in earlier buckets) / calls in this bucket``. The overflow
        bucket has no upper bound: it answers ``BOUNDS[-1]`` (as Prometheus' ``histogram_quantile``).
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within 0..1, got {q}")
        n = self.count
        if not n:
            return None
        rank = q * n
        before = 0
        for i, c in enumerate(self.counts):
            if c and before + c >= rank:
                if i == len(BOUNDS):
                    return BOUNDS[-1]
                lo = BOUNDS[i - 1] if i else 0.0
                return lo + (BOUNDS[i] - lo) * max(rank - before, 0.0) / c
            before += c
        return BOUNDS[-1]  # not reached: the last non-empty bucket's cumulative count is n >= rank

    def to_dict(self) -> dict[str, Any]:
        """The telemetry ``latency`` object: ``counts``, ``sum_s`` and ``p50_s``/``p95_s``/``p99_s``
        (None when empty)."""
        out: dict[str, Any] = {"counts": list(self.counts), "sum_s": _sig(self.sum_s)}
        for key, q in QUANTILES:
            v = self.quantile(q)
            out[key] = None if v is None else _sig(v)
        return out

    @classmethod
    def from_dict(cls, d: Any, where: str = "latency") -> LatencyHistogram:
        """A histogram from a telemetry ``latency`` object (the quantiles are ignored: they follow from
        the counts). Raises :class:`TelemetryFormatError` naming the field."""
        if not isinstance(d, Mapping):
            raise TelemetryFormatError(f"{where}: expected an object, got {type(d).__name__}")
        counts = d.get("counts")
        n = len(BOUNDS) + 1
        if not isinstance(counts, list) or len(counts) != n:
            raise TelemetryFormatError(f"{where}.counts: expected a list of {n} counts (len(BOUNDS) + 1)")
        if any(type(c) is not int or c < 0 for c in counts):
            raise TelemetryFormatError(f"{where}.counts: expected non-negative integers")
        s = d.get("sum_s")
        if not isinstance(s, int | float) or isinstance(s, bool) or not math.isfinite(s) or s < 0:
            raise TelemetryFormatError(f"{where}.sum_s: expected a non-negative number of seconds, got {s!r}")
        h = cls()
        h.counts = list(counts)
        h.sum_s = float(s)
        return h


def classifier_output(model: Model) -> str | None:
    """The output whose top-1 index is a class, or None when the model does not look like a classifier.

    In order: the pipeline's output when the bundle's post-processing has an ``argmax`` or ``topk``
    step over the whole output (no ``axis``: one class per sample, as :mod:`edgefleet.agent.pipeline`
    reads it); else the output whose last dimension is the number of labels; else the only output when
    it is a ``[1, K]`` / ``[K]`` vector of ``K >= 2`` float (or quantized) scores. Per-position classes (a step with an
    ``axis``: sequences, segmentation) are not counted.
    """
    outs = {s.name: s for s in model.outputs}
    manifest = model.manifest
    if manifest is not None:
        spec = manifest.pipeline
        steps = [s for s in spec.postprocess if s.op in ("argmax", "topk")]
        if steps:
            if any(getattr(s, "axis", None) is not None for s in steps):
                return None
            name = spec.output or model.outputs[0].name
            return name if _vector(outs[name].shape) else None
    labels = model.labels
    if labels:
        for s in model.outputs:
            if s.shape and s.shape[-1] == len(labels) and _vector(s.shape):
                return s.name
    if len(model.outputs) == 1:
        s = model.outputs[0]
        last = s.shape[-1] if s.shape else None
        scores = s.dtype.kind == "f" or s.quantization is not None  # quantized scores keep their order
        if scores and _vector(s.shape) and last is not None and last >= 2:
            return s.name
    return None


def _vector(shape: Sequence[int | None]) -> bool:
    """One vector per sample: ``[K]``, or ``[B, K]`` (a batch axis first)."""
    return len(shape) == 1 or len(shape) == 2


class ClassCounts:
    """How often each class index was the top-1 of ``output`` (argmax over the last axis: one class per
    row of a ``[B, K]`` output). Indices at or past ``MAX_CLASSES`` are not counted."""

    __slots__ = ("counts", "output")

    def __init__(self, output: str) -> None:
        self.output = output
        self.counts: dict[int, int] = {}

    def add(self, outputs: Mapping[str, Array]) -> None:
        out = outputs.get(self.output)
        if out is None or out.size == 0 or out.ndim > 2:
            return
        one = out.ndim == 1 or out.shape[0] == 1
        best = [int(out.argmax())] if one else out.argmax(axis=-1).tolist()
        c = self.counts
        for i in best:
            if i < MAX_CLASSES:
                c[i] = c.get(i, 0) + 1

    def to_dict(self) -> dict[str, int]:
        """``{"3": 40, "7": 2}``: class index (as a string, JSON's keys) to count."""
        return {str(k): v for k, v in sorted(self.counts.items())}


class LiveAccuracy:
    """Accuracy, per-class precision and recall over the last ``window`` predictions given ground truth.

    Two integer rings of ``window`` entries (predicted, true class index): memory is fixed. Thread-safe.
    Precision of a class is over the window's predictions of it, recall over its true occurrences; a
    class with none of either is left out of that map (rather than reported as 0).
    """

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self._pred = np.zeros(window, dtype=np.int64)
        self._true = np.zeros(window, dtype=np.int64)
        self._n = 0  # pairs recorded, ever
        self._lock = threading.Lock()

    def record(self, predicted: int, true: int) -> None:
        with self._lock:
            i = self._n % self.window
            self._pred[i] = predicted
            self._true[i] = true
            self._n += 1

    @property
    def recorded(self) -> int:
        """Pairs recorded since creation (grows past ``window``)."""
        return self._n

    def pairs(self) -> tuple[Array, Array]:
        """Copies of the window's (predicted, true) arrays, oldest first."""
        with self._lock:
            n, w = self._n, self.window
            if n <= w:
                return self._pred[:n].copy(), self._true[:n].copy()
            i = n % w
            return np.roll(self._pred, -i), np.roll(self._true, -i)

    def summary(self) -> dict[str, Any] | None:
        """The telemetry ``accuracy`` object ``{"window": n, "accuracy", "precision", "recall"}``
        (``n``: the pairs in the window), or None before any feedback."""
        pred, true = self.pairs()
        n = int(pred.shape[0])
        if not n:
            return None
        hit = pred == true
        precision: dict[str, float] = {}
        recall: dict[str, float] = {}
        for c in np.union1d(pred, true).tolist():
            tp = int(np.count_nonzero(hit & (pred == c)))
            npred = int(np.count_nonzero(pred == c))
            ntrue = int(np.count_nonzero(true == c))
            if npred:
                precision[str(c)] = _sig(tp / npred)
            if ntrue:
                recall[str(c)] = _sig(tp / ntrue)
        return {
            "window": n,
            "accuracy": _sig(float(np.count_nonzero(hit)) / n),
            "precision": precision,
            "recall": recall,
        }


class ModelStats:
    """The telemetry of one model version (see the module docstring). ``observe`` is thread-safe.

    ``baseline`` is the bundle's ``baseline.json`` (parsed: ``{"inputs": ...}`` or already
    :class:`InputBaseline` objects), or None for no drift. ``labels`` map label strings of feedback to
    class indices. ``classes_output`` names the classifier output (None: classes are not counted).
    ``quantization`` maps an input name to its (scale, zero point) so that integer feeds are measured
    as the real values they stand for. ``drift_interval_s``: the least time between two calls sampled
    for drift (0: every call). Raises :class:`~edgefleet.errors.BundleError` for a malformed baseline.
    """

    def __init__(
        self,
        name: str,
        version: str,
        baseline: Mapping[str, Any] | None = None,
        labels: Sequence[str] | None = None,
        *,
        classes_output: str | None = None,
        quantization: Mapping[str, tuple[float, int]] | None = None,
        drift_interval_s: float = 0.05,
        accuracy_window: int = 1000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.version = version
        self.labels = list(labels) if labels is not None else None
        self._label_index = {s: i for i, s in enumerate(self.labels or ())}
        self.classes_output = classes_output
        self.drift_interval_s = drift_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        parsed: dict[str, InputBaseline] | None = None
        if baseline is not None:
            if all(isinstance(v, InputBaseline) for v in baseline.values()) and "inputs" not in baseline:
                parsed = dict(baseline)
            else:
                parsed = parse_baseline(baseline)
        self.drift = DriftMeter(parsed, quantization) if parsed else None
        self.accuracy = LiveAccuracy(accuracy_window)
        self._reported_feedback = 0
        self._next_drift = -math.inf
        self.shadow: ShadowRunner | None = None
        """A candidate run beside this version (:mod:`edgefleet.agent.shadow`): offered every successful
        call's feeds and outputs, reported as the entry's ``shadow`` block. Set by :class:`TelemetryRegistry`."""
        self.served_spec: ServedSpec | None = None  # what the shadow runner needs of the served model
        self._fresh()

    def _fresh(self) -> None:
        self.inferences = 0
        self.errors = 0
        self.latency = LatencyHistogram()
        self.classes = ClassCounts(self.classes_output) if self.classes_output is not None else None
        if self.drift is not None:
            self.drift.reset()

    @classmethod
    def from_model(
        cls, name: str, version: str, model: Model, baseline: Mapping[str, Any] | bool | None = True, **kw: Any
    ) -> ModelStats:
        """Stats for a loaded model: its labels, classifier output (:func:`classifier_output`), input
        quantization, and its bundle's baseline (``baseline=True``: read from the bundle file; a
        mapping: that one; None/False: no drift). Raises :class:`~edgefleet.errors.BundleError` for a
        malformed or tampered baseline."""
        if baseline is True:
            base: Mapping[str, Any] | None = (
                load_baseline(model.source) if model.manifest is not None and model.manifest.baseline else None
            )
        elif baseline is False:
            base = None
        else:
            base = baseline
        quant = {s.name: (s.quantization.scale, s.quantization.zero_point) for s in model.inputs if s.quantization}
        kw.setdefault("classes_output", classifier_output(model))
        stats = cls(name, version, base, model.labels, quantization=quant, **kw)
        stats.served_spec = ServedSpec.of(model)
        return stats

    def class_index(self, label: Any) -> int | None:
        """A feedback label as a class index: an int as is, a string through the labels; None if neither."""
        if type(label) is int:
            return label
        if isinstance(label, str):
            return self._label_index.get(label)
        return None

    def observe(
        self, feeds: Mapping[str, Array], outputs: Mapping[str, Array] | None, seconds: float, ok: bool
    ) -> None:
        """Count one inference: its feeds, its outputs (None when it failed), its runtime seconds."""
        with self._lock:
            self.inferences += 1
            if not ok:
                self.errors += 1
                return
            self.latency.add(seconds)
            if outputs is not None and self.classes is not None:
                self.classes.add(outputs)
            if self.drift is not None:
                now = self._clock()
                if now >= self._next_drift:
                    self._next_drift = now + self.drift_interval_s
                    self.drift.add(feeds)
        shadow = self.shadow
        if shadow is not None and outputs is not None:
            shadow.offer(feeds, outputs, self.served_spec)  # never raises, never waits for the candidate

    @property
    def has_news(self) -> bool:
        """Anything to report since the last snapshot (an inference, or feedback)."""
        return bool(self.inferences) or self.accuracy.recorded != self._reported_feedback

    def snapshot(self, reset: bool = True) -> dict[str, Any]:
        """The telemetry ``models[]`` entry; ``reset`` starts a new interval (accuracy is a window and
        stays)."""
        with self._lock:
            entry: dict[str, Any] = {
                "name": self.name,
                "version": self.version,
                "inferences": self.inferences,
                "errors": self.errors,
                "latency": self.latency.to_dict(),
                "drift": self.drift.summary() if self.drift is not None else None,
                "classes": self.classes.to_dict() if self.classes is not None else {},
            }
            shadow = self.shadow
            if shadow is not None:
                entry["shadow"] = shadow.take(reset)
            if reset:
                self._fresh()
                self._reported_feedback = self.accuracy.recorded
        entry["accuracy"] = self.accuracy.summary()
        return entry


class TelemetryRegistry:
    """The :class:`ModelStats` of every model version this agent serves, or served recently, by
    (name, version). Thread-safe.

    A version stops being served with :meth:`retire`: it stays (late feedback on its predictions still
    lands in its own accuracy window) and is reported while it has news, then dropped after
    ``keep_retired`` snapshots without any. At most ``max_entries`` are kept; the retired ones that were
    idle longest go first.

    A shadow candidate is attached by model name (:meth:`set_shadow`): the served version of that name
    offers it its calls and reports its ``shadow`` block, whichever version is served (a swap moves it
    to the new one); a retired version loses it."""

    def __init__(self, keep_retired: int = 10, max_entries: int = 64) -> None:
        self.keep_retired = keep_retired
        self.max_entries = max_entries
        self._stats: dict[tuple[str, str], ModelStats] = {}
        self._idle: dict[tuple[str, str], int] = {}  # retired key -> snapshots without news
        self._shadows: dict[str, ShadowRunner] = {}  # model name -> the candidate run beside it
        self._lock = threading.Lock()

    def track(self, stats: ModelStats) -> ModelStats:
        """Serve ``stats``' version: replaces an entry of the same (name, version)."""
        key = (stats.name, stats.version)
        with self._lock:
            self._stats[key] = stats
            self._idle.pop(key, None)
            stats.shadow = self._shadows.get(stats.name)
            self._bound()
        return stats

    def set_shadow(self, name: str, runner: ShadowRunner) -> ShadowRunner | None:
        """Run ``runner``'s candidate beside the served version of ``name`` (now, and after a swap);
        returns the runner it replaces (the caller stops it), or None."""
        with self._lock:
            old = self._shadows.get(name)
            self._shadows[name] = runner
            for (n, _), s in self._stats.items():
                if n == name:
                    s.shadow = runner if (n, s.version) not in self._idle else None
        return old

    def clear_shadow(self, name: str) -> ShadowRunner | None:
        """No candidate beside ``name`` any more; returns the runner that was attached (the caller stops
        it), or None."""
        with self._lock:
            old = self._shadows.pop(name, None)
            for (n, _), s in self._stats.items():
                if n == name:
                    s.shadow = None
        return old

    def shadow_of(self, name: str) -> ShadowRunner | None:
        return self._shadows.get(name)

    def track_model(self, name: str, version: str, model: Model, **kw: Any) -> ModelStats:
        """The stats of a model now served (:meth:`ModelStats.from_model`); a version tracked before
        (served again after a rollback) keeps its entry and accuracy window."""
        with self._lock:
            old = self._stats.get((name, version))
            if old is not None:
                self._idle.pop((name, version), None)
                old.shadow = self._shadows.get(name)
                return old
        return self.track(ModelStats.from_model(name, version, model, **kw))

    def retire(self, name: str, version: str) -> None:
        """``version`` of ``name`` is no longer served."""
        with self._lock:
            s = self._stats.get((name, version))
            if s is not None:
                self._idle.setdefault((name, version), 0)
                s.shadow = None

    def get(self, name: str, version: str) -> ModelStats | None:
        return self._stats.get((name, version))

    def get_or_create(self, name: str, version: str, labels: Sequence[str] | None = None) -> ModelStats:
        """The stats of (name, version), made (retired, without drift or classes) if it has none: for
        feedback on a prediction of a version dropped since."""
        with self._lock:
            s = self._stats.get((name, version))
            if s is None:
                s = self._stats[(name, version)] = ModelStats(name, version, labels=labels)
                self._idle[(name, version)] = 0
                self._bound()
            return s

    def _bound(self) -> None:
        while len(self._stats) > self.max_entries and self._idle:
            oldest = max(self._idle, key=lambda k: self._idle[k])
            del self._stats[oldest], self._idle[oldest]

    def all(self) -> list[ModelStats]:
        return list(self._stats.values())

    def snapshot(self, reset: bool = True) -> list[dict[str, Any]]:
        """The telemetry ``models`` list: every served version, and retired ones with news."""
        with self._lock:
            items = list(self._stats.items())
            idle = dict(self._idle)
        out: list[dict[str, Any]] = []
        for key, s in items:
            if key in idle and not s.has_news:
                if reset:
                    with self._lock:
                        n = self._idle.get(key)
                        if n is not None and n + 1 >= self.keep_retired:
                            self._stats.pop(key, None)
                            self._idle.pop(key, None)
                        elif n is not None:
                            self._idle[key] = n + 1
                continue
            if key in idle and reset:
                with self._lock:
                    if key in self._idle:
                        self._idle[key] = 0
            out.append(s.snapshot(reset))
        return out
