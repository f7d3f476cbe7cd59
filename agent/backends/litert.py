"""LiteRT (TFLite) backend: ``ai_edge_litert``, falling back to ``tflite_runtime``.

Dynamic dims: a tensor whose ``shape_signature`` holds -1 is allocated at a placeholder shape (1 for
each dynamic dim) that real models often reject ("XNNPack delegate failed to reshape"), so such a
model is not allocated at load: the first ``run`` resizes every input to the shape it was given and
allocates then, and any later change of shape resizes again.

Signatures: tensors are named by the chosen signature's keys (``image``, ``logits``), raw tensor
names (``serving_default_image:0``) stay accepted as aliases. The signature is the one asked for,
else ``serving_default``, else the only one; a model with none runs its first subgraph.

State: a model with resource variables (a streaming model's state, say) keeps them between invokes.
``Interpreter.reset_all_variables()`` resets only variable *tensors*, not resource variables, so
``reset`` builds a fresh interpreter for such a model: its variables start again from the values the
model initializes them with.

Concurrency: one interpreter runs one ``invoke`` at a time (and releases the GIL while it runs), so
a stateless model is served by a small pool of interpreters, one per concurrent call, up to
``pool_size`` (default: the cores this process may run on, at most 4, or 1 with a delegate;
``threads`` per interpreter are the profile's). If an extra interpreter cannot be built, the pool
stops growing (logged) and the call waits for one of those there are. The pool grows on
demand: a second interpreter is built only when two calls overlap, so a device with one client
pays for one. Each extra interpreter costs its tensor arena and the delegate's packed weights
(about the model's size for XNNPACK); the file itself is memory-mapped once, or the bundle's bytes
shared. A stateful model keeps ONE interpreter (its state lives inside it) and calls on it are
serialised.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgefleet.agent.backends.base import Feeds, Outputs
from edgefleet.agent.tensors import Quantization, TensorSpec
from edgefleet.errors import ModelError

__all__ = ["LiteRTBackend", "default_pool_size", "import_litert"]

log = logging.getLogger(__name__)

OPTIONS = ("pool_size", "preserve_all_tensors", "signature")
MAX_POOL = 8  # interpreters per model at most (pool_size is bounded by it)
DEFAULT_POOL = 4  # the default pool is the cores available, at most this
Delegate = str | tuple[str, dict[str, Any]]
_RUNTIME_ERRORS = (ValueError, RuntimeError, TypeError)  # what the interpreter's calls raise


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
            "no TFLite runtime: install the agent extra, which brings ai-edge-litert (pip install "
            "'edgefleet-VERSION-py3-none-any.whl[agent]', or -e '.[agent]' from a checkout), or tflite-runtime"
        ) from e


def _spec(name: str, d: dict[str, Any]) -> TensorSpec:
    sig = d.get("shape_signature")
    dims = sig if sig is not None and len(sig) == len(d["shape"]) else d["shape"]
    shape = tuple(None if int(x) < 0 else int(x) for x in dims)
    dtype = np.dtype(d["dtype"])
    scale, zp = d.get("quantization", (0.0, 0))
    quant = Quantization(float(scale), int(zp)) if scale and dtype.kind in "iu" else None
    return TensorSpec(name, shape, dtype, quant)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _same_tensors(details: list[dict[str, Any]], by_key: dict[str, dict[str, Any]]) -> bool:
    return sorted((d["index"], d["name"]) for d in details) == sorted((d["index"], d["name"]) for d in by_key.values())


def _has_resource_tensors(it: Any) -> bool:
    """Resource tensors (variables, and TensorLists) show as object dtype (strings are bytes)."""
    obj = np.dtype(object)
    try:
        details = [d for s in range(it.num_subgraphs()) for d in it.get_tensor_details(s)]
    except (AttributeError, TypeError):  # older tflite_runtime: no num_subgraphs(), first subgraph only
        details = it.get_tensor_details()
    return any(np.dtype(d["dtype"]) == obj for d in details)


def default_pool_size() -> int:
    """The cores this process may run on (its CPU affinity), at most :data:`DEFAULT_POOL`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(DEFAULT_POOL, cores))


