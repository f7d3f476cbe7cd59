"""Nonparametric statistics the rollout gates use (numpy and the standard library only; no scipy).

- :func:`mann_whitney`: the Mann–Whitney U test (two-sided p-value): exact for small samples
  without ties, normal approximation with tie and continuity corrections otherwise.
- :func:`hodges_lehmann`: the Hodges–Lehmann shift estimate ``median(x_i - y_j)`` with its
  distribution-free confidence interval (the one that inverts the Mann–Whitney test).
- :func:`ratio_interval`: the same on log values, for positive figures such as p95 latency: the
  estimate and interval of the ratio ``x / y``.
- :func:`wilson`: the Wilson score interval of a proportion.

Inputs are sequences of finite floats; an empty sample, a NaN or an infinity raises ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any, Literal

import numpy as np

__all__ = [
    "EXACT_MAX_PAIRS",
    "HL_MAX_PAIRS",
    "hodges_lehmann",
    "mann_whitney",
    "ratio_interval",
    "wilson",
    "z_quantile",
]

EXACT_MAX_PAIRS = 400  # n1 * n2 at or below which mann_whitney uses the exact distribution (no ties)
HL_MAX_PAIRS = 1_000_000  # pairwise differences hodges_lehmann computes at most (above: a seeded subsample)
_HL_SEED = 20261201  # the subsample's seed: the same inputs always give the same interval

_Values = Sequence[float] | np.ndarray[Any, Any]


def z_quantile(confidence: float) -> float:
    """The two-sided standard normal quantile of ``confidence`` (0.95 → 1.96).

    Raises ``ValueError`` unless ``0 < confidence < 1``."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _sample(values: _Values, name: str) -> np.ndarray[Any, np.dtype[np.float64]]:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name}: the sample is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: the sample holds a NaN or an infinity")
    return a


