"""Ground truth through the real local API: ``POST /v2/models/{name}/feedback`` on ``/predict`` ids gives
the live accuracy, precision and recall scikit-learn computes offline on the same predictions and labels;
the version credited is the one that made the prediction; bad feedback is refused with its status; the
MQTT ``feedback`` handler takes the same body."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _server import running_api
from _support import MODELS, digits_bundle
from sklearn.metrics import accuracy_score, precision_score, recall_score

from edgefleet.agent import load_model
from edgefleet.agent.api import InferenceApp
from edgefleet.agent.telemetry.feedback import FeedbackError
from edgefleet.bundle.manifest import PipelineSpec
from edgefleet.converters.package import package_model

LABELS = (MODELS / "digits_labels.txt").read_text().split()
DIGITS_PIPELINE = {
    "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nhwc"}],
    "postprocess": [{"op": "softmax"}, {"op": "argmax"}],
}


def digits_v(out: Path, version: str, pipeline: dict[str, Any] = DIGITS_PIPELINE, name: str = "digits") -> Path:
    path, _ = package_model(
        MODELS / "digits_cnn_float.tflite",
        name,
        version,
        out=out / version,
        labels=MODELS / "digits_labels.txt",
        pipeline=PipelineSpec.model_validate(pipeline),
    )
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("feedback-bundles")
    (d / "scores").mkdir()
    return {
        "digits": digits_bundle(d),  # top-k only: the class is the first of top_k
        "digits-argmax": digits_v(d, "3.0.0", name="digits-argmax"),
        "digits-scores": digits_v(d / "scores", "1.0.0", {**DIGITS_PIPELINE, "postprocess": [{"op": "softmax"}]}),
        "digits-v2": digits_v(d, "2.0.0"),
    }


@pytest.fixture
def api(bundles: dict[str, Path]) -> Iterator[tuple[str, InferenceApp]]:
    models = {k: v for k, v in bundles.items() if k != "digits-v2"}
    with running_api(models, recent_predictions=400) as served:
        yield served


def predict(c: httpx.Client, model: str, pixels: Any) -> dict[str, Any]:
    r = c.post(f"/v2/models/{model}/predict", json={"data": pixels.tolist()})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def top1(result: dict[str, Any]) -> int:
    return int(result["class"]) if "class" in result else int(result["top_k"][0]["index"])


@pytest.mark.parametrize("model", ["digits", "digits-argmax"])
def test_live_accuracy_from_http_feedback_equals_sklearn_offline(
    api: tuple[str, InferenceApp], holdout: Any, model: str
) -> None:
    url, app = api
    x, y = holdout
    n = min(300, len(y))
    with httpx.Client(base_url=f"http://{url}") as c:
        results = [predict(c, model, x[i]) for i in range(n)]
        version = results[0]["model_version"]
        for i, res in enumerate(results):
            # the true class as its index or its label string, alternately
            label: int | str = int(y[i]) if i % 2 else LABELS[int(y[i])]
            r = c.post(f"/v2/models/{model}/feedback", json={"id": res["id"], "label": label})
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["predicted"] == top1(res) and got["label"] == int(y[i]) and got["model_version"] == version
    pred = np.array([top1(r) for r in results])
    true = np.asarray(y[:n], dtype=np.int64)
    stats = app.telemetry.get(model, version)
    assert stats is not None and stats.labels == LABELS
    acc = stats.snapshot()["accuracy"]
    assert acc["window"] == n
    assert acc["accuracy"] == pytest.approx(accuracy_score(true, pred), rel=1e-5)
    classes = sorted(set(pred.tolist()) | set(true.tolist()))
    prec = precision_score(true, pred, labels=classes, average=None, zero_division=0)
    rec = recall_score(true, pred, labels=classes, average=None, zero_division=0)
    for c_, p_, r_ in zip(classes, prec, rec, strict=True):
        if (pred == c_).any():
            assert acc["precision"][str(c_)] == pytest.approx(p_, rel=1e-5)
        if (true == c_).any():
            assert acc["recall"][str(c_)] == pytest.approx(r_, rel=1e-5)
    assert acc["accuracy"] > 0.8  # the digits model is good: the pairs are real ones


def test_feedback_credits_the_version_that_made_the_prediction_after_a_switch(
    api: tuple[str, InferenceApp], bundles: dict[str, Path], holdout: Any
) -> None:
    url, app = api
    x, y = holdout
    with httpx.Client(base_url=f"http://{url}") as c:
        # the version served when the prediction was made is tracked, as the agent service does
        served = app.registry.get("digits-argmax")
        assert served is not None
        v3 = app.telemetry.track_model("digits-argmax", served.version, served.model)
        old = predict(c, "digits-argmax", x[0])
        app.registry.put("digits-argmax", load_model(bundles["digits-v2"]))  # a switch to 2.0.0
        app.telemetry.retire("digits-argmax", "3.0.0")
        new = predict(c, "digits-argmax", x[1])
        assert (old["model_version"], new["model_version"]) == ("3.0.0", "2.0.0")
        r_new = c.post("/v2/models/digits-argmax/feedback", json={"id": new["id"], "label": int(y[1])})
        r_old = c.post("/v2/models/digits-argmax/feedback", json={"id": old["id"], "label": int(y[0])})
        assert r_old.status_code == 200 and r_old.json()["model_version"] == "3.0.0", r_old.text
        assert r_new.status_code == 200 and r_new.json()["model_version"] == "2.0.0", r_new.text
    assert app.telemetry.get("digits-argmax", "3.0.0") is v3 and v3.accuracy.recorded == 1
    v2 = app.telemetry.get("digits-argmax", "2.0.0")
    assert v2 is not None and v2.accuracy.recorded == 1 and v2.labels == LABELS  # labels of the served model
    versions = {e["version"]: e["accuracy"]["window"] for e in app.telemetry.snapshot()}
    assert versions == {"3.0.0": 1, "2.0.0": 1}  # the retired version reports its late feedback too


def test_bad_feedback_is_refused_with_its_status_naming_the_field(api: tuple[str, InferenceApp], holdout: Any) -> None:
    url, _ = api
    x, _ = holdout
    with httpx.Client(base_url=f"http://{url}") as c:
        pid = predict(c, "digits", x[0])["id"]
        scores_id = predict(c, "digits-scores", x[0])["id"]

        def post(body: Any, model: str = "digits") -> tuple[int, str]:
            r = c.post(f"/v2/models/{model}/feedback", json=body)
            return r.status_code, r.json()["error"] if r.status_code != 200 else ""

        cases: list[tuple[str, Any, int, str]] = [
            ("digits", [pid, 3], 422, "body must be a JSON object"),
            ("digits", {"label": 3}, 422, "id:"),
            ("digits", {"id": 7, "label": 3}, 422, "id:"),
            ("digits", {"id": "", "label": 3}, 422, "id:"),
            ("digits", {"id": pid}, 422, "label: missing"),
            ("digits", {"id": pid, "label": -1}, 422, "label:"),
            ("digits", {"id": pid, "label": True}, 422, "label:"),
            ("digits", {"id": pid, "label": 2.0}, 422, "label:"),
            ("digits", {"id": pid, "label": 10**30}, 422, "label: expected a class index"),
            ("digits", {"id": pid, "label": "eleven"}, 422, "label: 'eleven' is not a label"),
            ("digits", {"id": pid, "label": 10}, 422, "label: class 10 is out of range"),
            ("digits", {"id": pid, "label": 3, "score": 1}, 422, "unknown field(s) ['score']"),
            ("digits", {"id": "f" * 32, "label": 3}, 404, "id: no recent prediction"),
            ("digits-argmax", {"id": pid, "label": 3}, 404, "of model 'digits-argmax'"),  # another model's id
            ("digits-scores", {"id": scores_id, "label": 3}, 422, "has no single class"),
        ]
        for model, body, status, needle in cases:
            got_status, error = post(body, model)
            assert (got_status, needle in error) == (status, True), (body, got_status, error)
            assert "\n" not in error
        assert post({"id": pid, "label": 3}) == (200, "")
        assert post({"id": pid, "label": 3}) == (409, f"id: prediction {pid!r} already has feedback")
        assert post({"id": pid, "label": "three"})[0] == 409
        r = c.post("/v2/models/digits/feedback", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
        assert c.get("/v2/models/digits/feedback").status_code == 405
        assert c.post("/v2/models/nope/feedback", json={"id": pid, "label": 1}).status_code == 404
        assert "feedback" in c.get("/v2").json()["extensions"]


def test_a_forgotten_prediction_gets_404_and_the_given_ids_stay_bounded(
    bundles: dict[str, Path], holdout: Any
) -> None:
    x, y = holdout
    with running_api({"digits": bundles["digits"]}, recent_predictions=5) as (url, app), httpx.Client(
        base_url=f"http://{url}"
    ) as c:
        ids = [predict(c, "digits", x[i])["id"] for i in range(6)]
        r = c.post("/v2/models/digits/feedback", json={"id": ids[0], "label": int(y[0])})
        assert r.status_code == 404 and "forgotten after the last 5" in r.json()["error"]
        for i in range(6, 60):
            pid = predict(c, "digits", x[i])["id"]
            assert c.post("/v2/models/digits/feedback", json={"id": pid, "label": int(y[i])}).status_code == 200
        assert len(app.feedback._done) <= 2 * 5
        stats = app.telemetry.get("digits", "1.0.0")
        assert stats is not None and stats.accuracy.recorded == 54


def test_mqtt_feedback_handler_takes_the_same_body_with_the_envelope(
    api: tuple[str, InferenceApp], holdout: Any
) -> None:
    url, app = api
    x, y = holdout
    with httpx.Client(base_url=f"http://{url}") as c:
        a, b = predict(c, "digits", x[0]), predict(c, "digits", x[1])
    env = {"schema": 1, "device_id": "dev-1", "at": "2026-12-01T12:00:00Z"}
    got = app.feedback.from_mqtt(json.dumps({**env, "id": a["id"], "label": int(y[0])}).encode(), "dev-1")
    assert got["model_name"] == "digits" and got["label"] == int(y[0])
    ok = {**env, "model": "digits", "id": b["id"], "label": LABELS[int(y[1])]}
    bad: list[tuple[bytes, int, str]] = [
        (b"\xff not json", 422, "payload is not valid JSON"),
        (b"[1]", 422, "payload must be a JSON object"),
        (json.dumps({**ok, "schema": 2}).encode(), 422, "schema:"),
        (json.dumps({**ok, "device_id": "dev-2"}).encode(), 422, "device_id:"),
        (json.dumps({**ok, "model": "digits-argmax"}).encode(), 404, "of model 'digits-argmax'"),
        (json.dumps({**ok, "extra": 1}).encode(), 422, "unknown field(s) ['extra']"),
        (b" " * 20000, 422, "over the 16384-byte limit"),
        (json.dumps({**env, "id": a["id"], "label": int(y[0])}).encode(), 409, "already has feedback"),
    ]
    for payload, status, needle in bad:
        with pytest.raises(FeedbackError) as e:
            app.feedback.from_mqtt(payload, "dev-1")
        assert e.value.status == status and needle in str(e.value), (payload[:40], str(e.value))
    assert app.feedback.from_mqtt(json.dumps(ok).encode(), "dev-1")["correct"] in (True, False)
    stats = app.telemetry.get("digits", "1.0.0")
    assert stats is not None and stats.accuracy.recorded == 2
