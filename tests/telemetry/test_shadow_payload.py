"""Shadow mode's runner and its telemetry block: real models from the updater's fixtures (one interface,
several behaviours) as served model and candidate, the served call path through ``ModelStats``, the
``shadow`` block of the ``models[]`` entry, and the server's wire model of it."""

from __future__ import annotations

import json
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent import load_model
from edgefleet.agent.runtime import Model
from edgefleet.agent.shadow import ServedSpec, ShadowRunner
from edgefleet.agent.telemetry.measure import ModelStats, TelemetryRegistry
from edgefleet.converters.package import package_model
from edgefleet.server.telemetry.payloads import Rejected, parse

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))
import make_update_models as models  # noqa: E402

Array = np.ndarray[Any, Any]


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _package(tmp: Path, onnx_bytes: bytes, version: str) -> Path:
    folder = tmp / f"pkg-{version}"
    folder.mkdir(parents=True)
    src = folder / "model.onnx"
    src.write_bytes(onnx_bytes)
    path, _ = package_model(src, models.MODEL_NAME, version, out=folder,
                            golden={"x": np.stack([models.sample_input(i) for i in range(4)])})
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("shadow-models")
    return {
        "served": models.bundle("good", "1.0.0", tmp / "served"),
        "same": _package(tmp, models.onnx_model("good", "1.0.0"), "1.0.1"),  # the same weights, another version
        "rotated": _package(tmp, models.onnx_model("good", "1.0.0", shift=1), "1.1.0"),  # each digit called the next
        "raises": models.bundle("errors_in_probation", "7.0.0", tmp / "raises"),
    }


@pytest.fixture(scope="module")
def loaded(bundles: dict[str, Path]) -> dict[str, Model]:
    return {k: load_model(p) for k, p in bundles.items()}


def _serve(served: Model, runner: ShadowRunner, n: int, clock: Clock, x: Any = None) -> list[Array]:
    """``n`` served calls through the real path (predict -> ModelStats.observe -> offer), one a second of
    the test's clock, each compared before the next (so none is skipped as busy)."""
    stats = ModelStats.from_model("digits", "1.0.0", served, baseline=False)
    stats.shadow = runner
    served.telemetry = stats
    out = []
    try:
        for i in range(n):
            clock.now += 1.0
            out.append(served.predict({"x": models.sample_input(i) if x is None else x})["probs"])
            assert runner.wait_idle(30)
    finally:
        served.telemetry = None
    return out


def test_an_identical_candidate_agrees_on_every_live_input_and_the_answers_are_the_served_models(
    loaded: dict[str, Model],
) -> None:
    clock = Clock()
    runner = ShadowRunner("digits", loaded["same"], "1.0.1", clock=clock).start()
    try:
        answers = _serve(loaded["served"], runner, 12, clock)
        block = runner.take()
    finally:
        runner.stop()
    assert block == {"version": "1.0.1", "compared": 12, "agreed": 12, "skipped": 0, "abs_error_sum": 0.0,
                     "errors": 0}
    for i, a in enumerate(answers):
        np.testing.assert_array_equal(a, loaded["served"].predict({"x": models.sample_input(i)})["probs"])
    assert runner.take()["compared"] == 0  # take() started a new interval


def test_a_different_candidate_disagrees_and_its_error_is_summed(loaded: dict[str, Model]) -> None:
    clock = Clock()
    runner = ShadowRunner("digits", loaded["rotated"], "1.1.0", clock=clock).start()
    try:
        _serve(loaded["served"], runner, 20, clock)
        block = runner.take()
    finally:
        runner.stop()
    assert block["compared"] == 20 and block["agreed"] <= 4, block  # rotated labels: almost never the same top-1
    assert block["abs_error_sum"] > 20 * 0.05 and block["errors"] == 0