def _rank(a: np.ndarray[Any, np.dtype[np.float64]]) -> tuple[np.ndarray[Any, np.dtype[np.float64]], float]:
    """Average ranks (1-based) of ``a`` and the tie term ``sum(t^3 - t)`` over groups of ties."""
    order = np.argsort(a, kind="mergesort")
    s = a[order]
    # group boundaries of equal values
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    ends = np.concatenate((starts[1:], [s.size]))
    counts = ends - starts
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(a.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    tie = float(np.sum(counts.astype(np.float64) ** 3 - counts))
    return ranks, tie


def _exact_counts(m: int, n: int) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Number of arrangements giving each U = 0 .. m*n for samples of sizes m and n (no ties).

    Recursion on the largest value: from x (adds n to U) or from y (adds 0)."""
    prev = [np.ones(1) for _ in range(n + 1)]  # sizes (0, j): U = 0 only
    for i in range(1, m + 1):
        cur = [np.ones(1)]  # sizes (i, 0)
        for j in range(1, n + 1):
            out = np.zeros(i * j + 1)
            a = prev[j]  # (i-1, j), shifted by j
            out[j : j + a.size] += a
            b = cur[j - 1]  # (i, j-1)
            out[: b.size] += b
            cur.append(out)
        prev = cur
    return prev[n]


def mann_whitney(
    x: _Values, y: _Values, *, method: Literal["auto", "exact", "normal"] = "auto"
) -> tuple[float, float]:
    """The Mann–Whitney U test: ``(u, p_two_sided)``, ``u`` the U statistic of ``x`` (the number of
    pairs with ``x_i > y_j``, ties counting one half; ``u / (n1*n2)`` near 1 means x is larger).

    ``method="auto"`` uses the exact null distribution when there are no ties and
    ``n1 * n2 <= EXACT_MAX_PAIRS``, else the normal approximation with the tie correction of the
    variance and a continuity correction of 0.5. ``"exact"`` with ties raises ``ValueError``.
    The p-value is clipped to [0, 1]; with every value tied it is 1.
    """
    a = _sample(x, "x")
    b = _sample(y, "y")
    n1, n2 = a.size, b.size
    ranks, tie = _rank(np.concatenate((a, b)))
    u = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    exact = method == "exact" or (method == "auto" and tie == 0.0 and n1 * n2 <= EXACT_MAX_PAIRS)
    if exact:
        if tie != 0.0:
            raise ValueError("mann_whitney: the exact distribution needs samples without ties")
        counts = _exact_counts(n1, n2)
        total = counts.sum()
        k = round(u)
        lower = counts[: k + 1].sum() / total
        upper = counts[k:].sum() / total
        return u, float(min(1.0, 2.0 * min(lower, upper)))
    n = n1 + n2
    mu = n1 * n2 / 2.0
    var = n1 * n2 / 12.0 * ((n + 1) - tie / (n * (n - 1)))
    if var <= 0.0:
        return u, 1.0
    z = (abs(u - mu) - 0.5) / math.sqrt(var)
    if z <= 0.0:
        return u, 1.0
    return u, float(min(1.0, math.erfc(z / math.sqrt(2.0))))


def hodges_lehmann(x: _Values, y: _Values, confidence: float = 0.95) -> tuple[float, float, float]:
    """The Hodges–Lehmann shift of ``x`` over ``y``: ``(estimate, low, high)``.

    ``estimate`` is the median of the ``n1 * n2`` pairwise differences ``x_i - y_j``; the interval is
    ``[d_(k), d_(N-k+1)]`` of the sorted differences with ``k = floor(N/2 - z * sqrt(n1 n2 (n + 1) / 12))``
    (the Mann–Whitney-based interval, normal approximation for ``k``, no tie correction). When
    ``k < 1`` the samples are too small for that confidence (e.g. 2 vs 2 at 95%) and the interval is
    ``(-inf, inf)``: a gate can never pass or fail on it.

    Bounded work: above ``HL_MAX_PAIRS`` pairs the differences are a deterministic subsample of
    ``HL_MAX_PAIRS`` random pairs (a fixed seed), and the estimate and bounds are read from it at the
    same fractions: an approximation of the full computation, the same for the same inputs.

    Raises ``ValueError`` for an empty or non-finite sample or a confidence outside (0, 1).
    """
    a = _sample(x, "x")
    b = _sample(y, "y")
    z = z_quantile(confidence)
    n1, n2 = a.size, b.size
    pairs = n1 * n2
    if pairs <= HL_MAX_PAIRS:
        d = np.sort(np.subtract.outer(a, b).ravel())
    else:
        rng = np.random.default_rng(_HL_SEED)
        d = np.sort(a[rng.integers(0, n1, HL_MAX_PAIRS)] - b[rng.integers(0, n2, HL_MAX_PAIRS)])
    estimate = float(np.median(d))
    k = math.floor(pairs / 2.0 - z * math.sqrt(pairs * (n1 + n2 + 1) / 12.0))
    if k < 1:
        return estimate, -math.inf, math.inf
    m = d.size
    if m == pairs:
        lo_i, hi_i = k - 1, pairs - k
    else:  # the same fractions of the subsample
        lo_i = min(m - 1, math.floor((k - 1) / pairs * m))
        hi_i = max(0, math.ceil((pairs - k + 1) / pairs * m) - 1)
    low, high = float(d[lo_i]), float(d[hi_i])
    return estimate, min(low, estimate), max(high, estimate)


def ratio_interval(x: _Values, y: _Values, confidence: float = 0.95) -> tuple[float, float, float]:
    """The ratio of positive figures ``x`` over ``y`` (e.g. per-device p95 latency):
    Hodges–Lehmann on the logs, exponentiated: ``(estimate, low, high)``; ``(…, 0, inf)`` when the
    samples are too small for the confidence (see :func:`hodges_lehmann`).

    Raises ``ValueError`` when a value is not positive (or as :func:`hodges_lehmann` does)."""
    a = _sample(x, "x")
    b = _sample(y, "y")
    if np.any(a <= 0.0) or np.any(b <= 0.0):
        raise ValueError("ratio_interval: every value must be positive")
    est, low, high = hodges_lehmann(np.log(a), np.log(b), confidence)
    return math.exp(est), math.exp(low), math.exp(high)


def wilson(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """The Wilson score interval of a proportion: ``(p_hat, low, high)``, ``p_hat = successes / n``.

    Raises ``ValueError`` when ``n < 1``, ``successes`` is outside ``[0, n]``, or the confidence is
    outside (0, 1)."""
    if n < 1:
        raise ValueError(f"wilson: n must be at least 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson: successes must be within [0, {n}], got {successes}")
    z = z_quantile(confidence)
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))
