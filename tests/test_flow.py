"""Flows: the bounded queue between a source and the model, its drop policies and counters, per-item
pipeline look-up (hot swap) and errors that do not stop a flow."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _support import CollectSink
from pydantic import ValidationError

from edgefleet.agent.flow import Flow, FlowConfig
from edgefleet.agent.sources import Item


class PushSource:
    """A live source the test drives by hand; like MQTT it cannot wait."""

    name = "push"
    can_wait = False

    def __init__(self) -> None:
        self.ended = threading.Event()
        self.emit: Callable[[Item], None] | None = None

    def start(self, emit: Callable[[Item], None]) -> None:
        self.emit = emit

    def stop(self) -> None:
        self.ended.set()

    def counters(self) -> dict[str, int]:
        return {}

    def push(self, i: int, acks: dict[int, str] | None = None) -> None:
        assert self.emit is not None
        ack = None if acks is None else (lambda outcome: acks.__setitem__(i, outcome))
        self.emit(Item(np.array([i]), {"source": self.name, "i": i}, ack=ack))


class GatePipeline:
    """Holds every call until released; tells when the first call has begun."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, data: Any, raw_outputs: Any = None) -> dict[str, Any]:
        self.entered.set()
        assert self.release.wait(10)
        return {"model": "gate", "value": int(data[0])}


def push_flow(run: Callable[[], Any], **cfg: Any) -> tuple[Flow, PushSource, CollectSink]:
    config = FlowConfig.model_validate(
        {"model": "m", "source": {"type": "stdin"}, "sinks": [{"type": "stdout"}], **cfg}
    )
    src, sink = PushSource(), CollectSink()
    return Flow(config, run, source=src, sinks=[sink]), src, sink


# -- back-pressure and errors -------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "kept"), [("oldest", [0, 8, 9]), ("newest", [0, 1, 2])])
def test_full_queue_drops_by_policy_and_counts_it(policy: str, kept: list[int]) -> None:
    gate = GatePipeline()
    flow, src, sink = push_flow(lambda: gate, queue_size=2, drop=policy)
    acks: dict[int, str] = {}
    flow.start()
    try:
        src.push(0, acks)
        assert gate.entered.wait(10)  # item 0 is in the model; the queue is empty
        for i in range(1, 10):
            src.push(i, acks)
        assert flow.counters()["dropped_queue_full"] == 7
        assert flow.counters()["queued"] == 2
        gate.release.set()
        src.ended.set()
        assert flow.join(timeout=10)
    finally:
        flow.stop()
    assert [r["value"] for r in sink.take(3)] == kept
    assert sorted(i for i, o in acks.items() if o == "dropped") == sorted(set(range(10)) - set(kept))
    c = flow.counters()
    assert (c["received"], c["processed"], c["errors"]) == (10, 3, 0)


def test_pipeline_is_fetched_per_item_and_a_failing_item_does_not_stop_the_flow() -> None:
    class Doubler:
        def __init__(self, name: str) -> None:
            self.name = name

        def run(self, data: Any, raw_outputs: Any = None) -> dict[str, Any]:
            if int(data[0]) == 1:
                raise ValueError("cannot take a one")
            return {"model": self.name, "value": int(data[0]) * 2}

    current = [Doubler("v1")]
    flow, src, sink = push_flow(lambda: current[0], send_errors=True)
    flow.start()
    try:
        src.push(0)
        src.push(1)
        first = sink.take(2)
        current[0] = Doubler("v2")  # hot swap: the next item uses the new model
        src.push(2)
        second = sink.take(1)
    finally:
        flow.stop()
    assert first[0]["model"] == "v1" and first[0]["value"] == 0
    assert "cannot take a one" in first[1]["error"] and first[1]["meta"]["i"] == 1
    assert second[0] == {**second[0], "model": "v2", "value": 4}
    assert {"latency_ms", "inference_ms", "finished_at", "flow"} <= set(second[0]["meta"])
    assert flow.counters()["errors"] == 1 and flow.counters()["processed"] == 2


def test_flow_config_errors_name_the_field() -> None:
    with pytest.raises(ValidationError, match="kamera"):
        FlowConfig.model_validate({"model": "m", "source": {"type": "kamera"}, "sinks": [{"type": "stdout"}]})
    with pytest.raises(ValidationError, match="sinks"):
        FlowConfig.model_validate({"model": "m", "source": {"type": "stdin"}, "sinks": []})
    cfg = FlowConfig.model_validate({"model": "m", "source": {"type": "stdin"}, "sinks": [{"type": "stdout"}]})
    assert (cfg.name, cfg.queue_size, cfg.drop) == ("stdin-m", 16, "oldest")


