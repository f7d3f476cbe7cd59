"""ONNX Runtime backend."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgefleet.agent.backends.base import Feeds, Outputs
from edgefleet.agent.tensors import TensorSpec
from edgefleet.errors import ModelError

__all__ = ["OnnxBackend"]

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
OPTIONS = ("providers", "graph_optimization_level", "inter_op_threads")


def _spec(node: Any, where: str, output: bool = False) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        if output and node.type.startswith(("seq(", "map(")):
            # e.g. scikit-learn's ZipMap probabilities: passed through as a numpy object array
            return TensorSpec(node.name, (None,) if node.type.startswith("seq(") else (), np.dtype(object))
        raise ModelError(f"{where}: tensor {node.name!r} has type {node.type}, which edgefleet does not support")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or []))
    return TensorSpec(node.name, shape, np.dtype(dtype))


class OnnxBackend:
    """A model on ONNX Runtime. ``InferenceSession.run`` is thread-safe, so no lock is needed."""

    name = "onnxruntime"
    thread_safe = True

    def __init__(
        self,
        model: bytes | str,
        where: str,
        threads: int | None = None,
        delegates: Sequence[str] = (),
        providers: Sequence[str] | None = None,
        graph_optimization_level: str = "all",
        inter_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        if graph_optimization_level not in _OPT_LEVELS:
            raise ModelError(
                f"option graph_optimization_level: expected one of {list(_OPT_LEVELS)}, "
                f"got {graph_optimization_level!r}"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization_level]
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        if inter_op_threads is not None:
            opts.inter_op_num_threads = int(inter_op_threads)
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        # Delegates, for ONNX, are execution providers tried before the CPU.
        wanted = list(providers) if providers is not None else [*delegates, "CPUExecutionProvider"]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelError(
                f"{where}: execution provider(s) {missing} not available; this onnxruntime has {available}"
            )
        try:
            self._session = ort.InferenceSession(model, sess_options=opts, providers=wanted)
        except Exception as e:  # onnxruntime raises its own untyped errors
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{where}: not a loadable ONNX model: {first}") from e
        self.inputs = [_spec(n, where) for n in self._session.get_inputs()]
        self.aliases: dict[str, str] = {}
        self.outputs = [_spec(n, where, output=True) for n in self._session.get_outputs()]
        self._wrap = [o.name for o in self.outputs if o.dtype.kind == "O"]
        self._text_inputs = [i.name for i in self.inputs if i.dtype.kind == "O"]
        self._output_names = [o.name for o in self.outputs]
        self._threads = threads
        self._version = ort.__version__

    def run(self, feeds: Feeds) -> Outputs:
        for name in self._text_inputs:  # ORT's string tensors take str; bytes would become "b'...'"
            arr = feeds[name]
            if any(isinstance(v, bytes) for v in arr.flat):
                text = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in arr.flat]
                feeds = {**feeds, name: np.array(text, dtype=object).reshape(arr.shape)}
        out = dict(zip(self._output_names, self._session.run(self._output_names, feeds), strict=True))
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

    def bare_callable(self) -> Callable[[Feeds], object]:
        run = self._session.run
        names = self._output_names
        return lambda feeds: run(names, feeds)

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "onnxruntime",
            "version": self._version,
            "threads": self._threads,
            "providers": self._session.get_providers(),
        }
