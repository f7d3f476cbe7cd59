"""Pipelines on models shaped like the ones users bring (tests/fixtures/make_general_models.py): an
OCR line recognizer with dynamic height and width and a ``[1, T, C]`` sequence output, a segmenter
with a dense ``[1, C, H, W]`` map. Resizing keeps the aspect ratio and rounds to a multiple;
``argmax``/``topk`` read one axis; raw outputs are in a result only when asked for. Every result is
checked against the raw runtime run on the same prepared input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from _support import MODELS, raw_tflite

from edgefleet.agent import Pipeline, PipelineError, load_model
from edgefleet.agent.pipeline import postprocess, preprocess
from edgefleet.bundle.manifest import PipelineSpec
from edgefleet.errors import BundleError

rng = np.random.default_rng(21)

OCR = {
    "preprocess": [
        {"op": "resize", "height": 32, "keep_aspect": True, "multiple": 8, "pad_value": 0},
        {"op": "scale", "factor": 1 / 255},
    ],
    "postprocess": [{"op": "argmax", "axis": -1}],
}
SEGMENTER = {
    "preprocess": [
        {"op": "resize", "width": 48, "height": 48, "keep_aspect": True, "multiple": 8},
        {"op": "scale", "factor": 1 / 255},
        {"op": "layout", "target": "nchw"},
    ],
    "postprocess": [{"op": "argmax", "axis": 0}],
}


def spec(raw: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec.model_validate(raw)




def raw_onnx(path: Path, feeds: dict[str, Any]) -> np.ndarray[Any, Any]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]  # type: ignore[no-any-return]


def image(h: int, w: int) -> np.ndarray[Any, Any]:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- resize ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "step", "want"),
    [
        ((20, 50), {"height": 32, "multiple": 8}, (32, 80)),  # 50 * 1.6 = 80, already a multiple
        ((20, 47), {"height": 32, "multiple": 8}, (32, 80)),  # 75.2 -> 75, padded to 80
        ((30, 45), {"width": 48, "height": 48, "multiple": 8}, (32, 48)),  # fits the box: 32 x 48
        ((100, 10), {"width": 64, "height": 64}, (64, 6)),  # no multiple: the exact fit
        ((7, 9), {"height": 7, "multiple": 4}, (8, 12)),  # same size, only padded
    ],
)
def test_resize_keeping_the_aspect_ratio_and_rounding_to_a_multiple(
    hw: tuple[int, int], step: dict[str, Any], want: tuple[int, int]
) -> None:
    img = np.full((*hw, 3), 200, np.uint8)
    s = spec({"preprocess": [{"op": "resize", "keep_aspect": True, "pad_value": 7, **step}]}).preprocess
    out = preprocess(img, s)
    assert out.shape == (*want, 3) and out.dtype == np.uint8
    r = min(t / d for t, d in ((step.get("width"), hw[1]), (step.get("height"), hw[0])) if t is not None)
    nh, nw = max(1, round(hw[0] * r)), max(1, round(hw[1] * r))
    assert (out[:nh, :nw] == 200).all()  # the image at the top left
    assert (out[nh:] == 7).all() and (out[:, nw:] == 7).all()  # padding right and bottom


@pytest.mark.parametrize(
    ("step", "needle"),
    [
        ({"keep_aspect": True}, "keep_aspect needs width, height or both"),
        ({"width": 8}, "width and height are both needed unless keep_aspect"),
        ({"width": 8, "height": 8, "multiple": 4}, "multiple applies with keep_aspect = true only"),
        ({"height": 8, "keep_aspect": True, "mode": "letterbox"}, "keep_aspect and mode letterbox"),
        ({"height": 8, "keep_aspect": True, "multiple": 0}, "multiple"),
    ],
)
def test_a_resize_step_that_does_not_fit_together_is_one_line_naming_the_step(
    tmp_path: Path, step: dict[str, Any], needle: str
) -> None:
    from edgefleet.converters.package import load_pipeline

    path = tmp_path / "pipe.json"
    path.write_text(json.dumps({"preprocess": [{"op": "resize", **step}]}))
    with pytest.raises(BundleError) as e:
        load_pipeline(path)
    assert "\n" not in str(e.value) and "pipe.json: preprocess.0.resize" in str(e.value) and needle in str(e.value)


# --- argmax / topk along an axis ---------------------------------------------------------------------


def test_argmax_and_topk_on_a_sequence_read_the_class_axis() -> None:
    x = rng.random((5, 12), dtype=np.float32)  # [T, C]
    labels = [chr(ord("a") + i) for i in range(12)]
    res = postprocess(
        x, spec({"postprocess": [{"op": "argmax", "axis": -1}, {"op": "topk", "k": 2, "axis": 1}]}).postprocess, labels
    )
    assert res["class"] == x.argmax(axis=1).tolist()
    assert res["label"] == [labels[i] for i in x.argmax(axis=1)]
    assert res["score"] == pytest.approx(x.max(axis=1).tolist())
    assert len(res["top_k"]) == 5 and all(len(t) == 2 for t in res["top_k"])
    assert [t[0]["index"] for t in res["top_k"]] == res["class"]
    assert [t[1]["index"] for t in res["top_k"]] == np.argsort(-x, axis=1)[:, 1].tolist()
    # no axis: the whole output is one vector of scores, as before
    flat = postprocess(x, spec({"postprocess": [{"op": "argmax"}]}).postprocess, None)
    assert flat["class"] == int(x.argmax()) and flat["label"] is None


def test_argmax_over_a_map_nests_per_position_and_an_axis_out_of_range_is_named() -> None:
    x = rng.random((4, 3, 5), dtype=np.float32)  # [C, H, W]
    res = postprocess(x, spec({"postprocess": [{"op": "argmax", "axis": 0}]}).postprocess, None)
    assert np.array(res["class"]).shape == (3, 5) and res["class"] == x.argmax(axis=0).tolist()
    with pytest.raises(PipelineError, match=r"step topk: axis 3 is out of range for shape \[4, 3, 5\]"):
        postprocess(x, spec({"postprocess": [{"op": "topk", "axis": 3}]}).postprocess, None)


# --- real models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(20, 50), (24, 61), (40, 200)])
def test_ocr_with_dynamic_width_through_keep_aspect_resize_matches_the_raw_runtime(hw: tuple[int, int]) -> None:
    path = MODELS / "ocr_dynamic.tflite"
    pipe = Pipeline(load_model(path), spec(OCR))
    img = image(*hw)
    x = pipe.prepare(img)["image"]
    assert x.shape[0] == 1 and x.shape[1] == 32 and x.shape[2] % 8 == 0 and x.shape[3] == 3
    want = raw_tflite(path, x)[0]  # [T, 12]
    res = pipe.run(img)
    assert res["class"] == want.argmax(axis=-1).tolist()
    assert len(res["class"]) == x.shape[2] // 2 - 2
    assert res["score"] == pytest.approx(want.max(axis=-1).tolist(), rel=1e-5)
    assert "outputs" not in res


def test_segmenter_class_map_through_the_pipeline_matches_the_raw_runtime() -> None:
    path = MODELS / "segmenter_dense.onnx"
    pipe = Pipeline(load_model(path), spec(SEGMENTER))
    img = image(30, 45)
    x = pipe.prepare(img)["image"]
    assert x.shape == (1, 3, 32, 48)
    want = raw_onnx(path, {"image": x})[0]  # [4, 32, 48]
    res = pipe.run(img)
    assert res["class"] == want.argmax(axis=0).tolist()
    assert "outputs" not in res


def test_raw_outputs_are_opt_in_by_spec_or_by_call() -> None:
    path = MODELS / "segmenter_dense.onnx"
    img = image(30, 45)
    lean = Pipeline(load_model(path), spec(SEGMENTER))
    small = json.dumps(lean.run(img))
    full = lean.run(img, raw_outputs=True)
    want = raw_onnx(path, {"image": lean.prepare(img)["image"]})
    np.testing.assert_allclose(np.array(full["outputs"]["mask"]), want, rtol=1e-6)
    assert len(json.dumps(full)) > 3 * len(small)  # 4 scores a pixel against one class and one score
    assert lean.run(img)["label"] is None  # no labels: one None, not a map of them
    by_spec = Pipeline(load_model(path), spec({**SEGMENTER, "raw_outputs": ["mask"]}))
    assert set(by_spec.run(img)["outputs"]) == {"mask"}
    assert "outputs" not in by_spec.run(img, raw_outputs=False)
    with pytest.raises(
        PipelineError, match=r"raw_outputs: no output\(s\) \['logits'\]; the model's outputs are \['mask'\]"
    ):
        lean.run(img, raw_outputs=["logits"])
    with pytest.raises(PipelineError, match=r"raw_outputs: no output\(s\) \['boxes'\]"):
        Pipeline(load_model(path), spec({"raw_outputs": ["boxes"]}))


def test_a_pipeline_naming_a_tensor_the_model_lacks_is_refused_at_once() -> None:
    model = load_model(MODELS / "segmenter_dense.onnx")
    with pytest.raises(PipelineError, match=r"pipeline output 'probs': the model's outputs are \['mask'\]"):
        Pipeline(model, spec({"output": "probs"}))
    with pytest.raises(PipelineError, match=r"pipeline input 'pixels': the model's inputs are \['image'\]"):
        Pipeline(model, spec({"input": "pixels"}))


def test_an_encoded_image_through_a_bundle_pipeline(tmp_path: Path) -> None:
    """The bundle's own pipeline (from its manifest) on PNG bytes, as the agent runs it."""
    from edgefleet.converters import package_model

    bundle, _ = package_model(
        MODELS / "segmenter_dense.onnx", "segmenter", "1.0.0", out=tmp_path, pipeline=spec(SEGMENTER)
    )
    img = image(30, 45)
    ok, png = cv2.imencode(".png", img)
    assert ok
    res = Pipeline(load_model(bundle)).run(png.tobytes())
    x = Pipeline(load_model(MODELS / "segmenter_dense.onnx"), spec(SEGMENTER)).prepare(img)["image"]
    assert res["class"] == raw_onnx(MODELS / "segmenter_dense.onnx", {"image": x})[0].argmax(axis=0).tolist()
    assert set(res) == {"model", "class", "label", "score"}