def test_a_candidate_that_raises_is_a_disagreement_and_the_served_caller_never_sees_it(
    loaded: dict[str, Model],
) -> None:
    clock = Clock()
    runner = ShadowRunner("digits", loaded["raises"], "7.0.0", clock=clock).start()
    bad = models.failing_input()
    try:
        answers = _serve(loaded["served"], runner, 5, clock, x=bad)
        block = runner.take()
    finally:
        runner.stop()
    assert len(answers) == 5 and all(a.shape == (1, 10) for a in answers)
    assert (block["compared"], block["agreed"], block["errors"]) == (5, 0, 5)
    with pytest.raises(Exception, match="out of"):
        loaded["raises"].predict({"x": bad})  # the candidate does raise on this input


class Blocking:
    """A candidate whose runs wait until the test lets them go; counts its calls."""

    manifest = None

    def __init__(self) -> None:
        self.go = threading.Event()
        self.calls = 0

    def predict(self, feeds: dict[str, Array], dequantize_outputs: bool | None = None) -> dict[str, Array]:
        self.calls += 1
        self.go.wait(30)
        return {"probs": feeds["x"][:, :10].copy()}


def test_serving_never_waits_for_a_busy_candidate_and_at_most_queue_inputs_are_held() -> None:
    clock, cand = Clock(), Blocking()
    runner = ShadowRunner("digits", cand, "2.0.0", max_rate=1000.0, queue=2, clock=clock).start()  # type: ignore[arg-type]
    try:
        kept = []
        for i in range(50):  # the candidate is stuck in its first run: offers return anyway
            clock.now += 1.0
            x = models.sample_input(i)
            kept.append(runner.offer({"x": x}, {"probs": x[:, :10]}))
            assert runner.held <= 2
        assert sum(kept) == 2 and runner.skipped == 48
        cand.go.set()
        assert runner.wait_idle(30)
        block = runner.take()
    finally:
        runner.stop()
    assert (block["compared"], block["agreed"], block["skipped"]) == (2, 2, 48) and cand.calls == 2


def test_the_token_bucket_keeps_at_most_max_rate_inputs_a_second() -> None:
    clock, cand = Clock(), Blocking()
    cand.go.set()
    runner = ShadowRunner("digits", cand, "2.0.0", max_rate=5.0, queue=2, clock=clock).start()  # type: ignore[arg-type]
    x = models.sample_input(0)
    try:
        kept = 0
        for _ in range(200):  # 200 calls over 10 s of the test's clock
            clock.now += 0.05
            kept += runner.offer({"x": x}, {"probs": x[:, :10]})
            assert runner.wait_idle(30)
        block = runner.take()
    finally:
        runner.stop()
    assert 49 <= kept <= 52, kept  # 5 a second (plus the bucket's first tokens)
    assert block["compared"] == kept and block["skipped"] == 200 - kept
    off = ShadowRunner("digits", cand, "2.0.0", max_rate=0.0, clock=clock)  # type: ignore[arg-type]
    assert not off.offer({"x": x}, {"probs": x}) and off.take()["skipped"] == 1


class Dense:
    """A dense-output candidate: the served output plus ``delta``."""

    def __init__(self, delta: float, golden: tuple[float, float] | None = None) -> None:
        self.delta = delta
        self.manifest: Any = None
        if golden is not None:
            atol, rtol = golden
            self.manifest = type("M", (), {"golden": type("G", (), {"atol": atol, "rtol": rtol})()})()

    def predict(self, feeds: dict[str, Array], dequantize_outputs: bool | None = None) -> dict[str, Array]:
        return {"y": feeds["x"].reshape(1, 4, 4) + np.float32(self.delta)}


