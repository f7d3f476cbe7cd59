"""Latency of a model through edgefleet's ``Model.predict`` beside the bare runtime, in one run.

Calls alternate (agent, bare, bare, agent, ...) so that both see the same machine state; the garbage
collector is paused while timing. Figures are per call, in microseconds.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgefleet.agent.runtime import Model
from edgefleet.agent.tensors import TensorSpec

__all__ = ["bench_model", "random_inputs", "summarize"]


def random_inputs(
    specs: list[TensorSpec], seed: int = 0, float_for_quantized: bool = False
) -> dict[str, np.ndarray[Any, Any]]:
    """Inputs of the right dtype and shape (dynamic dims = 1). Quantized inputs get their integer
    dtype unless ``float_for_quantized``."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for s in specs:
        shape = tuple(1 if d is None else d for d in s.shape)
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

    ``bare_feeds`` default to ``feeds`` as ``predict`` would convert them; ``bare_prep`` is work the
    bare side must do on every call to be comparable (quantizing float input by hand, say).
    """
    feeds = feeds if feeds is not None else random_inputs(model.inputs)
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