class _Instance:
    """One interpreter and what it needs to run: its signature runner or tensor indexes, and the
    input shapes it is allocated at. Not thread-safe: the pool hands it to one caller at a time."""

    def __init__(self, backend: LiteRTBackend, it: Any) -> None:
        self.b = backend
        self.it = it
        self.runner: Any = None
        self.shapes: dict[int, tuple[int, ...] | None] = {}
        self.prepare()

    def prepare(self) -> None:
        """Allocate a model with fixed input shapes now; one with dynamic dims at its first run."""
        b = self.b
        if b._runner_key is not None:
            self.runner = self.it.get_signature_runner(b._runner_key)
            return
        if b._dynamic:
            self.shapes = dict.fromkeys(b._in_index.values())
            return
        try:
            self.it.allocate_tensors()
        except _RUNTIME_ERRORS as e:
            raise ModelError(f"{b._where}: not a loadable TFLite model: {_first_line(e)}") from e
        self.shapes = {
            idx: tuple(d for d in s.shape if d is not None)
            for s, idx in zip(b.inputs, b._in_index.values(), strict=True)
        }

    def run(self, feeds: Feeds) -> Outputs:
        b = self.b
        if self.runner is not None:
            try:
                result: Outputs = self.runner(**feeds)
            except _RUNTIME_ERRORS as e:
                raise b._failed("inference", feeds, e) from e
            return {name: np.asarray(result[name]) for name, _ in b._out_index}
        it = self.it
        shapes = self.shapes
        resized = False
        try:
            for name, arr in feeds.items():
                idx = b._in_index[name]
                if arr.shape != shapes[idx]:
                    it.resize_tensor_input(idx, arr.shape, strict=False)
                    shapes[idx] = arr.shape
                    resized = True
            if resized:
                it.allocate_tensors()
        except _RUNTIME_ERRORS as e:
            # The interpreter is left unallocated: the next call resizes and allocates again.
            self.shapes = dict.fromkeys(shapes)
            raise b._failed("resizing", feeds, e) from e
        try:
            for name, arr in feeds.items():
                it.set_tensor(b._in_index[name], arr)
            it.invoke()
            out = {name: it.get_tensor(idx) for name, idx in b._out_index}
        except _RUNTIME_ERRORS as e:
            raise b._failed("inference", feeds, e) from e
        for name in b._scalar_out:
            out[name] = np.asarray(out[name])
        return out