@pytest.mark.parametrize(("raw", "has_outputs"), [(None, False), (True, True), (["output_0"], True)])
def test_flow_results_carry_raw_outputs_only_when_asked(tmp_path: Any, raw: Any, has_outputs: bool) -> None:
    """A detector's raw outputs are hundreds of KB per result: flows send them only when configured."""
    from _support import digits_bundle

    from edgefleet.agent.pipeline import Pipeline
    from edgefleet.agent.runtime import load_model

    pipeline = Pipeline(load_model(digits_bundle(tmp_path)))
    flow, src, sink = push_flow(lambda: pipeline, raw_outputs=raw)
    flow.start()
    try:
        assert src.emit is not None
        src.emit(Item(np.full((8, 8), 8, np.uint8), {"source": "push", "i": 0}))
        (result,) = sink.take(1)
    finally:
        flow.stop()
    assert "top_k" in result, result
    assert ("outputs" in result) is has_outputs
    if has_outputs:
        assert len(result["outputs"]["output_0"][0]) == 10


def test_held_items_are_queued_past_the_queue_size_and_never_dropped_by_the_policy() -> None:
    """Items the source holds upstream (MQTT QoS 1 before its ack) wait in the flow whatever its
    size; only the others go by the drop policy."""
    gate = GatePipeline()
    flow, src, sink = push_flow(lambda: gate, queue_size=2, drop="oldest")
    acks: dict[int, str] = {}
    flow.start()
    try:
        assert src.emit is not None
        src.emit(Item(np.array([0]), {"i": 0}, held=True))
        assert gate.entered.wait(10)
        for i in range(1, 13):  # even: held; odd: not held
            src.emit(Item(np.array([i]), {"i": i}, ack=lambda o, i=i: acks.__setitem__(i, o), held=i % 2 == 0))
        assert flow.counters()["queued"] == 6 + 2 and flow.counters()["dropped_queue_full"] == 4
        gate.release.set()
        src.ended.set()
        assert flow.join(timeout=10)
    finally:
        flow.stop()
    assert [r["value"] for r in sink.take(9)] == [0, 2, 4, 6, 8, 9, 10, 11, 12]
    assert sorted(i for i, o in acks.items() if o == "dropped") == [1, 3, 5, 7]
    assert flow.counters()["queued_max"] == 8


def test_a_flows_results_carry_ids_whose_feedback_counts_for_the_version_that_predicted(tmp_path: Any) -> None:
    """Ground truth for a flow's predictions: each result has an id, remembered as the API's are."""
    from _support import digits_bundle

    from edgefleet.agent.pipeline import Pipeline
    from edgefleet.agent.registry import RecentPredictions
    from edgefleet.agent.runtime import load_model
    from edgefleet.agent.telemetry.feedback import Feedback, with_predicted_class
    from edgefleet.agent.telemetry.measure import TelemetryRegistry

    model = load_model(digits_bundle(tmp_path))
    pipeline = Pipeline(model)
    predictions, stats = RecentPredictions(), TelemetryRegistry()
    stats.track_model("m", "1.0.0", model)
    count = iter(range(1000))

    def remember(result: dict[str, Any]) -> str:
        pid = f"flow-{next(count)}"
        predictions.add(pid, "m", "1.0.0", with_predicted_class(result))
        return pid

    config = FlowConfig.model_validate({"model": "m", "source": {"type": "stdin"}, "sinks": [{"type": "stdout"}]})
    src, sink = PushSource(), CollectSink()
    flow = Flow(config, lambda: pipeline, source=src, sinks=[sink], remember=remember)
    flow.start()
    try:
        assert src.emit is not None
        for v in (0, 8, 16):
            src.emit(Item(np.full((8, 8), v, np.uint8), {"source": "push", "i": v}))
        results = sink.take(3)
    finally:
        flow.stop()
    assert [r["id"] for r in results] == ["flow-0", "flow-1", "flow-2"]
    fb = Feedback(predictions, stats)
    for r in results:
        answer = fb.give({"id": r["id"], "label": r["top_k"][0]["index"]}, "m")
        assert answer["correct"] is True
    got = stats.get("m", "1.0.0")
    assert got is not None and got.snapshot()["accuracy"]["accuracy"] == 1.0
