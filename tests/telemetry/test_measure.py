"""What the agent measures per model version: latency histograms (merge, quantiles) against numpy,
class counts, the live-accuracy window against scikit-learn, ModelStats' snapshot and its fixed memory,
and the registry of versions served and retired."""

from __future__ import annotations

import os
import shutil
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import MODELS, digits_bundle
from sklearn.metrics import accuracy_score, precision_score, recall_score

from edgefleet.agent import load_model
from edgefleet.agent.metrics import BUCKETS, AgentMetrics
from edgefleet.agent.telemetry.measure import (
    BOUNDS,
    ClassCounts,
    LatencyHistogram,
    LiveAccuracy,
    ModelStats,
    TelemetryFormatError,
    TelemetryRegistry,
    classifier_output,
)
from edgefleet.stats import feature_stats

Array = np.ndarray[Any, Any]


def latencies(rng: np.random.Generator, n: int) -> Array:
    """Lognormal around 5 ms, spanning every bucket, the overflow one included, plus exact bounds."""
    x = rng.lognormal(np.log(0.005), 2.0, size=n)
    return np.concatenate([x, np.asarray(BOUNDS), [0.0, 7.5]])


def hist_of(values: Array) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values.tolist():
        h.add(v)
    return h


def test_bounds_are_the_agent_metrics_buckets_and_counts_follow_the_documented_rule() -> None:
    assert BOUNDS == BUCKETS and len(LatencyHistogram().counts) == len(BOUNDS) + 1
    x = latencies(np.random.default_rng(0), 5000)
    h = hist_of(x)
    b = np.asarray(BOUNDS)
    # counts[i]: BOUNDS[i-1] < x <= BOUNDS[i]; the last: x > BOUNDS[-1]
    want = [int(np.sum(x <= b[0]))]
    want += [int(np.sum((x > b[i - 1]) & (x <= b[i]))) for i in range(1, len(b))]
    want += [int(np.sum(x > b[-1]))]
    assert h.counts == want
    assert h.sum_s == pytest.approx(float(x.sum()), rel=1e-12)
    # the same buckets as the Prometheus histogram of /metrics
    m = AgentMetrics()
    for v in x.tolist():
        m.inference("m", v)
    assert [int(c) for c in m.snapshot()["histograms"]["m"][: len(BOUNDS) + 1]] == h.counts


def test_merge_of_two_histograms_is_exactly_the_histogram_of_the_union() -> None:
    rng = np.random.default_rng(1)
    a, b = latencies(rng, 3000), latencies(rng, 1700)
    merged = hist_of(a).merge(hist_of(b))
    union = hist_of(np.concatenate([a, b]))
    assert merged.counts == union.counts
    assert merged.count == a.size + b.size
    assert merged.sum_s == pytest.approx(union.sum_s, rel=1e-12)
    # and through the telemetry dict, as the server receives them
    again = LatencyHistogram.from_dict(hist_of(a).to_dict()).merge(LatencyHistogram.from_dict(hist_of(b).to_dict()))
    assert again.counts == union.counts