class LiteRTBackend:
    """A model on LiteRT interpreters: a pool of them for a stateless model (``thread_safe``), one
    for a stateful model (the caller locks)."""

    name = "litert"

    def __init__(
        self,
        model: bytes | str,
        where: str,
        threads: int | None = None,
        delegates: Sequence[Delegate] = (),
        preserve_all_tensors: bool = False,
        signature: str | None = None,
        pool_size: int | None = None,
    ) -> None:
        if pool_size is not None and (type(pool_size) is not int or not 1 <= pool_size <= MAX_POOL):
            raise ModelError(f"option pool_size: expected an integer from 1 to {MAX_POOL}, got {pool_size!r}")
        interpreter_cls, load_delegate, package = import_litert()
        self._where = where
        self._delegate_specs = list(delegates)
        self._load_delegate = load_delegate
        self._cls = interpreter_cls
        kwargs: dict[str, Any] = {}
        # A file is memory-mapped by the runtime (less RSS); bundle members come as bytes.
        kwargs["model_path" if isinstance(model, str) else "model_content"] = model
        if threads is not None:
            kwargs["num_threads"] = int(threads)
        if preserve_all_tensors:
            kwargs["experimental_preserve_all_tensors"] = True
        self._kwargs = kwargs
        it = self._new_interpreter()
        sigs = it.get_signature_list()
        self.signatures: list[str] = list(sigs)
        if signature is not None and signature not in sigs:
            raise ModelError(f"{where}: no signature {signature!r}; the model's signatures are {self.signatures}")
        chosen = signature or ("serving_default" if "serving_default" in sigs else None)
        if chosen is None and len(sigs) == 1:
            chosen = self.signatures[0]
        self.signature = chosen
        in_details = it.get_input_details()
        out_details = it.get_output_details()
        by_key_in: dict[str, dict[str, Any]] = {}
        by_key_out: dict[str, dict[str, Any]] = {}
        if chosen is not None:
            runner = it.get_signature_runner(chosen)
            by_key_in, by_key_out = runner.get_input_details(), runner.get_output_details()
            del runner  # a live runner holds a reference that makes the interpreter refuse invoke()
        # The chosen signature is the first subgraph (the usual case) when its tensors are those the
        # interpreter's own calls use: then set_tensor/invoke run it directly, the fastest path.
        self._runner_key: str | None = None
        if chosen is not None and not (_same_tensors(in_details, by_key_in) and _same_tensors(out_details, by_key_out)):
            self._runner_key = chosen
            in_pairs = list(by_key_in.items())
            out_pairs = list(by_key_out.items())
            self.aliases = {d["name"]: k for k, d in in_pairs if d["name"] != k}
        else:
            in_key = {d["index"]: k for k, d in by_key_in.items()}
            out_key = {d["index"]: k for k, d in by_key_out.items()}
            in_pairs = [(in_key.get(d["index"], d["name"]), d) for d in in_details]
            out_pairs = [(out_key.get(d["index"], d["name"]), d) for d in out_details]
            self.aliases = {d["name"]: k for k, d in in_pairs if d["name"] != k}
        self.inputs = [_spec(k, d) for k, d in in_pairs]
        self.outputs = [_spec(k, d) for k, d in out_pairs]
        self._in_index = {k: int(d["index"]) for k, d in in_pairs}
        self._out_index = [(k, int(d["index"])) for k, d in out_pairs]
        self._scalar_out = [s.name for s in self.outputs if s.shape == ()]  # get_tensor gives numpy scalars
        self.stateful = _has_resource_tensors(it)
        self.metadata: dict[str, str] = {}
        self._dynamic = any(d is None for s in self.inputs for d in s.shape)
        # A stateful model's state lives in its interpreter: exactly one, whatever was asked. With a
        # delegate (an Edge TPU, say) the accelerator serialises calls anyway, and a second
        # interpreter would open the device again: one, unless pool_size asks for more.
        default = 1 if delegates else default_pool_size()
        self.pool_size = 1 if self.stateful else (pool_size or default)
        self.thread_safe = self.pool_size > 1
        first = _Instance(self, it)
        self._first = first
        self._idle: list[_Instance] = [first]
        self._made = 1
        self._cond = threading.Condition(threading.Lock())
        self._threads = threads
        self._package = package
        self._delegates = [d if isinstance(d, str) else d[0] for d in delegates]

    def _new_interpreter(self) -> Any:
        loaded = []
        for d in self._delegate_specs:
            lib, opts = (d, {}) if isinstance(d, str) else d
            try:
                loaded.append(self._load_delegate(lib, opts))
            except (ValueError, OSError, RuntimeError) as e:
                raise ModelError(f"{self._where}: cannot load delegate {lib!r}: {e}") from e
        try:
            return self._cls(**self._kwargs, experimental_delegates=loaded or None)
        except _RUNTIME_ERRORS as e:
            raise ModelError(f"{self._where}: not a loadable TFLite model: {_first_line(e)}") from e

    def _failed(self, what: str, feeds: Feeds, e: BaseException) -> ModelError:
        shapes = {n: list(a.shape) for n, a in feeds.items()}
        return ModelError(f"{self._where}: {what} failed for input shapes {shapes}: {_first_line(e)}")

    def _acquire(self) -> _Instance:
        """An idle interpreter; a new one while the pool is below its size; else wait for one."""
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._made < self.pool_size:
                    self._made += 1
                    break
                self._cond.wait()
        try:
            return _Instance(self, self._new_interpreter())  # built outside the lock: other calls go on
        except ModelError as e:
            # Serving goes on with the interpreters there are: the pool stops growing, this call waits.
            log.warning(
                "%s: cannot build interpreter %d of %d (%s); serving with %d",
                self._where,
                self._made,
                self.pool_size,
                e,
                self._made - 1,
            )
            with self._cond:
                self._made -= 1
                self.pool_size = self._made
                while not self._idle:
                    self._cond.wait()
                return self._idle.pop()
        except BaseException:
            with self._cond:
                self._made -= 1
                self._cond.notify()
            raise

    def _release(self, inst: _Instance) -> None:
        with self._cond:
            self._idle.append(inst)
            self._cond.notify()

    @property
    def instances(self) -> int:
        """Interpreters built so far (at most ``pool_size``)."""
        return self._made

    def run(self, feeds: Feeds) -> Outputs:
        """Resize if a shape changed, then invoke, on an interpreter of the pool. Raises
        :class:`ModelError` naming the model and the input shapes when the runtime refuses them or
        fails."""
        inst = self._acquire()
        try:
            return inst.run(feeds)
        finally:
            self._release(inst)

    def adapt(self, seconds: float | None) -> None:
        """Nothing: threads come from the profile (``threads``), concurrency from the pool."""

    def reset(self) -> None:
        """Back to the model's initial state: variable tensors are zeroed; a model with resource
        variables gets a fresh interpreter. Waits for the pool's running calls. Raises
        :class:`ModelError` if the model cannot be reloaded (a delegate gone, say)."""
        with self._cond:
            while len(self._idle) < self._made:
                self._cond.wait()
            if not self.stateful:
                for inst in self._idle:
                    inst.it.reset_all_variables()
                return
            inst = self._idle[0]  # a stateful model has one interpreter
            inst.runner = None
            inst.it = None
            inst.it = self._new_interpreter()
            inst.prepare()

    def bare_callable(self) -> Callable[[Feeds], object]:
        inst = self._first
        if inst.runner is not None:
            runner = inst.runner
            return lambda feeds: runner(**feeds)
        it = inst.it
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
            "signature": self.signature,
            "pool_size": self.pool_size,
            "interpreters": self._made,
        }


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"ai_edge_litert": "ai-edge-litert", "tflite_runtime": "tflite-runtime"}[package]
    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
