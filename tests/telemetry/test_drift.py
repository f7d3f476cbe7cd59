"""Drift against a bundle's baseline: per-feature mean shift, std ratio and PSI equal numpy/scipy
references computed on the same samples; images by their pooled summary; bad baselines refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
from _support import MODELS

from edgefleet.agent import load_model
from edgefleet.agent.telemetry.drift import (
    PSI_EPS,
    STD_FLOOR,
    TENSOR_VALUES,
    DriftMeter,
    load_baseline,
    parse_baseline,
    psi_rows,
)
from edgefleet.agent.telemetry.measure import ModelStats
from edgefleet.converters.package import package_model
from edgefleet.errors import BundleError
from edgefleet.stats import feature_stats, histogram, psi

Array = np.ndarray[Any, Any]


def reference(train: Array, live: Array) -> dict[str, Array]:
    """Per feature, from the raw samples with numpy alone: the baseline's own edges (feature_stats'),
    live counts on them (outside values in the end bins), the PSI formula with the documented
    epsilon, and the shift and ratio in baseline std units with the documented floor."""
    base = feature_stats(train)
    edges = np.asarray(base["edges"])
    expected = np.asarray(base["counts"], dtype=np.float64)
    flat = live.reshape(live.shape[0], -1).astype(np.float64)
    if base["granularity"] == "tensor":
        flat = flat.reshape(-1, 1)
    actual = np.stack(
        [np.histogram(np.clip(flat[:, j], edges[j, 0], edges[j, -1]), bins=edges[j])[0] for j in range(flat.shape[1])]
    ).astype(np.float64)
    p = np.clip(expected / expected.sum(axis=1, keepdims=True), PSI_EPS, None)
    q = np.clip(actual / actual.sum(axis=1, keepdims=True), PSI_EPS, None)
    floor = STD_FLOOR * (edges[:, -1] - edges[:, 0])
    base_std = np.maximum(np.asarray(base["std"]), floor)
    live_std = flat.std(axis=0)
    return {
        "psi": np.sum((q - p) * np.log(q / p), axis=1),
        "mean_shift": np.abs(flat.mean(axis=0) - np.asarray(base["mean"])) / base_std,
        "std_ratio": np.maximum(live_std, floor) / base_std,
        "mean": flat.mean(axis=0),
        "std": live_std,
    }


def meter_for(train: Array) -> DriftMeter:
    return DriftMeter(parse_baseline({"inputs": {"x": feature_stats(train.reshape(train.shape[0], -1))}}))


@pytest.mark.parametrize("batch", [1, 7])
def test_feature_drift_equals_numpy_reference_on_a_shifted_distribution(batch: int) -> None:
    rng = np.random.default_rng(11)
    train = rng.normal(0.0, 1.0, size=(3000, 1, 24)).astype(np.float32)
    # shifted and widened on half the features; some values beyond the baseline's range
    live = rng.normal(0.0, 1.0, size=(700, 1, 24)) * np.r_[np.full(12, 3.0), np.ones(12)] + np.r_[np.ones(12), np.zeros(12)]
    live = live.astype(np.float32)
    meter = meter_for(train)
    rows = live.reshape(-1, batch, 24) if batch > 1 else live  # the same samples fed one or 7 at a time
    for feed in rows:
        meter.add({"x": feed})
    got = meter.inputs["x"].features()
    assert got is not None
    want = reference(train.reshape(3000, -1), live.reshape(700, -1))
    for key in ("psi", "mean_shift", "std_ratio", "mean", "std"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=key)
    # and the shared core's own one-feature functions agree, feature by feature
    base = feature_stats(train.reshape(3000, -1))
    for j in range(24):
        counts = histogram(live.reshape(700, -1)[:, j], base["edges"][j])
        assert psi(base["counts"][j], counts) == pytest.approx(float(got["psi"][j]), rel=1e-9)
    s = meter.summary()
    assert s is not None
    assert s["samples"] == 700 and s["features"] == 24 and s["granularity"] == "feature"
    assert s["psi_max"] == pytest.approx(want["psi"].max(), rel=1e-5)
    assert s["psi_mean"] == pytest.approx(want["psi"].mean(), rel=1e-5)
    assert s["mean_shift_max"] == pytest.approx(want["mean_shift"].max(), rel=1e-5)
    ratio = want["std_ratio"]
    assert s["std_ratio_max"] == pytest.approx(np.maximum(ratio, 1 / ratio).max(), rel=1e-5)
    assert s["psi_max"] > 0.25 and s["mean_shift_max"] > 0.8 and s["std_ratio_max"] > 2.5  # drift shows


def test_psi_is_scipy_symmetric_kl_when_no_bin_is_empty() -> None:
    rng = np.random.default_rng(3)
    expected = rng.integers(5, 200, size=(40, 10)).astype(np.float64)
    actual = rng.integers(5, 200, size=(40, 10)).astype(np.float64)
    got = psi_rows(expected, actual)
    # PSI = KL(q || p) + KL(p || q); scipy.stats.entropy normalises the counts itself
    want = [scipy.stats.entropy(a, e) + scipy.stats.entropy(e, a) for e, a in zip(expected, actual, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert psi_rows(expected, expected).max() == pytest.approx(0.0, abs=1e-12)


def test_same_distribution_gives_no_drift_and_a_std_ratio_near_one() -> None:
    rng = np.random.default_rng(5)
    train = rng.uniform(-2, 5, size=(5000, 1, 8))
    meter = meter_for(train)
    for feed in rng.uniform(-2, 5, size=(5000, 1, 8)):
        meter.add({"x": feed})
    s = meter.summary()
    assert s is not None
    assert s["psi_max"] < 0.02 and s["mean_shift_max"] < 0.1 and s["std_ratio_max"] < 1.05
    # means and stds of the accumulated samples equal scipy's description of them
    live = rng.uniform(-2, 5, size=(300, 8))
    m2 = meter_for(train)
    for row in live:
        m2.add({"x": row[None]})
    f = m2.inputs["x"].features()
    assert f is not None
    d = scipy.stats.describe(live, axis=0, ddof=0)
    np.testing.assert_allclose(f["mean"], d.mean, rtol=1e-12)
    np.testing.assert_allclose(f["std"] ** 2, d.variance, rtol=1e-9)


def test_a_feature_constant_in_training_gives_a_large_finite_shift_and_unit_ratio_when_still_constant() -> None:
    train = np.zeros((100, 1, 3))
    train[:, 0, 2] = np.arange(100)  # features 0 and 1 constant (0), feature 2 varies
    meter = meter_for(train)
    for i in range(50):
        meter.add({"x": np.array([[0.0, 0.5, float(i)]])})
    f = meter.inputs["x"].features()
    assert f is not None
    assert f["mean_shift"][0] == 0.0 and f["std_ratio"][0] == 1.0  # still constant: no drift
    assert f["mean_shift"][1] == pytest.approx(0.5 / STD_FLOOR)  # the constant's range is 1: floor 1e-3
    assert np.isfinite(f["psi"]).all() and f["psi"][1] > 1.0


def test_image_input_uses_pooled_tensor_summary_on_a_fixed_subset() -> None:
    rng = np.random.default_rng(7)
    train = rng.integers(0, 200, size=(40, 1, 64, 64, 3)).astype(np.float32)
    base = feature_stats(train.reshape(40, -1))
    assert base["granularity"] == "tensor"
    meter = DriftMeter(parse_baseline({"inputs": {"image": base}}))
    acc = meter.inputs["image"]
    brighter = np.clip(rng.integers(0, 200, size=(30, 1, 64, 64, 3)) + 60, 0, 255).astype(np.float32)
    for img in brighter:
        meter.add({"image": img})
    s = meter.summary()
    assert s is not None
    assert s["granularity"] == "tensor" and s["features"] == 1 and s["samples"] == 30
    assert acc.values == 30 * TENSOR_VALUES  # a fixed subset of each frame, never all of it
    assert acc._positions is not None
    taken = np.stack([img.reshape(-1)[acc._positions[1]] for img in brighter])  # the same positions each time
    want = reference(train.reshape(40, -1), taken)
    f = acc.features()
    assert f is not None
    np.testing.assert_allclose(f["psi"], want["psi"], rtol=1e-9)
    np.testing.assert_allclose(f["mean_shift"], want["mean_shift"], rtol=1e-9)
    assert s["psi_max"] > 0.25 and s["mean_shift_max"] > 0.5
    # the subset is an unbiased view of the frame: its mean is within a few std errors of the full frame's
    full = brighter.reshape(30, -1)
    assert abs(float(f["mean"][0]) - float(full.mean())) < 5 * full.std() / np.sqrt(taken.size)


def test_nan_samples_and_wrong_sizes_are_skipped_and_memory_is_fixed() -> None:
    meter = meter_for(np.random.default_rng(1).normal(size=(100, 1, 4)))
    acc = meter.inputs["x"]
    sizes = (acc.sums.nbytes, acc.squares.nbytes, acc.counts.nbytes)
    meter.add({"x": np.array([[np.nan, 0, 0, 0]])})
    meter.add({"x": np.zeros((1, 5))})
    meter.add({"other": np.zeros((1, 4))})
    assert acc.samples == 0 and acc.skipped == 2 and meter.summary() is None
    for _ in range(1000):
        meter.add({"x": np.ones((3, 4))})
    assert acc.samples == 3000 and (acc.sums.nbytes, acc.squares.nbytes, acc.counts.nbytes) == sizes
    meter.reset()
    assert meter.summary() is None


def test_quantized_integer_feeds_are_dequantized_before_comparison() -> None:
    rng = np.random.default_rng(2)
    train = rng.uniform(0, 1, size=(500, 1, 6))
    base = parse_baseline({"inputs": {"x": feature_stats(train.reshape(500, -1))}})
    scale, zp = 1 / 255, -128
    live = rng.uniform(0, 1, size=(400, 1, 6))
    q = np.clip(np.round(live / scale) + zp, -128, 127).astype(np.int8)
    meter = DriftMeter(base, {"x": (scale, zp)})
    for feed in q:
        meter.add({"x": feed})
    s = meter.summary()
    assert s is not None and s["psi_max"] < 0.1 and s["mean_shift_max"] < 0.2  # same distribution, in real units


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d.update(granularity="pixels"), "inputs.x.granularity"),
        (lambda d: d.update(mean=[0.0]), "inputs.x: mean, std, edges and counts"),
        (lambda d: d["edges"][0].reverse(), "inputs.x.edges"),
        (lambda d: d.update(std=["a"] * 3), "inputs.x.std"),
        (lambda d: d["counts"][1].pop(), "inputs.x.counts"),
        (lambda d: d.update(mean=[float("nan")] * 3), "inputs.x.mean"),
    ],
)
def test_malformed_baseline_is_refused_naming_the_field(mutate: Any, field: str) -> None:
    d = feature_stats(np.random.default_rng(0).normal(size=(50, 3)))
    mutate(d)
    with pytest.raises(BundleError) as e:
        parse_baseline({"inputs": {"x": d}})
    assert field in str(e.value)


def test_baseline_is_read_from_the_bundle_and_drives_model_stats(tmp_path: Path, holdout: Any) -> None:
    x, _ = holdout
    images = (x[:300].astype(np.float32) / 16.0)[:, None, :, :, None]  # (N, 1, 8, 8, 1): the TFLite input
    path, manifest = package_model(
        MODELS / "digits_cnn_float.tflite", "digits", "1.0.0", out=tmp_path, baseline={"image": images}
    )
    assert manifest.baseline is not None
    base = load_baseline(path)
    assert base is not None and base["image"].features == 64 and base["image"].granularity == "feature"
    assert load_baseline(MODELS / "digits_cnn_float.tflite") is None
    model = load_model(path)
    stats = ModelStats.from_model("digits", "1.0.0", model, drift_interval_s=0)
    name = model.inputs[0].name
    for img in images[:100]:
        stats.observe({name: img}, model.predict({name: img}), 0.001, True)
    same = stats.snapshot()["drift"]
    for img in images[:100]:
        inverted = (1.0 - img).astype(np.float32)
        stats.observe({name: inverted}, None, 0.001, True)
    moved = stats.snapshot()["drift"]
    assert same["samples"] == 100 and moved["samples"] == 100
    assert same["psi_max"] < moved["psi_max"] and moved["mean_shift_max"] > 1.0
