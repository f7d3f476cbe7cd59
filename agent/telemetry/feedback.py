"""Ground truth that arrives later: feedback on a recent prediction, by its id, into live accuracy.

A local app that learns the true class of something the agent predicted sends ``{"id": ..., "label":
...}`` to ``POST /v2/models/{name}/feedback`` or, with ``schema``, ``device_id`` and ``at`` (and
optionally ``model``), to the ``edgefleet/v1/{device_id}/feedback`` topic. ``id`` is the ``id`` of a
``/predict`` answer (the agent remembers the last ``api.recent_predictions`` of them); ``label`` is the
true class, as its index or its label string. The pair (predicted class, true class) goes into the
:class:`~edgefleet.agent.telemetry.measure.LiveAccuracy` window of the model version that made the
prediction, even after a switch to another version.

Refusals (:class:`FeedbackError`, its ``status`` the HTTP one): 422 for a body that is not an object of
these fields, naming the field (also for a label that is not one of the model's classes, and for a
prediction with no single class to compare with); 404 for an id this agent does not know (never made,
forgotten since, or made by another model); 409 for a second feedback on one id.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from edgefleet.agent.registry import Prediction, RecentPredictions
from edgefleet.agent.telemetry.measure import TelemetryRegistry
from edgefleet.errors import EdgefleetError

__all__ = ["MAX_FEEDBACK_BYTES", "Feedback", "FeedbackError", "predicted_class", "with_predicted_class"]

MAX_FEEDBACK_BYTES = 16 * 1024  # a feedback message is a few dozen bytes
_MAX_ID = 128
_MAX_LABEL = 256
_MAX_CLASS = (1 << 31) - 1  # class indices are kept as int64: anything larger is no class
_HTTP_FIELDS = frozenset({"id", "label"})
_MQTT_FIELDS = _HTTP_FIELDS | {"schema", "device_id", "at", "model"}

LabelsOf = Callable[[str, str], Sequence[str] | None]


class FeedbackError(EdgefleetError):
    """Feedback refused; ``status`` is the HTTP status (404, 409, 422) and the message names the field."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def predicted_class(result: Mapping[str, Any]) -> int | None:
    """The class index a pipeline result predicted: its ``class`` (argmax), else the first of its
    ``top_k``; None when it has no single class (no such step, or one class per position)."""
    c = result.get("class")
    if type(c) is int:
        return c
    top = result.get("top_k")
    if isinstance(top, list) and top and isinstance(top[0], Mapping):
        i = top[0].get("index")
        if type(i) is int:
            return i
    return None


def with_predicted_class(result: Mapping[str, Any]) -> Mapping[str, Any]:
    """``result`` with its predicted class as ``class`` when only ``top_k`` holds it, so that the
    prediction remembered for feedback (which keeps top-level scalars) knows what was predicted."""
    if "class" in result:
        return result
    c = predicted_class(result)
    return result if c is None else {**result, "class": c}


