"""ONNX Runtime backend.

Quantized I/O: ONNX has no per-tensor quantization field, so a uint8/int8 graph input's scale and zero
point are those of the ``DequantizeLinear`` that consumes it (and an output's, of the
``QuantizeLinear`` that produces it). onnxruntime does not expose graph nodes, and the ``onnx``
package is not part of the device install (it pulls in its own protobuf classes and ~30 MB of
imports), so :func:`quantized_io` reads the few fields it needs straight from the ModelProto wire
format: node op types, inputs and outputs, and the names and values of small initializers. Large
initializers are skipped by length without being copied, and a model file is memory-mapped, not read.

Threads (intra-op) and spinning. ONNX Runtime's default, a thread per physical core that spins
while it waits for work, takes a core from the event loop and the API's clients on a 2-core
device, and a small model runs fastest on one thread anyway (its ops are too short to split). So,
unless ``threads`` is given (explicit config wins, and then ``allow_spinning`` is ORT's default
unless given too), the session starts at ``max_threads`` (the hardware profile's threads; default
the cores this process may use) with spinning off, and after warm-up :meth:`OnnxBackend.adapt`
applies the rule to the CPU time one run took at that setting (all threads' CPU seconds, which,
unlike wall time, do not grow when other work takes the cores; no spinning, so no CPU is burnt
waiting):

- under :data:`SINGLE_THREAD_BELOW` (1 ms of CPU): one intra-op thread (the session is rebuilt once);
  concurrent calls still run in parallel, each on its caller's thread;
- otherwise ``max_threads`` threads, spinning only if the process has a core more than that (one
  left for the event loop and the clients), else not.

A model that cannot be warmed up (dynamic dims, no golden sample) keeps ``max_threads`` without
spinning. ``InferenceSession.run`` is thread-safe: one session serves concurrent calls.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from edgefleet.agent.backends.base import Feeds, Outputs
from edgefleet.agent.tensors import Quantization, TensorSpec
from edgefleet.errors import ModelError

__all__ = ["OnnxBackend", "available_cores", "choose_threads", "quantized_io"]

log = logging.getLogger(__name__)

_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int32)": np.int32,
    "tensor(uint32)": np.uint32,
    "tensor(int64)": np.int64,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}

_OPT_LEVELS = ("disable", "basic", "extended", "all")
OPTIONS = ("providers", "graph_optimization_level", "inter_op_threads", "allow_spinning", "max_threads")
SINGLE_THREAD_BELOW = 0.001  # CPU seconds per run (at max_threads, no spinning) under which one thread is used
_QUANTIZABLE = ("int8", "uint8", "int16", "uint16")  # what DequantizeLinear/QuantizeLinear take per tensor


def _spec(node: Any, where: str, output: bool = False) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        if output and node.type.startswith(("seq(", "map(")):
            # e.g. scikit-learn's ZipMap probabilities: passed through as a numpy object array
            return TensorSpec(node.name, (None,) if node.type.startswith("seq(") else (), np.dtype(object))
        raise ModelError(f"{where}: tensor {node.name!r} has type {node.type}, which edgefleet does not support")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or []))
    return TensorSpec(node.name, shape, np.dtype(dtype))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(seconds: float, max_threads: int, cores: int) -> tuple[int, bool]:
    """The thread rule (module docstring): ``(intra-op threads, spinning)`` for a model whose run
    took ``seconds`` of CPU at ``max_threads`` threads without spinning, on ``cores`` cores."""
    threads = 1 if seconds < SINGLE_THREAD_BELOW or max_threads <= 1 else max_threads
    return threads, cores > threads and seconds >= SINGLE_THREAD_BELOW


class OnnxBackend:
    """A model on ONNX Runtime. ``InferenceSession.run`` is thread-safe, so no lock is needed."""

    name = "onnxruntime"
    thread_safe = True
    stateful = False  # ONNX graphs carry no state between runs: recurrent state is an input and an output

    def __init__(
        self,
        model: bytes | str,
        where: str,
        threads: int | None = None,
        delegates: Sequence[str] = (),
        providers: Sequence[str] | None = None,
        graph_optimization_level: str = "all",
        inter_op_threads: int | None = None,
        allow_spinning: bool | None = None,
        max_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if graph_optimization_level not in _OPT_LEVELS:
            raise ModelError(
                f"option graph_optimization_level: expected one of {list(_OPT_LEVELS)}, "
                f"got {graph_optimization_level!r}"
            )
        if allow_spinning is not None and not isinstance(allow_spinning, bool):
            raise ModelError(f"option allow_spinning: expected true or false, got {allow_spinning!r}")
        if max_threads is not None and (type(max_threads) is not int or max_threads < 1):
            raise ModelError(f"option max_threads: expected a positive integer, got {max_threads!r}")
        self._ort = ort
        self._where = where
        self._opt_level = graph_optimization_level
        self._inter_op_threads = inter_op_threads
        self._cores = available_cores()
        self._explicit = threads is not None
        self._max_threads = max(1, min(max_threads or self._cores, self._cores))
        self._spinning: bool | None = allow_spinning
        self._explicit_spinning = allow_spinning
        self._threads = int(threads) if threads is not None else self._max_threads
        if not self._explicit and allow_spinning is None:
            self._spinning = False  # until adapt() has measured the model
        available = ort.get_available_providers()
        # Delegates, for ONNX, are execution providers tried before the CPU.
        wanted = list(providers) if providers is not None else [*delegates, "CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelError(
                f"{where}: execution provider(s) {missing} not available; this onnxruntime has {available}"
            )
        self._providers = wanted
        self._model: bytes | str | None = model  # kept until adapt() may rebuild the session
        self._session = self._new_session(model)
        # A failed run is reported to the caller as a ModelError; the runtime's own log line would
        # only repeat it on stderr.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        inputs = [_spec(n, where) for n in self._session.get_inputs()]
        outputs = [_spec(n, where, output=True) for n in self._session.get_outputs()]
        if any(s.dtype_name in _QUANTIZABLE for s in (*inputs, *outputs)):
            q_in, q_out = quantized_io(model, where)
            inputs = [TensorSpec(s.name, s.shape, s.dtype, q_in.get(s.name)) for s in inputs]
            outputs = [TensorSpec(s.name, s.shape, s.dtype, q_out.get(s.name)) for s in outputs]
        self.inputs = inputs
        self.outputs = outputs
        self.aliases: dict[str, str] = {}
        self.signatures: list[str] = []
        meta = self._session.get_modelmeta()
        self.metadata: dict[str, str] = dict(meta.custom_metadata_map)
        self._wrap = [o.name for o in self.outputs if o.dtype.kind == "O"]
        self._text_inputs = [i.name for i in self.inputs if i.dtype.kind == "O"]
        self._output_names = [o.name for o in self.outputs]
        self._version = ort.__version__
        self.measured_cost: float | None = None  # CPU seconds per run seen by adapt(), if any

    def _new_session(self, model: bytes | str) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self._opt_level]
        opts.intra_op_num_threads = self._threads
        if self._inter_op_threads is not None:
            opts.inter_op_num_threads = int(self._inter_op_threads)
        if self._spinning is not None:
            flag = "1" if self._spinning else "0"
            opts.add_session_config_entry("session.intra_op.allow_spinning", flag)
            opts.add_session_config_entry("session.inter_op.allow_spinning", flag)
        opts.log_severity_level = 3
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=self._providers)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{self._where}: not a loadable ONNX model: {_first_line(e)}") from e

    def adapt(self, seconds: float | None) -> None:
        """Apply :func:`choose_threads` to the CPU seconds of one run; ``None``: not measured
        (keep the current setting). Rebuilds the session at most once, and never when ``threads``
        was given. Raises :class:`ModelError` if the rebuild fails."""
        model, self._model = self._model, None
        self.measured_cost = seconds
        if seconds is None or model is None or self._explicit:
            return
        threads, spinning = choose_threads(seconds, self._max_threads, self._cores)
        if self._explicit_spinning is not None:
            spinning = self._explicit_spinning
        if (threads, spinning) != (self._threads, self._spinning):
            self._threads, self._spinning = threads, spinning
            # Drop the first session before the second is built: two sets of pre-packed weights at once
            # were the peak of an update's memory (+9 MB for a 5 MB model). Nothing runs yet here.
            self._session = None
            self._session = self._new_session(model)

    def run(self, feeds: Feeds) -> Outputs:
        """Run the session. Raises :class:`ModelError` naming the model and the input shapes."""
        for name in self._text_inputs:  # ORT's string tensors take str; bytes would become "b'...'"
            arr = feeds[name]
            if any(isinstance(v, bytes) for v in arr.flat):
                text = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in arr.flat]
                feeds = {**feeds, name: np.array(text, dtype=object).reshape(arr.shape)}
        try:
            values = self._session.run(self._output_names, feeds, self._run_options)
        except Exception as e:  # onnxruntime's pybind exceptions share no useful base
            shapes = {n: list(a.shape) for n, a in feeds.items()}
            raise ModelError(f"{self._where}: inference failed for input shapes {shapes}: {_first_line(e)}") from e
        out = dict(zip(self._output_names, values, strict=True))
        for name in self._wrap:  # sequences/maps come back as Python lists and dicts
            value = out[name]
            if not isinstance(value, np.ndarray):
                arr = np.empty(len(value) if isinstance(value, list) else (), dtype=object)
                if isinstance(value, list):
                    arr[:] = value
                else:
                    arr[()] = value
                out[name] = arr
        return out

    def reset(self) -> None:
        """Nothing to do: a session keeps no state between runs."""

    def bare_callable(self) -> Callable[[Feeds], object]:
        run = self._session.run
        names = self._output_names
        return lambda feeds: run(names, feeds)

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "onnxruntime",
            "version": self._version,
            "threads": self._threads,
            "spinning": self._spinning,
            "providers": self._session.get_providers(),
        }


# --- the ModelProto fields quantized I/O needs, read from the protobuf wire format ---------------
# Field numbers from onnx/onnx.proto3 (stable since IR version 3).
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 4, 5
_ATTR_NAME, _ATTR_T = 1, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_INT32_DATA = 1, 2, 4, 5
_TENSOR_INT64_DATA, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DOUBLE_DATA = 7, 8, 9, 10
# TensorProto.DataType -> numpy, for the scale and zero-point types DequantizeLinear accepts
_ONNX_DTYPES: dict[int, Any] = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    10: np.float16,
    11: np.float64,
}


class _WireError(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _WireError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): an int for varints, a memoryview for everything else."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _WireError("truncated field")
            yield field, wire, buf[pos : pos + n]
            pos += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            yield field, wire, buf[pos : pos + n]
            pos += n
        else:
            raise _WireError(f"unsupported wire type {wire}")


def _tensor_value(buf: memoryview) -> tuple[str, float | int | None]:
    """(name, the value of a one-element tensor, or None for a larger or unreadable one)."""
    name, dtype = "", 0
    dims: list[int] = []
    raw: memoryview | None = None
    ints: list[int] = []
    floats: list[float] = []
    for field, wire, v in _fields(buf):
        if field == _TENSOR_NAME:
            name = bytes(v).decode("utf-8", "replace")
        elif field == _TENSOR_DATA_TYPE:
            dtype = v
        elif field == _TENSOR_DIMS:
            dims += [v] if wire == 0 else _packed_varints(v)
        elif field == _TENSOR_RAW_DATA:
            raw = v
        elif field in (_TENSOR_INT32_DATA, _TENSOR_INT64_DATA):
            ints += [v] if wire == 0 else _packed_varints(v)
        elif field == _TENSOR_FLOAT_DATA:
            floats += list(struct.unpack(f"<{len(v) // 4}f", v)) if wire == 2 else [struct.unpack("<f", v)[0]]
        elif field == _TENSOR_DOUBLE_DATA:
            floats += list(struct.unpack(f"<{len(v) // 8}d", v)) if wire == 2 else [struct.unpack("<d", v)[0]]
    np_type = _ONNX_DTYPES.get(dtype)
    if np_type is None or int(np.prod(dims)) != 1:
        return name, None
    dt = np.dtype(np_type)
    if raw is not None:
        if len(raw) != dt.itemsize:
            return name, None
        value = np.frombuffer(raw, dtype=dt.newbyteorder("<"))[0]
        return name, float(value) if dt.kind == "f" else int(value)
    if dt.kind == "f" and len(floats) == 1:
        return name, float(floats[0])
    if dt == np.float16 and len(ints) == 1:  # float16 values are stored as their bits in int32_data
        return name, float(np.array([ints[0]], np.uint16).view(np.float16)[0])
    if dt.kind in "iu" and len(ints) == 1:
        v64 = ints[0] - (1 << 64) if ints[0] >= 1 << 63 else ints[0]  # negative int32 are 10-byte varints
        return name, int(v64)
    return name, None


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def _scan_graph(graph: memoryview) -> tuple[list[tuple[str, list[str], list[str], memoryview]], dict[str, memoryview]]:
    nodes = []
    inits: dict[str, memoryview] = {}
    for field, wire, v in _fields(graph):
        if wire != 2:
            continue
        if field == _GRAPH_NODE:
            op, ins, outs = "", [], []
            for f, w, x in _fields(v):
                if w != 2:
                    continue
                if f == _NODE_OP_TYPE:
                    op = bytes(x).decode("utf-8", "replace")
                elif f == _NODE_INPUT:
                    ins.append(bytes(x).decode("utf-8", "replace"))
                elif f == _NODE_OUTPUT:
                    outs.append(bytes(x).decode("utf-8", "replace"))
            nodes.append((op, ins, outs, v))
        elif field == _GRAPH_INITIALIZER:
            for f, w, x in _fields(v):
                if f == _TENSOR_NAME and w == 2:
                    inits[bytes(x).decode("utf-8", "replace")] = v
                    break
    return nodes, inits


def _constant_value(node: memoryview) -> float | int | None:
    for f, w, x in _fields(node):
        if f == _NODE_ATTRIBUTE and w == 2:
            attr_name, tensor = "", None
            for af, aw, ax in _fields(x):
                if af == _ATTR_NAME and aw == 2:
                    attr_name = bytes(ax).decode("utf-8", "replace")
                elif af == _ATTR_T and aw == 2:
                    tensor = ax
            if attr_name == "value" and tensor is not None:
                return _tensor_value(tensor)[1]
    return None


def _quantized_io_from_bytes(buf: memoryview) -> tuple[dict[str, Quantization], dict[str, Quantization]]:
    graph = next((v for f, w, v in _fields(buf) if f == _MODEL_GRAPH and w == 2), None)
    if graph is None:
        return {}, {}
    nodes, inits = _scan_graph(graph)
    constants = {outs[0]: raw for op, _, outs, raw in nodes if op == "Constant" and outs}

    def value(name: str) -> float | int | None:
        if name in inits:
            return _tensor_value(inits[name])[1]
        if name in constants:
            return _constant_value(constants[name])
        return None

    def params(ins: list[str]) -> Quantization | None:
        scale = value(ins[1]) if len(ins) > 1 else None
        zp = value(ins[2]) if len(ins) > 2 and ins[2] else 0
        if scale is None or zp is None or not float(scale) > 0:
            return None  # per-axis, computed at run time, or unreadable: no float convenience
        return Quantization(float(scale), int(zp))

    q_in: dict[str, Quantization] = {}
    q_out: dict[str, Quantization] = {}
    found_in: dict[str, set[Quantization | None]] = {}
    for op, ins, outs, _ in nodes:
        if op == "DequantizeLinear" and ins:
            found_in.setdefault(ins[0], set()).add(params(ins))
        elif op == "QuantizeLinear" and outs:
            q = params(ins)
            if q is not None:
                q_out[outs[0]] = q
    for name, qs in found_in.items():
        only = next(iter(qs)) if len(qs) == 1 else None  # consumers that disagree: integer-only
        if only is not None:
            q_in[name] = only
    return q_in, q_out


def quantized_io(model: bytes | str, where: str = "model") -> tuple[dict[str, Quantization], dict[str, Quantization]]:
    """Scale and zero point of tensors dequantized by a ``DequantizeLinear`` and of tensors produced
    by a ``QuantizeLinear``, by tensor name: ``(dequantized, quantized)``. Only per-tensor parameters
    stored in the model (initializers or ``Constant`` nodes) count. A model that cannot be parsed
    gives no parameters (logged at debug): its tensors stay integer-only. Never raises."""
    if not isinstance(model, str):
        return _parse_or_nothing(memoryview(model), where)
    try:
        with open(model, "rb") as f:
            if f.seek(0, 2) == 0:
                return {}, {}
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                found = _parse_or_nothing(view, where)
                view.release()
                return found
    except (OSError, ValueError, BufferError) as e:
        log.debug("%s: cannot read quantization parameters from the ONNX graph: %s", where, e)
        return {}, {}


def _parse_or_nothing(buf: memoryview, where: str) -> tuple[dict[str, Quantization], dict[str, Quantization]]:
    # Errors are caught here, so that no traceback keeps a view of a memory-mapped file alive.
    try:
        return _quantized_io_from_bytes(buf)
    except (_WireError, ValueError, struct.error, OverflowError) as e:
        log.debug("%s: cannot read quantization parameters from the ONNX graph: %s", where, e)
        return {}, {}
