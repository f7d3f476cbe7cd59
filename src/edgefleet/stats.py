"""Training-data statistics and drift: pure functions over arrays, shared by packager and agent.

A baseline holds, per input tensor, the mean, standard deviation and a histogram of each feature
(each element of one sample). Tensors with more than ``max_features`` elements per sample (images)
are summarised as one feature over all their values, so a baseline stays a few kilobytes.
Drift of live data against a baseline is measured with the population stability index (PSI).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["feature_stats", "histogram", "psi"]


def feature_stats(x: np.ndarray[Any, Any], bins: int = 10, max_features: int = 256) -> dict[str, Any]:
    """Statistics of samples ``x`` (first axis = sample), JSON-ready."""
    n = x.shape[0] if x.ndim else 1
    flat = x.reshape(n, -1).astype(np.float64)
    granularity = "feature"
    if flat.shape[1] > max_features:
        flat = flat.reshape(-1, 1)
        granularity = "tensor"
    lo, hi = flat.min(axis=0), flat.max(axis=0)
    hi = np.where(hi > lo, hi, lo + 1.0)
    edges, counts = [], []
    for j in range(flat.shape[1]):
        e = np.linspace(lo[j], hi[j], bins + 1)
        c, _ = np.histogram(flat[:, j], bins=e)
        edges.append([float(v) for v in e])
        counts.append([int(v) for v in c])
    return {
        "granularity": granularity,
        "samples": int(n),
        "features": int(flat.shape[1]),
        "mean": [float(v) for v in flat.mean(axis=0)],
        "std": [float(v) for v in flat.std(axis=0)],
        "edges": edges,
        "counts": counts,
    }


def histogram(values: np.ndarray[Any, Any], edges: list[float]) -> np.ndarray[Any, Any]:
    """Counts of ``values`` in ``edges``, with values outside folded into the end bins."""
    e = np.asarray(edges, dtype=np.float64)
    v = np.clip(np.asarray(values, dtype=np.float64).reshape(-1), e[0], e[-1])
    return np.histogram(v, bins=e)[0]


def psi(
    expected: np.ndarray[Any, Any] | list[int], actual: np.ndarray[Any, Any] | list[int], eps: float = 1e-4
) -> float:
    """Population stability index between two histograms over the same bins (0 = same; >0.25 = drift)."""
    p = np.asarray(expected, dtype=np.float64)
    q = np.asarray(actual, dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        return 0.0
    p = np.clip(p / p.sum(), eps, None)
    q = np.clip(q / q.sum(), eps, None)
    return float(np.sum((q - p) * np.log(q / p)))