class Feedback:
    """Feedback on the predictions in ``predictions`` into the accuracy windows of ``telemetry``.

    ``labels_of(name, version)`` gives the labels of a model version (to read label strings) when the
    telemetry registry has no stats for it yet. Thread-safe: the HTTP API and the MQTT handler share one.
    The ids already given feedback are remembered while their prediction is (at most twice the
    predictions' capacity, pruned of forgotten ones)."""

    def __init__(
        self, predictions: RecentPredictions, telemetry: TelemetryRegistry, labels_of: LabelsOf | None = None
    ) -> None:
        self.predictions = predictions
        self.telemetry = telemetry
        self.labels_of = labels_of
        self._done: dict[str, None] = {}
        self._lock = threading.Lock()

    def give(self, body: Any, model: str | None = None, fields: frozenset[str] = _HTTP_FIELDS) -> dict[str, Any]:
        """Record the feedback ``body`` (parsed JSON), for a prediction of ``model`` if given; returns
        ``{"id", "model_name", "model_version", "predicted", "label", "correct"}``. Raises
        :class:`FeedbackError`."""
        if not isinstance(body, dict):
            raise FeedbackError('body must be a JSON object {"id": ..., "label": ...}')
        extra = sorted(str(k) for k in set(body) - fields)
        if extra:
            raise FeedbackError(f"unknown field(s) {extra[:8]}; feedback has {sorted(fields)}")
        pid = body.get("id")
        if not isinstance(pid, str) or not 0 < len(pid) <= _MAX_ID:
            raise FeedbackError(f"id: expected the string id of a prediction (1..{_MAX_ID} characters)")
        label = body.get("label")
        if label is None:
            raise FeedbackError("label: missing; give the true class as its index or its label")
        index = type(label) is int and 0 <= label <= _MAX_CLASS
        if not (index or (isinstance(label, str) and 0 < len(label) <= _MAX_LABEL)):
            raise FeedbackError(f"label: expected a class index (an integer 0..{_MAX_CLASS}) or a label string")
        want = body.get("model", model)
        p = self.predictions.get(pid)
        if p is None or (want is not None and p.model != want):
            whose = f" of model {want!r}" if want is not None else ""
            raise FeedbackError(
                f"id: no recent prediction{whose} has id {pid[:_MAX_ID]!r} (unknown, or forgotten after the last "
                f"{self.predictions.capacity})",
                404,
            )
        predicted = predicted_class(p.summary)
        if predicted is None:
            raise FeedbackError(f"id: prediction {pid!r} of model {p.model!r} has no single class to compare with")
        stats = self.telemetry.get(p.model, p.version)
        if stats is None:
            labels = self.labels_of(p.model, p.version) if self.labels_of is not None else None
            stats = self.telemetry.get_or_create(p.model, p.version, labels)
        true = stats.class_index(label)
        if true is None:
            known = "" if stats.labels is None else f"; its labels are {stats.labels[:20]}"
            raise FeedbackError(f"label: {label!r} is not a label of model {p.model!r} {p.version}{known}")
        if stats.labels is not None and true >= len(stats.labels):
            raise FeedbackError(f"label: class {true} is out of range; model {p.model!r} has {len(stats.labels)}")
        with self._lock:
            if pid in self._done:
                raise FeedbackError(f"id: prediction {pid!r} already has feedback", 409)
            self._done[pid] = None
            if len(self._done) > 2 * self.predictions.capacity:
                self._done = {k: None for k in self._done if self.predictions.get(k) is not None}
        stats.accuracy.record(predicted, true)
        return _answer(p, predicted, true)

    def from_mqtt(self, payload: bytes, device_id: str) -> dict[str, Any]:
        """Feedback from the ``feedback`` topic: the JSON body with ``schema: 1`` and this ``device_id``
        (``at`` and ``model`` optional). Raises :class:`FeedbackError` (422 for a bad payload)."""
        if len(payload) > MAX_FEEDBACK_BYTES:
            raise FeedbackError(f"payload of {len(payload)} bytes is over the {MAX_FEEDBACK_BYTES}-byte limit")
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FeedbackError(f"payload is not valid JSON: {str(e)[:100]}") from None
        if not isinstance(body, dict):
            raise FeedbackError("payload must be a JSON object")
        if body.get("schema") != 1:
            raise FeedbackError(f"schema: expected 1, got {str(body.get('schema'))[:20]!r}")
        if body.get("device_id") != device_id:
            raise FeedbackError(f"device_id: expected this device's {device_id!r}")
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise FeedbackError("model: expected a model name")
        return self.give(body, fields=_MQTT_FIELDS)


def _answer(p: Prediction, predicted: int, true: int) -> dict[str, Any]:
    return {
        "id": p.id,
        "model_name": p.model,
        "model_version": p.version,
        "predicted": predicted,
        "label": true,
        "correct": predicted == true,
    }
