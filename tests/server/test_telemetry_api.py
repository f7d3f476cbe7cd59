"""The telemetry API over what was really published through a real Mosquitto, on SQLite and PostgreSQL:
``/api/v1/models/{name}/{version}/telemetry`` and ``/api/v1/devices/{id}/telemetry`` return, for any
step, exactly what numpy computes from the published messages (histogram counts summed, percentiles
from the merged histogram, drift maxima and sample-weighted PSI mean, class counts, window-weighted
accuracy, devices per step), the fleet aggregates in /metrics agree, and bad parameters are one
JSON error naming the parameter."""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import wait_until
from _telemetry import (
    Broker,
    Ingesting,
    broker,
    dumps,
    ingest_settings,
    ingesting,
    model_figures,
    publisher,
    stamp,
    telemetry,
    telemetry_topic,
)

from edgefleet.server.telemetry.payloads import BOUNDS
from edgefleet.server.telemetry.rollups import quantile

__all__ = ["broker"]  # the fixture, imported for pytest

DEVICES = ["api-0", "api-1", "api-2", "api-3"]
VERSIONS = ["1.0.0", "2.0.0"]
WINDOWS = 7  # minutes of telemetry per device


@dataclass
class Published:
    """One model block as published: who, when, which version, and the raw figures behind it."""

    device: str
    at: datetime
    version: str
    latencies: np.ndarray[Any, Any]
    errors: int
    classes: dict[str, int]
    drift: dict[str, Any] | None
    accuracy: dict[str, Any] | None
    cpu: float