@pytest.mark.parametrize(("delta", "golden", "tolerance", "agrees"), [
    (0.0005, None, None, True),  # range of the served output 1.5: 1e-3 of it is 0.0015
    (0.005, None, None, False),
    (0.005, (0.01, 0.0), None, True),  # the candidate bundle's golden tolerance
    (0.005, (0.001, 0.0), None, False),
    (0.005, None, 0.01, True),  # the constructor's
])
def test_dense_outputs_agree_within_the_tolerance(delta: float, golden: Any, tolerance: Any, agrees: bool) -> None:
    clock = Clock()
    runner = ShadowRunner("depth", Dense(delta, golden), "2.0.0", tolerance=tolerance, clock=clock).start()  # type: ignore[arg-type]
    x = np.linspace(0, 1.5, 16, dtype=np.float32).reshape(1, 16)
    try:
        assert runner.offer({"x": x}, {"y": x.reshape(1, 4, 4)}, ServedSpec(first_output="y"))
        assert runner.wait_idle(30)
        block = runner.take()
    finally:
        runner.stop()
    assert (block["compared"], block["agreed"]) == (1, int(agrees))
    assert block["abs_error_sum"] == pytest.approx(delta, rel=1e-3)


def test_the_registry_moves_the_shadow_to_the_version_now_served_and_reports_it_in_its_entry(
    loaded: dict[str, Model],
) -> None:
    reg, clock = TelemetryRegistry(), Clock()
    reg.track_model("digits", "1.0.0", loaded["served"], baseline=False)
    runner = ShadowRunner("digits", loaded["same"], "1.0.1", clock=clock)
    assert reg.set_shadow("digits", runner) is None
    v1 = reg.get("digits", "1.0.0")
    assert v1 is not None and v1.shadow is runner
    reg.track_model("digits", "2.0.0", loaded["served"], baseline=False)  # a swap: the new version first...
    reg.retire("digits", "1.0.0")  # ...then the old one retired
    v2 = reg.get("digits", "2.0.0")
    assert v2 is not None and v2.shadow is runner and v1.shadow is None
    entries = {e["version"]: e for e in reg.snapshot()}
    assert entries["2.0.0"]["shadow"]["version"] == "1.0.1" and "shadow" not in entries.get("1.0.0", {})
    assert reg.clear_shadow("digits") is runner and v2.shadow is None
    assert all("shadow" not in e for e in reg.snapshot())


def _message(models_: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schema": 1, "device_id": "dev-00000000000000aa", "at": datetime.now(UTC).isoformat(),
                       "epoch": "0123456789abcdef", "seq": 1, "models": models_}).encode()


def test_the_servers_wire_model_takes_the_agents_shadow_block_and_bounds_it(loaded: dict[str, Model]) -> None:
    clock = Clock()
    runner = ShadowRunner("digits", loaded["rotated"], "1.1.0", clock=clock).start()
    try:
        _serve(loaded["served"], runner, 3, clock)
        stats = ModelStats.from_model("digits", "1.0.0", loaded["served"], baseline=False)
        stats.shadow = runner
        entry = stats.snapshot()
    finally:
        runner.stop()
    assert entry["shadow"]["compared"] == 3
    topic = "edgefleet/v1/dev-00000000000000aa/telemetry"
    got = parse(topic, _message([entry]), 1 << 20).body
    shadow = got.models[0].shadow  # type: ignore[union-attr]
    assert shadow is not None and (shadow.version, shadow.compared) == ("1.1.0", 3)
    assert shadow.abs_error_sum == pytest.approx(entry["shadow"]["abs_error_sum"])
    plain = {k: v for k, v in entry.items() if k != "shadow"}
    assert parse(topic, _message([plain]), 1 << 20).body.models[0].shadow is None  # type: ignore[union-attr]
    for bad in ({"agreed": 4}, {"version": "not a version!"}, {"compared": -1}, {"abs_error_sum": -1.0},
                {"compared": 10**16}):
        with pytest.raises(Rejected) as e:
            parse(topic, _message([{**plain, "shadow": {**entry["shadow"], **bad}}]), 1 << 20)
        assert e.value.reason == "invalid" and "shadow" in e.value.message