@pytest.mark.parametrize("q", [0.0, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_quantile_lies_in_the_bucket_of_the_exact_quantile_and_interpolates_within_it(q: float) -> None:
    rng = np.random.default_rng(2)
    x = rng.lognormal(np.log(0.003), 1.2, size=20001)
    h = hist_of(x)
    got = h.quantile(q)
    assert got is not None
    exact = float(np.quantile(x, q, method="inverted_cdf"))  # the ceil(q*n)-th smallest latency
    edges = np.concatenate([[0.0], BOUNDS])
    i = int(np.searchsorted(BOUNDS, exact, side="left"))
    if i == len(BOUNDS):
        assert got == BOUNDS[-1]
        return
    assert edges[i] <= got <= edges[i + 1]
    # the documented interpolation, recomputed with numpy from the counts
    counts = np.asarray(h.counts)
    cum = np.cumsum(counts)
    rank = q * x.size
    j = int(np.argmax((cum >= rank) & (counts > 0)))
    assert j == i
    before = cum[j] - counts[j]
    assert got == pytest.approx(edges[j] + (edges[j + 1] - edges[j]) * max(rank - before, 0) / counts[j], rel=1e-12)
    # and close to the truth: within the bucket's width
    assert abs(got - exact) <= edges[i + 1] - edges[i]


def test_quantiles_of_an_empty_histogram_are_null_and_overflow_answers_the_last_bound() -> None:
    h = LatencyHistogram()
    assert h.quantile(0.5) is None
    d = h.to_dict()
    assert d["p50_s"] is None and d["p95_s"] is None and d["p99_s"] is None and d["counts"] == [0] * 16
    h.add(9.0)
    assert h.quantile(0.99) == BOUNDS[-1]
    with pytest.raises(ValueError, match="quantile"):
        h.quantile(1.5)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "latency: expected an object"),
        ({"counts": [0] * 15, "sum_s": 0}, "latency.counts"),
        ({"counts": [0] * 15 + [-1], "sum_s": 0}, "latency.counts"),
        ({"counts": [0] * 15 + [1.5], "sum_s": 0}, "latency.counts"),
        ({"counts": [0] * 15 + [True], "sum_s": 0}, "latency.counts"),
        ({"counts": [0] * 16, "sum_s": "1"}, "latency.sum_s"),
        ({"counts": [0] * 16, "sum_s": float("inf")}, "latency.sum_s"),
        ({"counts": [0] * 16}, "latency.sum_s"),
    ],
)
def test_malformed_latency_dict_is_refused_naming_the_field(doc: Any, field: str) -> None:
    with pytest.raises(TelemetryFormatError) as e:
        LatencyHistogram.from_dict(doc)
    assert field in str(e.value)


def test_class_counts_are_the_top1_indices_of_vectors_and_batches() -> None:
    rng = np.random.default_rng(3)
    c = ClassCounts("scores")
    one = rng.random((500, 1, 10)).astype(np.float32)
    batch = rng.random((40, 8, 10)).astype(np.float32)
    for o in one:
        c.add({"scores": o})
    for o in batch:
        c.add({"scores": o})
    c.add({"scores": rng.random(10)})  # a bare [K] vector
    c.add({"other": rng.random((1, 10))})  # not the classifier output: ignored
    c.add({"scores": rng.random((1, 2, 10))})  # per-position classes: not counted
    flat = np.concatenate([one.reshape(-1, 10), batch.reshape(-1, 10)]).argmax(axis=1)
    want = np.bincount(flat, minlength=10)
    got = c.to_dict()
    assert sum(got.values()) == 500 + 320 + 1
    assert all(got.get(str(k), 0) >= int(v) for k, v in enumerate(want))
    assert sum(abs(got.get(str(k), 0) - int(v)) for k, v in enumerate(want)) == 1


def test_classifier_output_is_found_from_the_pipeline_labels_or_shape(tmp_path: Path) -> None:
    assert classifier_output(load_model(digits_bundle(tmp_path))) == "output_0"  # topk step in the pipeline
    assert classifier_output(load_model(MODELS / "digits_cnn_float.onnx")) == "logits"  # [N, 10] float scores
    assert classifier_output(load_model(MODELS / "digits_cnn_int8.tflite")) == "output_0"  # quantized scores
    assert classifier_output(load_model(MODELS / "multi_io.onnx")) is None  # several outputs, no labels
    assert classifier_output(load_model(MODELS / "segmenter_dense.onnx")) is None  # a mask, not a vector
    assert classifier_output(load_model(MODELS / "vad_if.onnx")) is None  # one probability


