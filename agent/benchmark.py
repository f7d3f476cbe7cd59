"""Latency of a model through edgefleet's ``Model.predict`` beside the bare runtime, in one run.

Calls alternate (agent, bare, bare, agent, ...) so that both see the same machine state; the garbage
collector is paused while timing. Figures are per call, in microseconds.

Inputs (:func:`bench_inputs`), first that applies: arrays given (or an ``.npz`` file) in the sample
layout shared with golden vectors and calibration sets, each array ``(N, *input shape)`` (scalars
``(N,)``) keyed ``NAME`` or ``input.NAME``, of which sample 0 is used; random data at the ``shapes``
given for dynamic dims; the bundle's first golden sample; random data with a dynamic leading batch
dim of one. A model with other dynamic dims and none of these is a :class:`ModelError` saying what to
give.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.agent.tensors import TensorSpec
from edgefleet.errors import ModelError

__all__ = ["bench_inputs", "bench_model", "random_inputs", "resolve_shape", "summarize"]

Shapes = Mapping[str, Sequence[int]]


def _fmt(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def resolve_shape(spec: TensorSpec, given: Sequence[int] | None = None, guess: bool = False) -> tuple[int, ...]:
    """A concrete shape for ``spec``: ``given`` checked against its rank and fixed dims, else its
    fixed dims with a dynamic leading batch dim of one (and, with ``guess``, every other dynamic
    dim too, which many models reject). Raises :class:`ModelError` naming the input when ``given``
    does not fit, or, without ``guess``, another dim is dynamic and no shape was given."""
    if given is not None:
        dims = tuple(int(d) for d in given)
        if (
            len(dims) != len(spec.shape)
            or any(w is not None and w != g for w, g in zip(spec.shape, dims, strict=False))
            or any(d < 0 for d in dims)
        ):
            raise ModelError(f"shape for input {spec.name!r}: expected {_fmt(spec.shape)}, got {list(dims)}")
        return dims
    out: list[int] = []
    for axis, d in enumerate(spec.shape):
        if d is None:
            if not guess and (axis != 0 or len(spec.shape) < 2):
                example = "x".join("N" if x is None else str(x) for x in spec.shape) or "(scalar)"
                raise ModelError(
                    f"input {spec.name!r} has dynamic dims {_fmt(spec.shape)}: give its shape "
                    f"(e.g. {spec.name}={example} with numbers) or inputs from an .npz"
                )
            d = 1
        out.append(d)
    return tuple(out)


def _check_names(specs: Sequence[TensorSpec], shapes: Shapes) -> None:
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        names = [s.name for s in specs]
        raise ModelError(f"shape given for unknown input(s) {unknown}; the model's inputs are {names}")


def random_inputs(
    specs: list[TensorSpec], seed: int = 0, float_for_quantized: bool = False, shapes: Shapes | None = None
) -> dict[str, np.ndarray[Any, Any]]:
    """Random inputs of the right dtype, at ``shapes[name]`` where given, else at the fixed dims
    with every dynamic dim one (a guess: :func:`bench_inputs` refuses to guess). Quantized inputs
    get their integer dtype unless ``float_for_quantized``. Raises :class:`ModelError` for a shape
    that does not fit or an unknown name in ``shapes``."""
    shapes = shapes or {}
    _check_names(specs, shapes)
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for s in specs:
        shape = resolve_shape(s, shapes.get(s.name), guess=True)
        if s.quantization is not None and float_for_quantized:
            feeds[s.name] = rng.random(shape, dtype=np.float32)
        elif s.dtype.kind == "f":
            feeds[s.name] = rng.random(shape).astype(s.dtype)
        elif s.dtype.kind in "iu":
            info = np.iinfo(s.dtype)
            feeds[s.name] = rng.integers(max(info.min, -100), min(info.max, 100), shape, endpoint=True).astype(s.dtype)
        elif s.dtype.kind == "b":
            feeds[s.name] = rng.random(shape) > 0.5
        else:
            feeds[s.name] = np.full(shape, "edgefleet", dtype=object)
    return feeds


def bench_inputs(
    model: Model,
    inputs: str | os.PathLike[str] | Mapping[str, np.ndarray[Any, Any]] | None = None,
    shapes: Shapes | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray[Any, Any]]:
    """One request for ``model`` (see the module docstring for the order of sources).

    ``inputs``: an ``.npz`` path or arrays, ``(N, *input shape)`` each, keyed by input name or
    ``input.NAME``. ``shapes``: ``{name: shape}`` for inputs with dynamic dims (as the CLI's
    ``--shape x=1x3x640x640``). Raises :class:`ModelError` naming the file, the array or the input.
    """
    if inputs is not None:
        return _sample_zero(model, inputs)
    if not shapes and model.example_inputs is not None:
        return dict(model.example_inputs)
    shapes = shapes or {}
    _check_names(model.inputs, shapes)
    for s in model.inputs:  # no guessing here: a dynamic dim other than the batch needs a shape
        if s.name not in shapes:
            resolve_shape(s)
    return random_inputs(model.inputs, seed, shapes=shapes)


def _sample_zero(
    model: Model, inputs: str | os.PathLike[str] | Mapping[str, np.ndarray[Any, Any]]
) -> dict[str, np.ndarray[Any, Any]]:
    where = "inputs"
    if isinstance(inputs, (str, os.PathLike)):
        where = str(inputs)
        try:
            with np.load(Path(inputs), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError as e:
            raise ModelError(f"{where}: no such file") from e
        except (ValueError, OSError, EOFError) as e:
            raise ModelError(f"{where}: not a readable .npz file: {e}") from e
    else:
        arrays = {k: np.asarray(v) for k, v in inputs.items()}
    by_name = {k[6:] if k.startswith("input.") else k: v for k, v in arrays.items() if not k.startswith("output.")}
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for s in model.inputs:
        arr = by_name.get(s.name)
        if arr is None:
            raise ModelError(f"{where}: no array for input {s.name!r}; it has {sorted(arrays)}")
        if arr.ndim != len(s.shape) + 1 or arr.shape[0] == 0:
            raise ModelError(
                f"{where}: array {s.name!r} has shape {list(arr.shape)}; expected samples stacked on a new "
                f"leading axis, (N, *{_fmt(s.shape)})" + (" i.e. (N,) for a scalar" if not s.shape else "")
            )
        feeds[s.name] = arr[0]
    return feeds


def summarize(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, dtype=np.float64) / 1e3
    return {
        "p50_us": float(np.percentile(a, 50)),
        "p95_us": float(np.percentile(a, 95)),
        "p99_us": float(np.percentile(a, 99)),
        "mean_us": float(a.mean()),
        "throughput_per_s": float(1e6 / a.mean()),
    }


def bench_model(
    model: Model,
    feeds: dict[str, np.ndarray[Any, Any]] | None = None,
    runs: int = 300,
    warmup: int = 20,
    bare_feeds: dict[str, np.ndarray[Any, Any]] | None = None,
    bare_prep: Callable[[dict[str, np.ndarray[Any, Any]]], dict[str, np.ndarray[Any, Any]]] | None = None,
) -> dict[str, Any]:
    """Time ``model.predict(feeds)`` and the bare runtime on the same inputs.

    ``feeds`` default to :func:`bench_inputs` (the golden sample of a bundle, else random data).
    ``bare_feeds`` default to ``feeds`` as ``predict`` would convert them; ``bare_prep`` is work the
    bare side must do on every call to be comparable (quantizing float input by hand, say). A
    stateful model is reset before and after (timing runs advance its state). Raises
    :class:`ModelError` when the model refuses the inputs.
    """
    feeds = feeds if feeds is not None else bench_inputs(model)
    model.reset()
    if bare_feeds is None:
        bare_feeds, _ = model.prepare(feeds)
    bare = model.bare_callable()
    predict = model.predict

    def agent_call() -> None:
        predict(feeds)

    if bare_prep is None:

        def bare_call() -> None:
            bare(bare_feeds)
    else:

        def bare_call() -> None:
            bare(bare_prep(bare_feeds))

    for _ in range(warmup):
        agent_call()
        bare_call()
    agent_ns: list[int] = []
    bare_ns: list[int] = []
    clock = time.perf_counter_ns
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for i in range(runs):
            order = ((agent_call, agent_ns), (bare_call, bare_ns))
            for fn, sink in order if i % 2 == 0 else order[::-1]:
                t0 = clock()
                fn()
                sink.append(clock() - t0)
    finally:
        if gc_was:
            gc.enable()
        model.reset()
    a, b = summarize(agent_ns), summarize(bare_ns)
    return {
        "model": model.name,
        "source": model.source,
        "runtime": model.backend.info(),
        "runs": runs,
        "agent": a,
        "bare": b,
        "ratio_p50": a["p50_us"] / b["p50_us"],
        "overhead_p50_us": a["p50_us"] - b["p50_us"],
    }
