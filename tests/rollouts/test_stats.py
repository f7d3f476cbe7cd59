"""The rollout gates' statistics: Mann–Whitney U, Hodges–Lehmann intervals, Wilson, ratio intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgefleet.server.rollouts import stats
from edgefleet.server.rollouts.stats import hodges_lehmann, mann_whitney, ratio_interval, wilson, z_quantile

try:
    import scipy.stats as sps  # type: ignore[import-untyped]
except ImportError:  # scipy is a test-only extra: fall back to the hand-worked values below
    sps = None

needs_scipy = pytest.mark.skipif(sps is None, reason="scipy not installed (hand-worked cases still run)")


# -- hand-worked values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "u", "p"),
    [
        pytest.param([1, 2], [3, 4], 0.0, 2 / 6, id="2v2-separated-exact"),  # 1 arrangement of C(4,2)=6, both tails
        pytest.param([3, 4], [1, 2], 4.0, 2 / 6, id="2v2-reversed-exact"),
        pytest.param([1, 3], [2, 4], 1.0, 4 / 6, id="2v2-interleaved-exact"),  # P(U<=1) = 2/6, doubled
        pytest.param([1, 2, 3], [4, 5, 6, 7], 0.0, 2 / 35, id="3v4-separated-exact"),  # C(7,3) = 35
        pytest.param([5, 5, 5], [5, 5, 5], 4.5, 1.0, id="all-tied"),
    ],
)
def test_mann_whitney_hand_worked(x: list[float], y: list[float], u: float, p: float) -> None:
    got_u, got_p = mann_whitney(x, y)
    assert got_u == pytest.approx(u) and got_p == pytest.approx(p)


def test_mann_whitney_normal_approximation_by_hand() -> None:
    # 1..10 vs 11..20, normal method: U = 0, mu = 50, sigma^2 = 100 * 21 / 12 = 175
    _, p = mann_whitney(range(1, 11), range(11, 21), method="normal")
    z = (50 - 0.5) / math.sqrt(175)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)))


def test_mann_whitney_exact_refuses_ties() -> None:
    with pytest.raises(ValueError, match="ties"):
        mann_whitney([1, 2, 2], [2, 3], method="exact")


@pytest.mark.parametrize("bad", [[], [float("nan")], [float("inf")]], ids=["empty", "nan", "inf"])
def test_bad_samples_raise(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        mann_whitney(bad, [1.0])
    with pytest.raises(ValueError):
        hodges_lehmann([1.0], bad)


def test_hodges_lehmann_hand_worked() -> None:
    # x - y differences of [10, 11, 12, 13, 14] vs [0, 1, 2, 3, 4]: 6..14, median 10
    # N = 25, k = floor(12.5 - 1.96 * sqrt(25 * 11 / 12)) = floor(3.117) = 3: d_(3) = 7, d_(23) = 13
    est, low, high = hodges_lehmann([10, 11, 12, 13, 14], [0, 1, 2, 3, 4], 0.95)
    assert (est, low, high) == (10.0, 7.0, 13.0)


def test_hodges_lehmann_too_small_for_the_confidence_is_unbounded() -> None:
    est, low, high = hodges_lehmann([1.0, 2.0], [0.0, 0.5], 0.95)
    assert est == pytest.approx(1.25) and low == -math.inf and high == math.inf


def test_hodges_lehmann_subsamples_large_inputs_deterministically() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.normal(1.0, 1.0, 1500), rng.normal(0.0, 1.0, 1000)  # 1.5e6 pairs > HL_MAX_PAIRS
    assert x.size * y.size > stats.HL_MAX_PAIRS
    first = hodges_lehmann(x, y)
    assert first == hodges_lehmann(x, y)
    est, low, high = first
    assert low < est < high and abs(est - 1.0) < 0.15 and high - low < 0.3


def test_wilson_hand_worked() -> None:
    p, low, high = wilson(0, 10, 0.95)
    assert p == 0 and low == 0 and high == pytest.approx(0.2775, abs=1e-4)
    p, low, high = wilson(95, 100, 0.95)
    assert p == 0.95 and low == pytest.approx(0.8882, abs=1e-4) and high == pytest.approx(0.9785, abs=1e-4)


@pytest.mark.parametrize(("s", "n"), [(1, 0), (-1, 5), (6, 5)], ids=["n0", "negative", "above-n"])
def test_wilson_bad_counts(s: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson(s, n)


def test_ratio_interval_of_a_doubled_latency() -> None:
    rng = np.random.default_rng(5)
    base = rng.lognormal(np.log(0.1), 0.1, 40)
    cand = rng.lognormal(np.log(0.2), 0.1, 12)
    est, low, high = ratio_interval(cand, base)
    assert 1.8 < low < est < high < 2.2


def test_ratio_interval_refuses_non_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([0.0, 1.0], [1.0, 2.0])


def test_z_quantile() -> None:
    assert z_quantile(0.95) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError):
        z_quantile(1.0)


# -- against scipy -------------------------------------------------------------------------------------


@needs_scipy
@pytest.mark.parametrize(
    ("n1", "n2", "ties"),
    [(3, 4, False), (8, 8, False), (20, 20, False), (1, 30, False), (30, 50, False), (15, 40, True), (200, 300, True)],
    ids=["3v4", "8v8", "20v20-exact-edge", "1v30", "30v50-normal", "ties-15v40", "ties-200v300"],
)
def test_mann_whitney_matches_scipy(n1: int, n2: int, ties: bool) -> None:
    rng = np.random.default_rng(n1 * 1000 + n2)
    x, y = rng.normal(0.4, 1, n1), rng.normal(0, 1, n2)
    if ties:
        x, y = np.round(x), np.round(y)
    method = "exact" if not ties and n1 * n2 <= stats.EXACT_MAX_PAIRS else "asymptotic"
    ref = sps.mannwhitneyu(x, y, alternative="two-sided", method=method, use_continuity=True)
    u, p = mann_whitney(x, y)
    assert u == pytest.approx(float(ref.statistic)) and p == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-12)


@needs_scipy
def test_wilson_matches_scipy() -> None:
    for k, n in [(0, 10), (3, 10), (50, 50), (980, 1000)]:
        ci = sps.binomtest(k, n).proportion_ci(0.95, method="wilson")
        _, low, high = wilson(k, n)
        assert low == pytest.approx(ci.low, abs=1e-12) and high == pytest.approx(ci.high, abs=1e-12)


@needs_scipy
def test_hodges_lehmann_interval_covers_the_true_shift() -> None:
    """Coverage check: about 95% of intervals over repeated samples contain the true shift."""
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(400):
        _, low, high = hodges_lehmann(rng.normal(0.5, 1, 25), rng.normal(0, 1, 30))
        hits += low <= 0.5 <= high
    assert 0.92 <= hits / 400 <= 0.985


# -- properties ----------------------------------------------------------------------------------------

_values = st.lists(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), min_size=1, max_size=40)
_positive = st.lists(st.floats(min_value=1e-6, max_value=1e6), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(_values, _values)
def test_mann_whitney_p_in_unit_interval_and_symmetric(x: list[float], y: list[float]) -> None:
    u1, p1 = mann_whitney(x, y)
    u2, p2 = mann_whitney(y, x)
    assert 0.0 <= p1 <= 1.0
    assert u1 + u2 == pytest.approx(len(x) * len(y))
    assert p1 == pytest.approx(p2)


@settings(max_examples=200, deadline=None)
@given(_values, _values, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_hodges_lehmann_interval_contains_estimate_and_is_antisymmetric(
    x: list[float], y: list[float], conf: float
) -> None:
    est, low, high = hodges_lehmann(x, y, conf)
    assert low <= est <= high
    est2, low2, high2 = hodges_lehmann(y, x, conf)
    assert est2 == pytest.approx(-est) and low2 == pytest.approx(-high) and high2 == pytest.approx(-low)


@settings(max_examples=200, deadline=None)
@given(_positive, _positive)
def test_ratio_interval_contains_estimate_and_inverts(x: list[float], y: list[float]) -> None:
    est, low, high = ratio_interval(x, y)
    assert 0 <= low <= est <= high
    est2, _, _ = ratio_interval(y, x)
    assert est * est2 == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 10_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))),
       st.sampled_from([0.5, 0.9, 0.95, 0.999]))
def test_wilson_contains_estimate(counts: tuple[int, int], conf: float) -> None:
    k, n = counts
    p, low, high = wilson(k, n, conf)
    assert 0.0 <= low <= p <= high <= 1.0