def np_counts(latencies: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The agent's binning, in numpy: index i holds latencies in (BOUNDS[i-1], BOUNDS[i]]."""
    return np.bincount(np.searchsorted(np.asarray(BOUNDS), latencies, side="left"), minlength=len(BOUNDS) + 1)


def np_quantile(counts: np.ndarray[Any, Any], q: float) -> float | None:
    """Linear interpolation inside the bucket holding rank q*total (histogram_quantile), in numpy."""
    total = counts.sum()
    if total == 0:
        return None
    cum = np.cumsum(counts)
    rank = q * total
    i = int(np.searchsorted(cum, rank, side="left"))
    if i >= len(BOUNDS):
        return float(BOUNDS[-1])
    lo = 0.0 if i == 0 else BOUNDS[i - 1]
    before = 0.0 if i == 0 else float(cum[i - 1])
    return float(lo + (BOUNDS[i] - lo) * (rank - before) / counts[i])


def _make(rng: np.random.Generator, start: datetime) -> list[Published]:
    out: list[Published] = []
    for d_i, device in enumerate(DEVICES):
        for w in range(WINDOWS):
            at = start + timedelta(minutes=w, seconds=int(rng.integers(0, 60)))
            versions = VERSIONS if d_i % 2 == 0 else VERSIONS[:1]  # half the devices run both versions
            for version in versions:
                lat = rng.lognormal(mean=-5.0 + 0.5 * d_i, sigma=1.2, size=int(rng.integers(0, 120)))
                drift = None if rng.random() < 0.3 else {
                    "samples": int(rng.integers(1, 200)), "features": 64, "psi_max": float(rng.random()),
                    "psi_mean": float(rng.random() / 2), "mean_shift_max": float(rng.random() * 3),
                    "std_ratio_max": float(0.5 + rng.random()), "granularity": "feature"}
                accuracy = None if rng.random() < 0.4 else {
                    "window": int(rng.integers(1, 500)), "accuracy": float(rng.random()),
                    "precision": {"3": 0.5}, "recall": {"3": 0.5}}
                classes = {str(c): int(rng.integers(0, 30)) for c in rng.choice(10, size=3, replace=False)}
                out.append(Published(device, at, version, lat, int(rng.integers(0, 5)), classes, drift, accuracy,
                                     float(rng.random() * 100)))
    return out


def _messages(published: list[Published]) -> list[tuple[str, str]]:
    by_msg: dict[tuple[str, datetime], list[Published]] = defaultdict(list)
    for p in published:
        by_msg[(p.device, p.at)].append(p)
    seqs: dict[str, int] = defaultdict(int)
    out = []
    for (device, at), ps in sorted(by_msg.items()):
        seqs[device] += 1
        models = [model_figures("digits", p.version, [float(x) for x in p.latencies], p.errors, p.classes,
                                p.drift, p.accuracy) for p in ps]
        out.append((telemetry_topic(device), dumps(telemetry(device, seqs[device], at=at, models=models,
                                                             cpu_percent=ps[0].cpu))))
    return out


def _expected_point(ps: list[Published]) -> dict[str, Any]:
    """What the API must answer for the blocks ``ps`` merged into one point, from numpy."""
    lat = np.concatenate([p.latencies for p in ps])
    counts = np.sum([np_counts(p.latencies) for p in ps], axis=0)
    assert (counts == np_counts(lat)).all()  # the merge is exact: the histogram of every call at once
    drifts = [p.drift for p in ps if p.drift is not None]
    accs = [p.accuracy for p in ps if p.accuracy is not None]
    classes: dict[str, int] = defaultdict(int)
    for p in ps:
        for k, v in p.classes.items():
            classes[k] += v
    samples = np.array([d["samples"] for d in drifts])
    windows = np.array([a["window"] for a in accs])
    return {
        "inferences": int(lat.size), "errors": sum(p.errors for p in ps), "counts": counts.tolist(),
        "sum_s": float(lat.sum()), "p50_s": np_quantile(counts, 0.5), "p95_s": np_quantile(counts, 0.95),
        "p99_s": np_quantile(counts, 0.99),
        "drift": None if not drifts else {
            "reports": len(drifts), "samples": int(samples.sum()),
            "psi_max": float(np.max([d["psi_max"] for d in drifts])),
            "psi_mean": float(np.dot([d["psi_mean"] for d in drifts], samples) / samples.sum()),
            "mean_shift_max": float(np.max([d["mean_shift_max"] for d in drifts])),
            "std_ratio_max": float(np.max([d["std_ratio_max"] for d in drifts]))},
        "accuracy": None if not accs else {
            "window": int(windows.sum()),
            "accuracy": float(np.dot([a["accuracy"] for a in accs], windows) / windows.sum())},
        "classes": {k: v for k, v in classes.items()},
        "devices": len({p.device for p in ps}),
    }


def _check_point(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["inferences"] == want["inferences"] and got["errors"] == want["errors"]
    assert got["latency"]["counts"] == want["counts"]
    assert got["latency"]["sum_s"] == pytest.approx(want["sum_s"], rel=1e-9)
    for q in ("p50_s", "p95_s", "p99_s"):
        if want[q] is None:
            assert got["latency"][q] is None
        else:
            assert got["latency"][q] == pytest.approx(want[q], rel=1e-9), q
    calls = want["inferences"]  # failed calls are among them
    assert got["error_rate"] == (pytest.approx(want["errors"] / calls) if calls else None)
    if want["drift"] is None:
        assert got["drift"] is None
    else:
        assert got["drift"] == pytest.approx(want["drift"], rel=1e-9)
    if want["accuracy"] is None:
        assert got["accuracy"] is None
    else:
        assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-9)
    assert {k: v for k, v in got["classes"].items() if v} == {k: v for k, v in want["classes"].items() if v}


@dataclass
class Scenario:
    ing: Ingesting
    published: list[Published]
    start: datetime


@pytest.fixture
def scenario(clean_db: str, tmp_path: Path, broker: Broker) -> Iterator[Scenario]:
    rng = np.random.default_rng(20261201)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    start = now - timedelta(minutes=30)
    start -= timedelta(seconds=int(start.timestamp()) % 300)  # on a 5-minute boundary
    published = _make(rng, start)
    messages = _messages(published)
    with ingesting(ingest_settings(clean_db, tmp_path / "data", broker.url)) as ing:
        ing.add_devices(*DEVICES)
        with publisher(broker.port) as pub:
            pub.send(messages)
        assert wait_until(lambda: ing.stored() == len(messages) and ing.sample("edgefleet_telemetry_pending") == 0,
                          30)
        yield Scenario(ing, published, start)


def _group(ps: list[Published], step: int) -> dict[int, list[Published]]:
    out: dict[int, list[Published]] = defaultdict(list)
    for p in ps:
        ts = int(p.at.timestamp())
        out[ts - ts % step].append(p)
    return dict(sorted(out.items()))


@pytest.mark.parametrize("step", [60, 120, 300])
def test_model_route_equals_numpy_over_what_was_published(scenario: Scenario, step: int) -> None:
    ing = scenario.ing
    for version in VERSIONS:
        r = ing.client.get(f"/api/v1/models/digits/{version}/telemetry",
                           params={"since": stamp(scenario.start), "step": step}, headers=ing.admin_h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["bounds"] == list(BOUNDS) and body["step"] == step and body["window"] == 60
        want = _group([p for p in scenario.published if p.version == version], step)
        assert [p["t"] for p in body["points"]] == list(want)
        for got, ps in zip(body["points"], want.values(), strict=True):
            expected = _expected_point(ps)
            _check_point(got, expected)
            assert got["devices"] == expected["devices"]
            assert got["reports"] == len(ps)


def test_device_route_equals_numpy_and_shows_its_stream(scenario: Scenario) -> None:
    ing = scenario.ing
    device = DEVICES[2]  # runs both versions
    r = ing.client.get(f"/api/v1/devices/{device}/telemetry",
                       params={"since": "3600", "step": 120}, headers=ing.admin_h)
    assert r.status_code == 200, r.text
    body = r.json()
    mine = [p for p in scenario.published if p.device == device]
    assert [(s["model"], s["version"]) for s in body["series"]] == [("digits", v) for v in VERSIONS]
    for series in body["series"]:
        want = _group([p for p in mine if p.version == series["version"]], 120)
        assert [p["t"] for p in series["points"]] == list(want)
        for got, ps in zip(series["points"], want.values(), strict=True):
            _check_point(got, _expected_point(ps))
    # the device block: one report per message; CPU mean and max per step from what was sent
    per_msg: dict[datetime, float] = {}
    for p in mine:
        per_msg.setdefault(p.at, p.cpu)  # a message carries its first block's CPU figure (see _messages)
    cpu: dict[int, list[float]] = defaultdict(list)
    for at, c in per_msg.items():
        ts = int(at.timestamp())
        cpu[ts - ts % 120].append(c)
    assert [p["t"] for p in body["device"]] == sorted(cpu)
    for point in body["device"]:
        values = np.array(cpu[point["t"]])
        assert point["reports"] == values.size
        assert point["cpu_percent_mean"] == pytest.approx(values.mean(), rel=1e-9)
        assert point["cpu_percent_max"] == pytest.approx(values.max())
        assert point["memory_rss_bytes_max"] == 50 << 20 and point["disk_free_bytes_min"] == 1 << 30
    [stream] = body["streams"]
    assert (stream["contiguous_seq"], stream["max_seq"], stream["received"], stream["missing"]) == (
        WINDOWS, WINDOWS, WINDOWS, 0)


def test_fleet_aggregates_in_metrics_agree_with_what_was_published(scenario: Scenario) -> None:
    ing = scenario.ing
    text = ing.client.get("/metrics").text
    assert "edgefleet_telemetry_rejected_total" in text and "edgefleet_fleet_devices_reporting" in text
    for version in VERSIONS:
        ps = [p for p in scenario.published if p.version == version]
        labels = {"model": "digits", "version": version}
        assert ing.sample("edgefleet_fleet_inferences_total", labels) == sum(p.latencies.size for p in ps)
        assert ing.sample("edgefleet_fleet_inference_errors_total", labels) == sum(p.errors for p in ps)
    assert ing.sample("edgefleet_fleet_devices_reporting") == len(DEVICES)  # all arrived within the online window


def test_bad_parameters_are_one_json_error_naming_the_parameter(scenario: Scenario) -> None:
    ing = scenario.ing
    cases = [
        ("/api/v1/models/digits/1.0.0/telemetry", {"step": 90}, 422, "query.step"),
        ("/api/v1/models/digits/1.0.0/telemetry", {"step": 30}, 422, "query.step"),
        ("/api/v1/models/digits/1.0.0/telemetry", {"step": 60, "since": "172800"}, 422, "query.step"),
        ("/api/v1/models/digits/1.0.0/telemetry", {"since": "yesterday"}, 422, "query.since"),
        ("/api/v1/models/digits/1.0.0/telemetry", {"until": "2026-12-01T10:00:00"}, 422, "query.until"),
        ("/api/v1/devices/api-0/telemetry", {"since": "2999-01-01T00:00:00Z"}, 422, "query.since"),
        ("/api/v1/devices/api-0/telemetry", {"since": "0001-01-01T00:00:00+14:00"}, 422, "query.since"),
        ("/api/v1/devices/nobody/telemetry", {}, 404, "device_id"),
        ("/api/v1/devices/NOT_AN_ID/telemetry", {}, 422, "path.device_id"),
        ("/api/v1/models/NOT A NAME/1.0.0/telemetry", {}, 422, "path.name"),
    ]
    for path, params, status, field in cases:
        r = ing.client.get(path, params=params, headers=ing.admin_h)
        assert r.status_code == status, (path, params, r.text)
        assert r.json()["field"] == field and r.json()["error"].startswith(field), r.text
    assert ing.client.get("/api/v1/devices/api-0/telemetry").status_code == 401
    r = ing.client.post("/api/v1/tokens", json={"name": "watcher", "role": "viewer"}, headers=ing.admin_h)
    viewer = {"Authorization": f"Bearer {r.json()['token']}"}
    assert ing.client.get("/api/v1/devices/api-0/telemetry", headers=viewer).status_code == 200
    assert ing.client.get("/api/v1/models/digits/1.0.0/telemetry", headers=viewer).status_code == 200


def test_quantile_of_a_histogram_equals_the_numpy_reference() -> None:
    rng = np.random.default_rng(5)
    for _ in range(300):
        lat = rng.lognormal(mean=rng.uniform(-9, 2), sigma=rng.uniform(0.1, 3), size=int(rng.integers(0, 400)))
        counts = np_counts(lat)
        for q in (0.01, 0.5, 0.9, 0.95, 0.99, 1.0):
            want = np_quantile(counts, q)
            got = quantile(counts.tolist(), q)
            assert got is None if want is None else got == pytest.approx(want, rel=1e-12)
        if lat.size:  # the interpolated quantile lies in the bucket of the exact one
            exact = float(np.quantile(lat, 0.5, method="inverted_cdf"))
            i = bisect.bisect_left(BOUNDS, exact)
            lo, hi = (0.0 if i == 0 else BOUNDS[i - 1]), (BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1])
            median = quantile(counts.tolist(), 0.5)
            assert median is not None and lo * (1 - 1e-12) <= median <= hi * (1 + 1e-12)