def test_live_accuracy_equals_sklearn_on_the_window_and_memory_is_fixed() -> None:
    rng = np.random.default_rng(4)
    true = rng.integers(0, 6, size=3000)
    pred = np.where(rng.random(3000) < 0.7, true, rng.integers(0, 6, size=3000))
    acc = LiveAccuracy(window=500)
    assert acc.summary() is None
    nbytes = acc._pred.nbytes + acc._true.nbytes
    for p, t in zip(pred.tolist(), true.tolist(), strict=True):
        acc.record(p, t)
    s = acc.summary()
    assert s is not None and s["window"] == 500 and acc.recorded == 3000
    assert acc._pred.nbytes + acc._true.nbytes == nbytes
    wp, wt = pred[-500:], true[-500:]
    assert s["accuracy"] == pytest.approx(accuracy_score(wt, wp), rel=1e-5)
    classes = sorted(set(wp.tolist()) | set(wt.tolist()))
    prec = precision_score(wt, wp, labels=classes, average=None, zero_division=0)
    rec = recall_score(wt, wp, labels=classes, average=None, zero_division=0)
    for c, pv, rv in zip(classes, prec, rec, strict=True):
        if (wp == c).any():
            assert s["precision"][str(c)] == pytest.approx(pv, rel=1e-5)
        else:
            assert str(c) not in s["precision"]
        if (wt == c).any():
            assert s["recall"][str(c)] == pytest.approx(rv, rel=1e-5)


def digits_stats(tmp_path: Path, holdout: Any, **kw: Any) -> tuple[ModelStats, Any, Array]:
    x, _ = holdout
    images = (x[:200].astype(np.float32) / 16.0)[:, None, :, :, None]
    model = load_model(digits_bundle(tmp_path))
    baseline = {"inputs": {model.inputs[0].name: feature_stats(images.reshape(200, -1))}}
    return ModelStats.from_model("digits", "1.0.0", model, baseline=baseline, **kw), model, images


def test_snapshot_is_the_models_entry_of_the_contract_and_reset_starts_a_new_interval(
    tmp_path: Path, holdout: Any
) -> None:
    stats, model, images = digits_stats(tmp_path, holdout, drift_interval_s=0)
    name = model.inputs[0].name
    outs = [model.predict({name: img}) for img in images[:50]]
    for img, out in zip(images[:50], outs, strict=True):
        stats.observe({name: img}, out, 0.002, True)
    stats.observe({name: images[0]}, None, 0.0, False)
    stats.accuracy.record(3, 3)
    snap = stats.snapshot()
    assert set(snap) == {"name", "version", "inferences", "errors", "latency", "drift", "classes", "accuracy"}
    assert (snap["name"], snap["version"], snap["inferences"], snap["errors"]) == ("digits", "1.0.0", 51, 1)
    assert sum(snap["latency"]["counts"]) == 50 and snap["latency"]["p50_s"] is not None
    want = np.bincount([int(o["output_0"].argmax()) for o in outs], minlength=10)
    assert snap["classes"] == {str(k): int(v) for k, v in enumerate(want) if v}
    assert snap["drift"]["samples"] == 50 and snap["drift"]["features"] == 64
    assert snap["accuracy"] == {"window": 1, "accuracy": 1.0, "precision": {"3": 1.0}, "recall": {"3": 1.0}}
    after = stats.snapshot()
    assert after["inferences"] == 0 and after["classes"] == {} and after["drift"] is None
    assert after["latency"]["counts"] == [0] * 16 and after["accuracy"] is not None  # the window stays


def test_drift_is_sampled_at_most_once_per_interval(tmp_path: Path, holdout: Any) -> None:
    now = [0.0]
    stats, model, images = digits_stats(tmp_path, holdout, drift_interval_s=0.05, clock=lambda: now[0])
    name = model.inputs[0].name
    for i in range(1000):  # 1000 calls over 1 s: 200 calls/s
        now[0] = i * 0.001
        stats.observe({name: images[i % 200]}, None, 0.001, True)
    assert stats.snapshot()["drift"]["samples"] == 20


