"""Drift statistics: per-feature baselines and the population stability index."""

from __future__ import annotations

import json

import numpy as np

from edgefleet.stats import feature_stats, histogram, psi


def test_feature_stats_per_feature_and_json_ready() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(0, 1, 1000), rng.normal(5, 2, 1000)], axis=1)
    s = feature_stats(x, bins=10)
    assert s["granularity"] == "feature" and s["features"] == 2 and s["samples"] == 1000
    assert abs(s["mean"][1] - 5) < 0.2 and abs(s["std"][1] - 2) < 0.2
    assert [sum(c) for c in s["counts"]] == [1000, 1000]
    json.dumps(s)


def test_large_tensors_are_summarised_as_one_feature() -> None:
    s = feature_stats(np.zeros((4, 32, 32, 3)), max_features=256)
    assert s["granularity"] == "tensor" and s["features"] == 1 and s["edges"][0][-1] > s["edges"][0][0]


def test_psi_is_zero_for_the_same_data_and_large_for_shifted_data() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(0, 1, 5000)
    edges = feature_stats(base[:, None])["edges"][0]
    expected = histogram(base, edges)
    assert psi(expected, histogram(rng.normal(0, 1, 5000), edges)) < 0.05
    assert psi(expected, histogram(rng.normal(2, 1, 5000), edges)) > 0.25  # values beyond the edges fold in
    assert psi([0, 0], [1, 2]) == 0.0
