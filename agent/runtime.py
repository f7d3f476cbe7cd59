"""``load_model`` and ``Model``: one interface over ONNX Runtime and LiteRT.

``Model.predict`` checks every input against the model (name, rank, each fixed dimension, dtype),
quantizes float inputs of int8/uint8 tensors with the tensor's scale and zero point, and
dequantizes quantized outputs, unless the caller passed the integer dtype itself. The checks are a
few dictionary look-ups and attribute compares per input, so the cost over the bare runtime stays in
microseconds (see ``bench/``).

Warm-up (at load) never changes what a model does and never prints: it runs the bundle's first golden
sample when there is one, else zeros at the model's fixed shapes (a dynamic leading batch dim taken as
one); a model with other dynamic dims has no shape known to be valid and is not warmed up (debug
log). A stateful model is not warmed up either (undoing it would cost a second load); a stateless one
is reset after its warm-up, so variable tensors start from zero. ``Model.reset()`` puts a stateful
model back in its initial state: call it after a self-test and between independent streams.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.backends.base import Backend, Feeds, Outputs
from edgefleet.agent.tensors import Quantization, TensorSpec
from edgefleet.errors import ModelError

if TYPE_CHECKING:  # the bundle format (and pydantic) is imported only when a bundle is loaded
    from edgefleet.bundle.manifest import Manifest

__all__ = ["Model", "Watch", "dequantize", "detect_runtime", "load_model", "quantize"]

log = logging.getLogger(__name__)

_COST_RUNS = 5  # timed warm-up runs after the first, to measure a model's cost
_COST_BUDGET_S = 0.05  # stop timing warm-up runs once this many seconds were spent
_COST_WEIGHT = 0.1  # weight of the latest call in Model.cost's moving average
_BACKENDS = {"onnx": "onnx", "onnxruntime": "onnx", "tflite": "tflite", "litert": "tflite"}


@functools.cache
def _int_bounds(dtype: np.dtype[Any]) -> tuple[np.float32, np.float32]:
    info = np.iinfo(dtype)  # slow to build: cached per dtype
    return np.float32(info.min), np.float32(info.max)


def quantize(x: np.ndarray[Any, Any], q: Quantization, dtype: np.dtype[Any]) -> np.ndarray[Any, Any]:
    """Float to integer with the tensor's scale and zero point, rounded and clipped to the dtype.

    In-place ufuncs on one temporary (``np.clip`` costs several microseconds on small arrays).
    """
    lo, hi = _int_bounds(dtype)
    t: np.ndarray[Any, Any] = np.multiply(x, np.float32(1.0 / q.scale), dtype=np.float32)
    t += np.float32(q.zero_point)
    np.rint(t, out=t)
    np.maximum(t, lo, out=t)
    np.minimum(t, hi, out=t)
    return t.astype(dtype)


def dequantize(x: np.ndarray[Any, Any], q: Quantization) -> np.ndarray[Any, Any]:
    """Integer to float32: ``scale * (x - zero_point)``."""
    t = x.astype(np.float32)
    t -= np.float32(q.zero_point)
    t *= np.float32(q.scale)
    return t


class Watch:
    """Runtime calls, runtime errors and the latencies of the last ``window`` calls of one model (what
    the updater's probation compares between two versions). Only the runtime call is counted: a
    request refused before it (a wrong shape, a bad dtype) is the client's error, not the model's.
    Recording is two list operations and an addition; a race between threads loses a sample at worst."""

    __slots__ = ("_i", "_lat", "calls", "errors", "started")

    def __init__(self, window: int = 512) -> None:
        self._lat: list[float] = [0.0] * window
        self._i = 0
        self.calls = 0
        self.errors = 0
        self.started = time.monotonic()

    def record(self, seconds: float) -> None:
        i = self._i
        self._lat[i % len(self._lat)] = seconds
        self._i = i + 1
        self.calls += 1

    def failed(self) -> None:
        self.calls += 1
        self.errors += 1

    def latencies(self) -> list[float]:
        """The recorded latencies (seconds), at most ``window`` of the most recent."""
        return list(self._lat[: min(self._i, len(self._lat))])

    def p95(self) -> float | None:
        lat = sorted(self.latencies())
        if not lat:
            return None
        return lat[min(len(lat) - 1, int(0.95 * len(lat)))]

    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0


class Model:
    """A loaded, warmed-up model. ``predict`` is safe to call from several threads."""

    def __init__(
        self,
        backend: Backend,
        source: str,
        manifest: Manifest | None = None,
        labels: list[str] | None = None,
        warmup: bool = True,
        example_inputs: Mapping[str, np.ndarray[Any, Any]] | None = None,
    ):
        self.backend = backend
        self.source = source
        self.manifest = manifest
        self.labels = labels
        self.inputs: list[TensorSpec] = list(backend.inputs)
        self.outputs: list[TensorSpec] = list(backend.outputs)
        self.metadata: dict[str, str] = dict(backend.metadata)
        """The model file's own key/value metadata (ONNX ``metadata_props``; empty for TFLite)."""
        self.signatures: list[str] = list(backend.signatures)
        """The model's named entry points (TFLite signatures; empty for ONNX)."""
        self.stateful: bool = backend.stateful
        """The model keeps state between calls (TFLite resource variables): see :meth:`reset`."""
        self.example_inputs: dict[str, np.ndarray[Any, Any]] | None = (
            dict(example_inputs) if example_inputs is not None else None
        )
        """One request known to be valid (a bundle's first golden sample), or None."""
        self._in = {s.name: s for s in self.inputs}
        self._out = {s.name: s for s in self.outputs}
        self._alias: dict[str, str] = dict(backend.aliases)
        self._quantized_in = any(s.quantization is not None for s in self.inputs)
        self._quantized_out = [s for s in self.outputs if s.quantization is not None]
        self._lock = None if backend.thread_safe else threading.Lock()
        cost, cpu = self._warm_up() if warmup else (None, None)
        backend.adapt(cpu)  # e.g. ONNX Runtime picks its threads from the CPU cost (see its backend)
        self.cost: float | None = cost
        self.watch: Watch | None = None
        self.telemetry: Any = None
        """When set (``edgefleet.agent.telemetry.measure.ModelStats``), every runtime call is observed for
        telemetry: latency, errors, input drift, output classes. None costs nothing."""
        """When set, every runtime call is counted there (the updater's probation); None costs nothing."""
        """Seconds one runtime call takes: measured at warm-up, then a moving average over every
        ``predict`` (the runtime call alone: no checks, no waiting for a lock or a thread). None
        until measured. What a server needs to decide whether a call may run on its event loop."""

    @property
    def name(self) -> str:
        """The bundle's model name, or the file's stem."""
        return self.manifest.name if self.manifest else Path(self.source).stem

    def __repr__(self) -> str:
        ins = "; ".join(s.describe() for s in self.inputs)
        return f"<Model {self.name} on {self.backend.name}: {ins}>"

    def _warm_up(self) -> tuple[float | None, float | None]:
        """Run the warm-up; returns the wall and the CPU seconds (all the process's threads) of one
        run after the first, each the best of a few runs (at most ~50 ms spent measuring), or
        ``(None, None)`` when there was no warm-up. CPU time is what the thread rule needs: unlike
        wall time it does not grow when other work on the machine takes the cores."""
        if self.stateful:
            log.debug("%s: stateful model, not warmed up (undoing it would take a second load)", self.source)
            return None, None
        feeds = self.example_inputs if self.example_inputs is not None else _known_good_inputs(self.inputs)
        if feeds is None:
            log.debug("%s: no input shape known to be valid (dynamic dims, no golden sample): no warm-up", self.source)
            return None, None
        wall: float | None = None
        cpu: float | None = None
        try:
            prepared, _ = self.prepare(feeds)
            self._run(prepared)  # the first run pays one-time costs (allocation, weight packing)
            spent = 0.0
            for _ in range(_COST_RUNS):
                t0, c0 = time.perf_counter(), time.process_time()
                self._run(prepared)
                took, used = time.perf_counter() - t0, time.process_time() - c0
                wall = took if wall is None else min(wall, took)
                cpu = used if cpu is None else min(cpu, used)
                spent += took
                if spent > _COST_BUDGET_S:
                    break
        except ModelError as e:  # a model may reject zeros and still work on real data
            log.debug("%s: warm-up run failed (%s); the first request will be slower", self.source, e)
        self.reset()
        return wall, cpu

    def reset(self) -> None:
        """Put the model back in its initial state: a stateful model's variables start again from
        the values the model gives them (a TFLite model with resource variables is reloaded for
        that, which costs about one load); a stateless model is unchanged. Safe to call from any
        thread; waits for a running ``predict``. Raises :class:`ModelError` if a reload fails."""
        if self._lock is None:
            self.backend.reset()
            return
        with self._lock:
            self.backend.reset()

    def _run(self, feeds: Feeds) -> Outputs:
        if self._lock is None:
            return self.backend.run(feeds)
        with self._lock:
            return self.backend.run(feeds)

    def prepare(self, inputs: Mapping[str, Any]) -> tuple[Feeds, bool]:
        """Check and convert inputs; returns the feeds and whether integer data was given for a
        quantized input (then outputs stay integer by default). Raises :class:`ModelError`."""
        if type(inputs) is not dict and not isinstance(inputs, Mapping):
            raise ModelError(f"inputs must be a mapping of tensor name to array, got {type(inputs).__name__}")
        feeds: Feeds = {}
        raw = False
        for key, value in inputs.items():
            name = self._alias.get(key, key)
            spec = self._in.get(name)
            if spec is None:
                raise ModelError(f"unknown input {key!r}; the model's inputs are {list(self._in)}")
            if name in feeds:
                raise ModelError(f"input {name!r} given twice (by name and by alias {key!r})")
            arr = value if type(value) is np.ndarray else _as_array(name, value)
            if arr.dtype != spec.dtype:
                arr = _convert_dtype(spec, arr)
            elif spec.quantization is not None:
                raw = True
            shape = arr.shape
            want = spec.shape
            if len(shape) != len(want) or any(w is not None and w != g for w, g in zip(want, shape, strict=True)):
                raise ModelError(
                    f"input {name!r}: expected shape {_fmt_shape(want)}, got {list(shape)}"
                    + (f" (rank {len(want)}, got rank {len(shape)})" if len(shape) != len(want) else "")
                )
            if not arr.flags.c_contiguous:
                arr = np.ascontiguousarray(arr)
            feeds[name] = arr
        if len(feeds) != len(self._in):
            missing = [n for n in self._in if n not in feeds]
            raise ModelError(f"missing input(s) {missing}; the model needs {list(self._in)}")
        return feeds, raw

    def predict(
        self,
        inputs: Mapping[str, Any],
        outputs: Sequence[str] | None = None,
        dequantize_outputs: bool | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        """Run the model: ``{input name: array}`` to ``{output name: array}``.

        Quantized outputs come back as float32 unless ``dequantize_outputs`` is false, or it is
        ``None`` and the caller gave integer data for a quantized input. ``outputs`` selects outputs
        by name. Raises :class:`ModelError` naming the tensor, what was expected and what was given.
        """
        feeds, raw = self.prepare(inputs)
        watch = self.watch
        try:
            if self._lock is None:
                t0 = time.perf_counter()
                result = self.backend.run(feeds)
                took = time.perf_counter() - t0
            else:
                with self._lock:
                    t0 = time.perf_counter()
                    result = self.backend.run(feeds)
                    took = time.perf_counter() - t0
        except Exception:
            if watch is not None:
                watch.failed()
            stats = self.telemetry
            if stats is not None:
                stats.observe(feeds, None, 0.0, False)
            raise
        if watch is not None:
            watch.record(took)
        stats = self.telemetry
        if stats is not None:
            stats.observe(feeds, result, took, True)
        cost = self.cost  # a race between threads loses one sample at worst
        self.cost = took if cost is None else cost + _COST_WEIGHT * (took - cost)
        if outputs is not None:
            unknown = [n for n in outputs if n not in self._out]
            if unknown:
                raise ModelError(f"unknown output(s) {unknown}; the model's outputs are {list(self._out)}")
            result = {n: result[n] for n in outputs}
        if self._quantized_out and (not raw if dequantize_outputs is None else dequantize_outputs):
            for s in self._quantized_out:
                if s.name in result:
                    result[s.name] = dequantize(result[s.name], s.quantization)  # type: ignore[arg-type]
        return result

    def bare_callable(self) -> Callable[[Feeds], object]:
        """The runtime's own call, without edgefleet's checks (for side-by-side benchmarks)."""
        return self.backend.bare_callable()

    def info(self) -> dict[str, Any]:
        """JSON-ready description: name, source, runtime, tensors, metadata, signatures, stateful."""
        return {
            "name": self.name,
            "source": self.source,
            **self.backend.info(),
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "metadata": dict(self.metadata),
            "signatures": list(self.signatures),
            "stateful": self.stateful,
        }


def _known_good_inputs(specs: Sequence[TensorSpec]) -> Feeds | None:
    """Zeros at each input's fixed shape, a dynamic leading batch dim taken as one; None when some
    other dim is dynamic (1 is rarely a valid height or length) or an input is text."""
    feeds: Feeds = {}
    for s in specs:
        if s.dtype.kind in "OUSV":
            return None
        dims: list[int] = []
        for axis, d in enumerate(s.shape):
            if d is None:
                if axis != 0 or len(s.shape) < 2:
                    return None
                d = 1
            dims.append(d)
        feeds[s.name] = np.zeros(dims, dtype=s.dtype)
    return feeds


def _fmt_shape(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _as_array(name: str, value: Any) -> np.ndarray[Any, Any]:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise ModelError(f"input {name!r}: cannot be read as an array: {e}") from e


def _convert_dtype(spec: TensorSpec, arr: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    given = arr.dtype
    q = spec.quantization
    if q is not None and given.kind == "f":
        if not np.isfinite(arr).all():
            raise ModelError(
                f"input {spec.name!r}: non-finite values (NaN or inf) cannot be quantized to {spec.dtype_name}"
            )
        return quantize(arr, q, spec.dtype)
    if q is not None and given.kind in "biu":
        pass  # another integer type for a quantized tensor means another scale: refuse below
    elif spec.dtype.kind == "O" and given.kind in "US":
        return arr.astype(object)
    elif given.kind in "biuf" and spec.dtype.kind in "biuf" and np.can_cast(given, spec.dtype, "same_kind"):
        return arr.astype(spec.dtype)
    accepted = f"{spec.dtype_name} (or float, quantized with scale {q.scale:.6g})" if q else spec.dtype_name
    raise ModelError(f"input {spec.name!r}: expected dtype {accepted}, got {given}")


def _detect(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".efb", ".onnx", ".tflite"):
        return suffix[1:]
    with open(path, "rb") as f:
        head = f.read(512)
    if head[4:8] == b"TFL3":
        return "tflite"
    if head[257:262] == b"ustar":
        return "efb"
    return "onnx"


def detect_runtime(path: str | os.PathLike[str]) -> str:
    """``"onnx"`` or ``"tflite"``: what runtime a model file or bundle needs (a bundle's manifest says)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such model file")
    kind = _detect(p)
    if kind == "efb":
        from edgefleet.bundle.archive import read_manifest

        return read_manifest(p).runtime
    return kind


def _make_backend(
    kind: str, model: bytes | str, where: str, threads: int | None, delegates: Sequence[Any], options: dict[str, Any]
) -> Backend:
    # Each runtime is imported only when a model needs it.
    if kind == "onnx":
        from edgefleet.agent.backends import onnx

        valid, factory = onnx.OPTIONS, onnx.OnnxBackend
    else:
        from edgefleet.agent.backends import litert

        valid, factory = litert.OPTIONS, litert.LiteRTBackend  # type: ignore[assignment]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ModelError(f"{where}: unknown option(s) {unknown} for the {kind} backend; valid: {list(valid)}")
    backend: Backend = factory(model, where, threads=threads, delegates=delegates, **options)
    return backend


def load_model(
    path: str | os.PathLike[str],
    threads: int | None = None,
    backend: str | None = None,
    delegates: Sequence[Any] = (),
    warmup: bool = True,
    max_threads: int | None = None,
    **options: Any,
) -> Model:
    """Load an ``.onnx``, ``.tflite`` or ``.efb`` bundle and warm it up.

    ``threads`` sets the runtime's intra-op threads exactly (explicit config). Without it, ONNX
    Runtime chooses from the model's cost measured at warm-up, up to ``max_threads`` (the hardware
    profile's threads; default the cores available; see :mod:`edgefleet.agent.backends.onnx`),
    and LiteRT uses ``max_threads`` (default: the runtime's own choice).
    ``backend`` forces ``onnx`` or ``tflite`` (default: by file suffix, then by content).
    ``delegates`` are LiteRT delegate libraries (``"libedgetpu.so.1"`` or ``(lib, options)``), or, for
    ONNX, execution providers tried before the CPU. Other ``options`` go to the backend
    (ONNX: ``providers``, ``graph_optimization_level``, ``inter_op_threads``, ``allow_spinning``;
    TFLite: ``signature`` picks one of a model's signatures, default ``serving_default`` or the only
    one, ``preserve_all_tensors``, and ``pool_size``, the interpreters that may run concurrent
    calls, default the cores available up to 4, always 1 for a stateful model). ``warmup`` runs
    one request at load, and a few more to measure the model's cost (see the module docstring).

    Raises :class:`ModelError` for a missing, corrupt or unknown model, an unknown option or
    signature (naming the path) and :class:`~edgefleet.errors.BundleError` for a bad bundle.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: no such model file")
    for key, value in (("threads", threads), ("max_threads", max_threads)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelError(f"{key}: expected a positive integer, got {value!r}")
    kind = _detect(p)
    manifest: Manifest | None = None
    labels: list[str] | None = None
    golden: bytes | None = None
    model: bytes | str = str(p)
    if kind == "efb":
        from edgefleet.bundle.archive import BundleReader
        from edgefleet.bundle.manifest import parse_labels

        with BundleReader(p) as bundle:
            manifest = bundle.manifest
            model = bundle.read_model()
            if manifest.labels is not None:
                labels = parse_labels(bundle.read(manifest.labels.path), f"{p}: {manifest.labels.path}")
            if manifest.golden is not None and manifest.golden.size <= _GOLDEN_WARMUP_MAX_BYTES:
                golden = bundle.read(manifest.golden.path)
        kind = manifest.runtime
    if backend is not None:
        if backend not in _BACKENDS:
            raise ModelError(f"backend: expected one of {sorted(_BACKENDS)}, got {backend!r}")
        if manifest is not None and _BACKENDS[backend] != manifest.runtime:
            raise ModelError(f"{p}: the bundle holds a {manifest.runtime} model; backend {backend!r} cannot run it")
        kind = _BACKENDS[backend]
    if kind == "onnx":
        if max_threads is not None:
            options = {**options, "max_threads": max_threads}
    elif threads is None:
        threads = max_threads
    be = _make_backend(kind, model, str(p), threads, delegates, options)
    example: dict[str, np.ndarray[Any, Any]] | None = None
    if manifest is not None:
        _check_manifest_matches(manifest, be, str(p))
        if golden is not None and manifest.golden is not None:
            example = _first_golden_sample(golden, f"{p}: {manifest.golden.path}")
    return Model(be, str(p), manifest, labels=labels, warmup=warmup, example_inputs=example)


_GOLDEN_WARMUP_MAX_BYTES = 32 << 20  # golden.npz read at load for warm-up only up to this size (bytes)


def _first_golden_sample(data: bytes, where: str) -> dict[str, np.ndarray[Any, Any]] | None:
    """Sample 0 of a bundle's golden inputs (``input.NAME`` arrays of shape ``(N, *input shape)``),
    reading only that sample of each array; None if the file is not a plain uncompressed-or-deflated
    ``.npz`` of such arrays (the self-test reports that; loading does not fail for it)."""
    import io
    import zipfile

    fmt = np.lib.format
    sample: dict[str, np.ndarray[Any, Any]] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            for member in zf.namelist():
                if not (member.startswith("input.") and member.endswith(".npy")):
                    continue
                with zf.open(member) as f:
                    major, _ = fmt.read_magic(f)
                    read_header = fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    if fortran or not shape or shape[0] < 1 or dtype.hasobject:
                        return None
                    count = int(np.prod(shape[1:], dtype=np.int64))
                    raw = f.read(count * dtype.itemsize)
                    if len(raw) != count * dtype.itemsize:
                        return None
                    sample[member[6:-4]] = np.frombuffer(raw, dtype=dtype).reshape(shape[1:]).copy()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        log.debug("%s: golden inputs not usable for warm-up: %s", where, e)
        return None
    return sample or None


def _check_manifest_matches(manifest: Manifest, backend: Backend, where: str) -> None:
    from edgefleet.errors import BundleError

    for kind, declared, actual in (
        ("inputs", manifest.inputs, backend.inputs),
        ("outputs", manifest.outputs, backend.outputs),
    ):
        got = {s.name: s.dtype_name for s in actual}
        want = {t.name: t.dtype for t in declared}
        if got != want:
            raise BundleError(f"{where}: manifest {kind} {want} do not match the model's {got}")