def test_memory_of_model_stats_is_flat_over_100k_observations(tmp_path: Path, holdout: Any) -> None:
    now = [0.0]
    stats, model, images = digits_stats(tmp_path, holdout, drift_interval_s=0.005, clock=lambda: now[0])
    name = model.inputs[0].name
    outs = [model.predict({name: img}) for img in images[:64]]
    rng = np.random.default_rng(5)
    lat = rng.lognormal(np.log(0.002), 1.5, size=100_000).tolist()

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            now[0] = i * 0.001
            j = i % 64
            stats.observe({name: images[j]}, outs[j], lat[i], i % 97 != 0)
            if i % 400 == 0:
                stats.accuracy.record(i % 10, (i // 7) % 10)

    run(0, 10_000)  # warm: every structure at its full size
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        run(10_000, 100_000)
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    snap = stats.snapshot()
    assert snap["inferences"] == 100_000 and snap["drift"]["samples"] > 15_000
    print(f"\nModelStats: {after - before} bytes more after 90,000 more observations")
    assert after - before < 16 * 1024


def test_cost_of_observe_is_printed(tmp_path: Path, holdout: Any) -> None:
    """A micro-check, printed and never asserted: observe's cost per call at 200 calls/s."""
    stats, model, images = digits_stats(tmp_path, holdout)
    name = model.inputs[0].name
    feeds, out = {name: images[0]}, model.predict({name: images[0]})
    n = 20_000
    t0 = time.perf_counter()
    for _ in range(n):
        stats.observe(feeds, out, 0.001, True)
    plain = (time.perf_counter() - t0) / n
    every = ModelStats.from_model("digits", "1.0.0", model, baseline=None, drift_interval_s=0)
    every.drift = stats.drift
    t0 = time.perf_counter()
    for _ in range(2000):
        every.observe(feeds, out, 0.001, True)
    sampled = (time.perf_counter() - t0) / 2000
    print(
        f"\nobserve: {plain * 1e6:.1f} µs per call (drift sampled at most every 50 ms); "
        f"{sampled * 1e6:.1f} µs on a call that updates drift (64 features); at 200 calls/s with 20 samples/s: "
        f"{(180 * plain + 20 * sampled) * 100:.3f}% of one core"
    )


def test_concurrent_observers_lose_no_count(tmp_path: Path, holdout: Any) -> None:
    stats, model, images = digits_stats(tmp_path, holdout, drift_interval_s=0)
    name = model.inputs[0].name
    out = model.predict({name: images[0]})

    def work() -> None:
        for _ in range(5000):
            stats.observe({name: images[0]}, out, 0.0004, True)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap["inferences"] == 20_000 and sum(snap["latency"]["counts"]) == 20_000
    assert sum(snap["classes"].values()) == 20_000 and snap["drift"]["samples"] == 20_000


def test_registry_reports_served_versions_and_retired_ones_while_they_have_news() -> None:
    reg = TelemetryRegistry(keep_retired=2)
    a = reg.track(ModelStats("m", "1"))
    b = reg.track(ModelStats("m", "2"))
    a.observe({}, None, 0.001, True)
    assert [(e["version"], e["inferences"]) for e in reg.snapshot()] == [("1", 1), ("2", 0)]
    reg.retire("m", "1")
    assert [e["version"] for e in reg.snapshot()] == ["2"]  # retired, nothing new: left out
    a.accuracy.record(1, 1)  # late feedback on a prediction of version 1
    assert [e["version"] for e in reg.snapshot()] == ["1", "2"]
    assert reg.get("m", "1") is a
    reg.snapshot()
    reg.snapshot()
    assert reg.get("m", "1") is None and reg.get("m", "2") is b  # dropped after keep_retired idle snapshots
    c = reg.get_or_create("m", "1", labels=["x", "y"])
    assert c.class_index("y") == 1 and c.class_index(0) == 0 and c.class_index("z") is None
    assert reg.get_or_create("m", "1") is c


def test_registry_is_bounded_and_a_version_served_again_keeps_its_window(tmp_path: Path) -> None:
    reg = TelemetryRegistry(max_entries=3)
    model = load_model(digits_bundle(tmp_path))
    s1 = reg.track_model("digits", "1.0.0", model)
    s1.accuracy.record(2, 2)
    reg.retire("digits", "1.0.0")
    assert reg.track_model("digits", "1.0.0", model) is s1  # a rollback to it
    for v in range(10):
        reg.get_or_create("other", str(v))
    assert len(reg.all()) == 3 and reg.get("digits", "1.0.0") is s1  # only retired entries are evicted


def fake_proc(root: Path, utime: int, stime: int, rss_pages: int = 2560, total_kb: int = 1_000_000) -> Path:
    """A /proc with this process's stat (a command name holding ') ('), statm and meminfo."""
    (root / "self").mkdir(parents=True, exist_ok=True)
    rest = ["S", "1", "1", "1", "0", "-1", "4194304", "10", "0", "0", "0", str(utime), str(stime), "0", "0", "20"]
    (root / "self" / "stat").write_text(f"4242 (edge) (agent) {' '.join(rest)} 0 1 0 100\n")
    (root / "self" / "statm").write_text(f"9000 {rss_pages} 300 10 0 400 0\n")
    (root / "meminfo").write_text(f"MemTotal:       {total_kb} kB\nMemFree:          1000 kB\n")
    return root


def test_device_figures_from_a_proc_tree_and_a_thermal_zone(tmp_path: Path) -> None:
    from edgefleet.agent.hardware import load_profile
    from edgefleet.agent.telemetry.device import _PAGE, _TICKS, DeviceSampler

    proc = fake_proc(tmp_path / "proc", utime=100, stime=50)
    sysroot = tmp_path / "root"
    zone = sysroot / "sys/class/thermal/thermal_zone0/temp"
    zone.parent.mkdir(parents=True)
    zone.write_text("48500\n")
    now = [1000.0]
    s = DeviceSampler(
        tmp_path / "state" / "not-yet",
        load_profile("generic-x86_64"),
        started=990.0,
        proc=proc,
        root=sysroot,
        clock=lambda: now[0],
    )
    fake_proc(proc, utime=100 + _TICKS, stime=50 + _TICKS // 2)  # 1.5 CPU seconds more...
    now[0] = 1003.0  # ...over 3 s of wall time
    d = s.sample(queue_depth=7, dropped=2)
    assert d["cpu_percent"] == 50.0
    assert d["memory_rss_bytes"] == 2560 * _PAGE
    assert d["memory_percent"] == pytest.approx(round(2560 * _PAGE / 1_024_000_000 * 100, 3))
    assert d["temperature_c"] == 48.5 and d["uptime_s"] == 13.0
    assert (d["queue_depth"], d["dropped"]) == (7, 2) and d["agent_version"]
    assert d["disk_free_bytes"] == os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    zone.unlink()
    now[0] = 1003.0  # no time passed: no CPU figure rather than a division by zero
    d = s.sample()
    assert d["temperature_c"] is None and d["cpu_percent"] is None
    assert DeviceSampler(tmp_path, None, proc=proc).sample()["temperature_c"] is None


def test_device_figures_of_this_process_from_the_real_proc(tmp_path: Path) -> None:
    from edgefleet.agent.telemetry.device import DeviceSampler, process_cpu_seconds

    s = DeviceSampler(tmp_path)
    start = process_cpu_seconds()
    x = 0
    while process_cpu_seconds() - start < 0.05:  # burn CPU until the kernel has counted some
        x += sum(range(1000))
    d = s.sample()
    assert d["cpu_percent"] is not None and d["cpu_percent"] > 0
    status = Path("/proc/self/status").read_text()
    vmrss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
    assert abs(d["memory_rss_bytes"] - vmrss) < 0.2 * vmrss
    assert 0 < d["memory_percent"] < 100
    assert abs(d["disk_free_bytes"] - shutil.disk_usage(tmp_path).free) < 64 << 20
    assert d["uptime_s"] >= 0
