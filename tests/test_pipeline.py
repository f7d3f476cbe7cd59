"""Pre- and post-processing steps on real arrays and images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgefleet.agent import Pipeline, PipelineError, load_model
from edgefleet.agent.pipeline import decode_image, postprocess, preprocess
from edgefleet.bundle.manifest import PipelineSpec


def steps(*raw: dict[str, Any]) -> Any:
    return PipelineSpec.model_validate({"preprocess": list(raw)}).preprocess


def post(*raw: dict[str, Any]) -> Any:
    return PipelineSpec.model_validate({"postprocess": list(raw)}).postprocess


def test_resize_stretch_gives_the_exact_size() -> None:
    img = np.zeros((30, 40, 3), np.uint8)
    out = preprocess(img, steps({"op": "resize", "width": 16, "height": 8}))
    assert out.shape == (8, 16, 3) and out.dtype == np.uint8


def test_letterbox_keeps_aspect_and_pads() -> None:
    img = np.full((20, 40, 3), 200, np.uint8)
    out = preprocess(img, steps({"op": "resize", "width": 32, "height": 32, "mode": "letterbox", "pad_value": 7}))
    assert out.shape == (32, 32, 3)
    # a 2:1 image in a square: 16 rows of image in the middle, 8 rows of padding above and below
    assert (out[:8] == 7).all() and (out[-8:] == 7).all() and (out[8:24] == 200).all()


def test_gray_image_keeps_a_channel_axis_through_resize() -> None:
    out = preprocess(np.zeros((10, 10), np.uint8), steps({"op": "resize", "width": 4, "height": 4}))
    assert out.shape == (4, 4, 1)


def test_center_crop_and_crop_too_large() -> None:
    img = np.arange(36, dtype=np.uint8).reshape(6, 6, 1)
    out = preprocess(img, steps({"op": "center_crop", "width": 2, "height": 2}))
    np.testing.assert_array_equal(out[..., 0], [[14, 15], [20, 21]])
    with pytest.raises(PipelineError, match=r"step center_crop: 8x2 is larger than the image 6x6"):
        preprocess(img, steps({"op": "center_crop", "width": 8, "height": 2}))


def test_colour_order_conversions() -> None:
    bgr = np.zeros((1, 1, 3), np.uint8)
    bgr[0, 0] = (255, 0, 0)  # pure blue in BGR
    rgb = preprocess(bgr, steps({"op": "color", "target": "rgb"}))
    assert tuple(rgb[0, 0]) == (0, 0, 255)
    gray = preprocess(bgr, steps({"op": "color", "target": "gray"}))
    assert gray.shape == (1, 1, 1) and gray[0, 0, 0] == round(0.114 * 255)
    assert preprocess(gray, steps({"op": "color", "source": "gray", "target": "bgr"})).shape == (1, 1, 3)
    with pytest.raises(PipelineError, match="source bgr needs 3 channels, got 1"):
        preprocess(gray, steps({"op": "color", "target": "rgb"}))


def test_normalize_scale_layout_cast() -> None:
    img = np.full((2, 2, 3), 100, np.uint8)
    out = preprocess(
        img,
        steps(
            {"op": "normalize", "mean": [100, 50, 0], "std": [1, 50, 100]},
            {"op": "layout", "target": "nchw"},
        ),
    )
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0, 0], [0.0, 1.0, 1.0])
    scaled = preprocess(img, steps({"op": "scale", "factor": 0.5, "offset": -1}, {"op": "cast", "dtype": "int32"}))
    assert scaled.dtype == np.int32 and scaled[0, 0, 0] == 49
    with pytest.raises(PipelineError, match="step normalize: mean has 2 values, the data has 3 channels"):
        preprocess(img, steps({"op": "normalize", "mean": [1, 2], "std": [1]}))


def test_softmax_topk_argmax_with_labels() -> None:
    logits = np.array([1.0, 3.0, 2.0], np.float32)
    res = postprocess(logits, post({"op": "softmax"}, {"op": "topk", "k": 2}, {"op": "argmax"}), ["a", "b", "c"])
    assert [t["label"] for t in res["top_k"]] == ["b", "c"]
    assert res["class"] == 1 and res["label"] == "b"
    assert abs(sum(res["scores"]) - 1.0) < 1e-6
    with pytest.raises(PipelineError, match="axis 3 is out of range"):
        postprocess(logits, post({"op": "softmax", "axis": 3}), None)


def test_decode_image_bytes_and_bad_bytes() -> None:
    img = np.zeros((5, 7, 3), np.uint8)
    ok, png = cv2.imencode(".png", img)
    assert ok
    assert decode_image(png.tobytes()).shape == (5, 7, 3)
    with pytest.raises(PipelineError, match=r"image: not a decodable image \(4 bytes\)"):
        decode_image(b"nope")


def test_pipeline_runs_an_encoded_image_through_a_bundle_model(models_dir: Path, holdout: Any, tmp_path: Path) -> None:
    """A digit scaled up and saved as PNG, through decode -> gray -> resize -> scale -> the CNN."""
    x, y = holdout
    model = load_model(models_dir / "digits_cnn_float.onnx")
    spec = PipelineSpec.model_validate(
        {
            "preprocess": [
                {"op": "color", "target": "gray"},
                {"op": "resize", "width": 8, "height": 8, "interpolation": "area"},
                {"op": "scale", "factor": 1 / 255},
                {"op": "layout", "target": "nchw"},
            ],
            "postprocess": [{"op": "softmax"}, {"op": "argmax"}],
        }
    )
    pipe = Pipeline(model, spec, labels=[str(i) for i in range(10)])
    hits = 0
    for i in range(20):
        big = cv2.resize((x[i] * 15).astype(np.uint8), (64, 64), interpolation=cv2.INTER_NEAREST)
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), big)
        res = pipe.run(path.read_bytes() if i % 2 else path)
        hits += res["class"] == y[i]
    assert hits >= 17


def test_pipeline_errors_name_the_file(models_dir: Path, tmp_path: Path) -> None:
    pipe = Pipeline(load_model(models_dir / "digits_cnn_float.onnx"))
    with pytest.raises(PipelineError, match="no such file"):
        pipe.run(tmp_path / "missing.png")
    bad = tmp_path / "x.gif"
    bad.write_bytes(b"GIF")
    with pytest.raises(PipelineError, match=r"unsupported file type '.gif'"):
        pipe.run(bad)


def test_pipeline_passes_a_dict_through_for_multi_input_models(models_dir: Path) -> None:
    pipe = Pipeline(load_model(models_dir / "multi_io.onnx"), PipelineSpec(output="total", raw_outputs=["total"]))
    res = pipe.run({"features": [[1.0, 2.0]], "scale": 2})
    assert res["outputs"] == {"total": [pytest.approx(7.0)]}
