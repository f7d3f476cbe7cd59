"""LiteRT (TFLite) backend: ``ai_edge_litert``, falling back to ``tflite_runtime``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgefleet.agent.backends.base import Feeds, Outputs
from edgefleet.agent.tensors import Quantization, TensorSpec
from edgefleet.errors import ModelError

__all__ = ["LiteRTBackend", "import_litert"]

log = logging.getLogger(__name__)

OPTIONS = ("preserve_all_tensors",)
Delegate = str | tuple[str, dict[str, Any]]


def import_litert() -> tuple[Any, Any, str]:
    """(Interpreter, load_delegate, package name) from whichever LiteRT runtime is installed."""
    try:
        from ai_edge_litert.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "ai_edge_litert"
    except ImportError:
        pass
    try:
        from tflite_runtime.interpreter import Interpreter, load_delegate

        return Interpreter, load_delegate, "tflite_runtime"
    except ImportError as e:
        raise ModelError(
            "no TFLite runtime: install ai-edge-litert (pip install 'edgefleet[agent]') or tflite-runtime"
        ) from e


def _spec(name: str, d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    dims = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
    shape = tuple(None if int(x) < 0 else int(x) for x in dims)
    dtype = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    quant = Quantization(float(scale), int(zp)) if scale and dtype.kind in "iu" else None
    return TensorSpec(name, shape, dtype, quant)


class LiteRTBackend:
    """A model on the LiteRT interpreter. The interpreter is not thread-safe: the caller locks."""

    name = "litert"
    thread_safe = False

    def __init__(
        self,
        model: bytes | str,
        where: str,
        threads: int | None = None,
        delegates: Sequence[Delegate] = (),
        preserve_all_tensors: bool = False,
    ) -> None:
        interpreter_cls, load_delegate, package = import_litert()
        loaded = []
        for d in delegates:
            lib, opts = (d, {}) if isinstance(d, str) else d
            try:
                loaded.append(load_delegate(lib, opts))
            except (ValueError, OSError, RuntimeError) as e:
                raise ModelError(f"{where}: cannot load delegate {lib!r}: {e}") from e
        kwargs: dict[str, Any] = {"experimental_delegates": loaded or None}
        # A file is memory-mapped by the runtime (less RSS); bundle members come as bytes.
        kwargs["model_path" if isinstance(model, str) else "model_content"] = model
        if threads is not None:
            kwargs["num_threads"] = int(threads)
        if preserve_all_tensors:
            kwargs["experimental_preserve_all_tensors"] = True
        try:
            self._it = interpreter_cls(**kwargs)
            self._it.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(f"{where}: not a loadable TFLite model: {first}") from e
        in_details = self._it.get_input_details()
        out_details = self._it.get_output_details()
        # With exactly one signature, tensors are named by its keys ("image", "scores"), as TF users
        # know them; the raw tensor names ("serving_default_image:0") still work as aliases.
        in_names = {d["index"]: d["name"] for d in in_details}
        out_names = {d["index"]: d["name"] for d in out_details}
        sigs = self._it.get_signature_list()
        if len(sigs) == 1:
            runner = self._it.get_signature_runner(next(iter(sigs)))
            for key, d in runner.get_input_details().items():
                in_names[d["index"]] = key
            for key, d in runner.get_output_details().items():
                out_names[d["index"]] = key
        self.aliases = {d["name"]: in_names[d["index"]] for d in in_details if d["name"] != in_names[d["index"]]}
        self.inputs = [_spec(in_names[d["index"]], d) for d in in_details]
        self.outputs = [_spec(out_names[d["index"]], d) for d in out_details]
        self._in_index = {s.name: d["index"] for s, d in zip(self.inputs, in_details, strict=True)}
        self._out_index = [(s.name, d["index"]) for s, d in zip(self.outputs, out_details, strict=True)]
        self._shapes = {d["index"]: tuple(int(x) for x in d["shape"]) for d in in_details}
        self._threads = threads
        self._package = package
        self._delegates = [d if isinstance(d, str) else d[0] for d in delegates]

    def run(self, feeds: Feeds) -> Outputs:
        it = self._it
        resized = False
        for name, arr in feeds.items():
            idx = self._in_index[name]
            if arr.shape != self._shapes[idx]:
                it.resize_tensor_input(idx, arr.shape, strict=False)
                self._shapes[idx] = arr.shape
                resized = True
        if resized:
            try:
                it.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise ModelError(
                    f"cannot run with input shapes {dict((n, a.shape) for n, a in feeds.items())}: {e}"
                ) from e
        for name, arr in feeds.items():
            it.set_tensor(self._in_index[name], arr)
        it.invoke()
        return {name: it.get_tensor(idx) for name, idx in self._out_index}

    def bare_callable(self) -> Callable[[Feeds], object]:
        it = self._it
        set_tensor, invoke, get_tensor = it.set_tensor, it.invoke, it.get_tensor
        ins = list(self._in_index.items())
        outs = [idx for _, idx in self._out_index]

        def bare(feeds: Feeds) -> object:
            for name, idx in ins:
                set_tensor(idx, feeds[name])
            invoke()
            return [get_tensor(i) for i in outs]

        return bare

    def info(self) -> dict[str, Any]:
        return {
            "runtime": self._package,
            "version": _package_version(self._package),
            "threads": self._threads,
            "delegates": self._delegates,
        }


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}[package]
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
