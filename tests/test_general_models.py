"""The runtime on models shaped like the ones users bring (tests/fixtures/make_general_models.py):
dynamic TFLite dims, resource variables and several signatures, an ONNX ``If`` with a scalar input,
ONNX quantized I/O, a dense output map. Every output is compared with the raw runtime's own."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from _support import MODELS, digits_input, raw_tflite
from ai_edge_litert.interpreter import Interpreter

from edgefleet.agent import ModelError, load_model

FIXTURES = ["ocr_dynamic.tflite", "stream_state.tflite", "vad_if.onnx", "digits_qio.onnx", "segmenter_dense.onnx"]
# LiteRT prints this once per process when it creates its default CPU delegate; nothing sets its
# minimal logger's level from Python. Anything else on stdout/stderr is a failure.
LITERT_BANNER = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
rng = np.random.default_rng(5)


def raw_onnx(path: Path, feeds: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def image(h: int, w: int, layout: str = "nhwc") -> np.ndarray[Any, Any]:
    x = rng.random((1, h, w, 3), dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if layout == "nchw" else x


# --- loading prints nothing ----------------------------------------------------------------------

# Load, one valid request, one the runtime refuses (when the model has one): the process's own
# stdout and stderr (fd 1 and 2, where ONNX Runtime and LiteRT log from C++) must stay quiet.
_QUIET = r"""
import sys, numpy as np
from edgefleet.agent import ModelError, load_model
fname, good, bad = sys.argv[1], sys.argv[2], sys.argv[3]
m = load_model(fname)
feeds = {k: np.asarray(v) for k, v in eval(good).items()}
m.predict(feeds)
if bad != "-":
    try:
        m.predict({k: np.asarray(v) for k, v in eval(bad).items()})
    except ModelError:
        pass
    else:
        raise SystemExit("expected a ModelError")
m.predict(feeds)
"""

REQUESTS = {
    "ocr_dynamic.tflite": (
        "{'image': np.zeros((1, 32, 80, 3), np.float32)}",
        "{'image': np.zeros((1, 1, 1, 3), np.float32)}",
    ),
    "stream_state.tflite": ("{'frame': np.zeros((1, 64), np.float32), 'gain': np.float32(1)}", "-"),
    "vad_if.onnx": ("{'audio': np.zeros((2, 256), np.float32), 'sr': np.int64(16000)}", "-"),
    "digits_qio.onnx": ("{'pixels': np.zeros((3, 1, 8, 8), np.float32)}", "-"),
    "segmenter_dense.onnx": (
        "{'image': np.zeros((1, 3, 16, 24), np.float32)}",
        "{'image': np.zeros((1, 3, 2, 2), np.float32)}",
    ),
}


@pytest.mark.parametrize("fname", FIXTURES)
def test_loading_and_running_each_fixture_prints_nothing(fname):
    good, bad = REQUESTS[fname]
    r = subprocess.run(
        [sys.executable, "-c", _QUIET, str(MODELS / fname), good, bad], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    noise = [line for line in r.stderr.splitlines() if line.strip() and line.strip() != LITERT_BANNER]
    assert noise == [], r.stderr


def test_loading_a_dynamic_model_logs_no_warning(caplog):
    with caplog.at_level(logging.DEBUG, logger="edgefleet"):
        load_model(MODELS / "segmenter_dense.onnx")
        load_model(MODELS / "ocr_dynamic.tflite")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("no warm-up" in r.getMessage() for r in caplog.records)


# --- TFLite with dynamic input dims ---------------------------------------------------------------




def test_dynamic_tflite_loads_and_matches_the_raw_runtime_at_several_sizes():
    path = MODELS / "ocr_dynamic.tflite"
    model = load_model(path)
    assert model.inputs[0].shape == (1, None, None, 3)
    assert model.signatures == ["serving_default"]
    for h, w in [(32, 100), (48, 64), (6, 6), (32, 100), (32, 320)]:
        x = image(h, w)
        got = model.predict({"image": x})["logits"]
        assert got.shape == (1, w // 2 - 2, 12)
        np.testing.assert_array_equal(got, raw_tflite(path, x))


def test_dynamic_tflite_shape_the_runtime_refuses_is_a_model_error_and_the_next_request_works():
    path = MODELS / "ocr_dynamic.tflite"
    model = load_model(path)
    with pytest.raises(ModelError) as info:
        model.predict({"image": np.zeros((1, 1, 1, 3), np.float32)})
    assert type(info.value) is ModelError and info.value.__cause__ is not None
    assert str(path) in str(info.value) and "[1, 1, 1, 3]" in str(info.value)
    x = image(24, 40)
    np.testing.assert_array_equal(model.predict({"image": x})["logits"], raw_tflite(path, x))


def test_dynamic_tflite_bundle_warms_up_with_its_golden_sample(tmp_path, caplog):
    from edgefleet.converters.package import package_model

    x = np.stack([image(32, 64) for _ in range(3)])  # (N, 1, H, W, 3): samples on a new leading axis
    bundle, _ = package_model(MODELS / "ocr_dynamic.tflite", "ocr", "1.0.0", out=tmp_path, golden={"image": x})
    with caplog.at_level(logging.DEBUG, logger="edgefleet"):
        model = load_model(bundle)
    assert not any("warm-up" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert model.example_inputs is not None and model.example_inputs["image"].shape == (1, 32, 64, 3)
    np.testing.assert_array_equal(
        model.predict({"image": x[1]})["logits"], raw_tflite(MODELS / "ocr_dynamic.tflite", x[1])
    )


# --- stateful TFLite: resource variables, several signatures ---------------------------------------


def _frames(n: int) -> list[dict[str, np.ndarray[Any, Any]]]:
    r = np.random.default_rng(9)
    return [{"frame": r.standard_normal((1, 64)).astype(np.float32), "gain": np.float32(0.5 + i)} for i in range(n)]


def raw_stream(frames: list[dict[str, Any]]) -> list[dict[str, np.ndarray[Any, Any]]]:
    it = Interpreter(model_path=str(MODELS / "stream_state.tflite"))
    run = it.get_signature_runner("serving_default")
    return [{k: np.asarray(v) for k, v in run(**f).items()} for f in frames]


def test_stateful_tflite_accumulates_state_like_the_raw_runtime_from_its_initial_state():
    model = load_model(MODELS / "stream_state.tflite")
    assert model.stateful
    assert sorted(model.signatures) == ["reset", "serving_default"]
    assert {s.name: s.shape for s in model.inputs} == {"frame": (1, 64), "gain": ()}
    frames = _frames(5)
    want = raw_stream(frames)
    got = [model.predict(f) for f in frames]
    assert [int(g["frames"]) for g in got] == [1, 2, 3, 4, 5]  # the load (and warm-up) left no trace
    for g, w in zip(got, want, strict=True):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_stateful_tflite_reset_starts_again_from_the_initial_state():
    model = load_model(MODELS / "stream_state.tflite")
    frames = _frames(3)
    first = [model.predict(f) for f in frames]
    model.reset()
    again = [model.predict(f) for f in frames]
    for a, b in zip(first, again, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert int(again[0]["frames"]) == 1


def test_tflite_signature_can_be_chosen_and_an_unknown_one_lists_the_real_ones():
    path = MODELS / "stream_state.tflite"
    reset = load_model(path, signature="reset")
    assert reset.inputs == [] and [s.name for s in reset.outputs] == ["done"]
    assert int(reset.predict({})["done"]) == 1
    assert reset.info()["signature"] == "reset"
    with pytest.raises(
        ModelError, match=r"no signature 'step'; the model's signatures are \['reset', 'serving_default'\]"
    ):
        load_model(path, signature="step")


def test_signature_option_is_refused_for_onnx():
    with pytest.raises(ModelError, match=r"unknown option\(s\) \['signature'\]"):
        load_model(MODELS / "vad_if.onnx", signature="serving_default")


# --- ONNX: If subgraph with a scalar input ----------------------------------------------------------


@pytest.mark.parametrize("sr", [16000, 8000])
def test_onnx_if_with_scalar_input_matches_the_raw_runtime_on_both_branches(sr):
    path = MODELS / "vad_if.onnx"
    model = load_model(path)
    assert {s.name: s.shape for s in model.inputs} == {"audio": (None, 256), "sr": ()}
    audio = rng.standard_normal((3, 256)).astype(np.float32)
    feeds = {"audio": audio, "sr": np.array(sr, np.int64)}
    want = raw_onnx(path, feeds)["speech_prob"]
    np.testing.assert_array_equal(model.predict(feeds)["speech_prob"], want)
    np.testing.assert_array_equal(model.predict({"audio": audio, "sr": sr})["speech_prob"], want)  # a Python int


def test_onnx_metadata_props_are_on_the_model():
    assert load_model(MODELS / "vad_if.onnx").metadata == {"sample_rates": "8000,16000", "author": "edgefleet fixtures"}
    seg = load_model(MODELS / "segmenter_dense.onnx")
    assert seg.metadata == {"classes": "background,road,car,person"}
    info = seg.info()
    assert info["metadata"] == seg.metadata and info["signatures"] == [] and info["stateful"] is False
    json.dumps(info)


# --- ONNX: quantized I/O -------------------------------------------------------------------------------


def test_onnx_quantized_io_reads_scale_and_zero_point_from_dq_and_q_nodes():
    model = load_model(MODELS / "digits_qio.onnx")
    inp, out = model.inputs[0], model.outputs[0]
    assert inp.dtype == np.uint8 and inp.quantization is not None
    assert inp.quantization.scale == pytest.approx(1 / 255) and inp.quantization.zero_point == 0
    assert out.dtype == np.int8 and out.quantization is not None and out.quantization.scale > 0
    assert inp.to_dict()["quantization"] == {"scale": inp.quantization.scale, "zero_point": 0}


def test_onnx_quantized_io_float_input_matches_the_raw_runtime_quantized_by_hand(holdout):
    x, y = holdout
    path = MODELS / "digits_qio.onnx"
    model = load_model(path)
    qin, qout = model.inputs[0].quantization, model.outputs[0].quantization
    assert qin is not None and qout is not None
    f = digits_input(x, "nchw")
    q = np.clip(np.rint(f / qin.scale) + qin.zero_point, 0, 255).astype(np.uint8)
    raw = raw_onnx(path, {"pixels": q})["logits"]
    got = model.predict({"pixels": f})["logits"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (raw.astype(np.float32) - qout.zero_point) * np.float32(qout.scale))
    # The integer dtype passed directly still works, and its output stays integer.
    as_int = model.predict({"pixels": q})["logits"]
    assert as_int.dtype == np.int8
    np.testing.assert_array_equal(as_int, raw)
    assert float((got.argmax(1) == y).mean()) > 0.9


def _qdq_model(tmp_path: Path, name: str, scale_as: str, consumers: int = 1, per_axis: bool = False) -> Path:
    """int8 input -> DequantizeLinear -> Relu -> output, with the scale an initializer or a Constant."""
    from onnx import TensorProto, helper, numpy_helper

    scale = np.array([0.5, 0.25], np.float32) if per_axis else np.array(0.05, np.float32)
    zp = np.array([3, 3], np.int8) if per_axis else np.array(-3, np.int8)
    inits = [numpy_helper.from_array(zp, "zp")]
    nodes = []
    if scale_as == "initializer":
        inits.append(numpy_helper.from_array(scale, "scale"))
    else:
        nodes.append(helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(scale, "scale_value")))
    nodes.append(helper.make_node("DequantizeLinear", ["x", "scale", "zp"], ["xf"], axis=1))
    nodes.append(helper.make_node("Relu", ["xf"], ["y"]))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])]
    if consumers == 2:  # a second consumer with other parameters: no single scale to use
        inits += [numpy_helper.from_array(np.array(9.0, np.float32), "other")]
        nodes.append(helper.make_node("DequantizeLinear", ["x", "other"], ["x2"]))
        outputs.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 2]))
    graph = helper.make_graph(
        nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.INT8, [1, 2])], outputs, initializer=inits
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / f"{name}.onnx"
    p.write_bytes(m.SerializeToString())
    return p


@pytest.mark.parametrize("scale_as", ["initializer", "constant"])
def test_onnx_int8_input_scale_from_an_initializer_or_a_constant_node(tmp_path, scale_as):
    path = _qdq_model(tmp_path, scale_as, scale_as)
    model = load_model(path)
    q = model.inputs[0].quantization
    assert q is not None and q.scale == pytest.approx(0.05) and q.zero_point == -3
    got = model.predict({"x": np.array([[1.0, -1.0]], np.float32)})["y"]
    raw = raw_onnx(path, {"x": np.array([[17, -23]], np.int8)})["y"]  # 1.0/0.05 - 3, -1.0/0.05 - 3
    np.testing.assert_array_equal(got, raw)
    # From a bundle the model comes as bytes: the same parameters are found.
    from edgefleet.converters.package import package_model

    bundle, manifest = package_model(path, "qdq", "1.0.0", out=tmp_path / "b")
    assert load_model(bundle).inputs[0].quantization == q
    assert manifest.inputs[0].quantization is not None


@pytest.mark.parametrize(("name", "kwargs"), [("per_axis", {"per_axis": True}), ("two_consumers", {"consumers": 2})])
def test_onnx_int8_input_without_one_per_tensor_scale_stays_integer_only(tmp_path, name, kwargs):
    model = load_model(_qdq_model(tmp_path, name, "initializer", **kwargs))
    assert model.inputs[0].quantization is None
    with pytest.raises(ModelError, match=r"input 'x': expected dtype int8, got float32"):
        model.predict({"x": np.zeros((1, 2), np.float32)})
    model.predict({"x": np.zeros((1, 2), np.int8)})


def test_onnx_quantization_parameters_come_from_bytes_too():
    from edgefleet.agent.backends.onnx import quantized_io

    path = MODELS / "digits_qio.onnx"
    assert quantized_io(path.read_bytes()) == quantized_io(str(path))
    assert quantized_io(b"\x0a\xff\xff\xff") == ({}, {})  # truncated: nothing, no exception


# --- a dense output map; runtime failures -------------------------------------------------------------


@pytest.mark.parametrize(("h", "w"), [(16, 24), (32, 32), (6, 10)])
def test_dense_map_segmenter_matches_the_raw_runtime_at_several_sizes(h, w):
    path = MODELS / "segmenter_dense.onnx"
    model = load_model(path)
    x = image(h, w, "nchw")
    got = model.predict({"image": x})["mask"]
    assert got.shape == (1, 4, h, w)
    np.testing.assert_array_equal(got, raw_onnx(path, {"image": x})["mask"])


def test_onnx_runtime_failure_is_a_model_error_naming_the_model_and_shapes():
    path = MODELS / "segmenter_dense.onnx"
    model = load_model(path)
    with pytest.raises(ModelError) as info:
        model.predict({"image": np.zeros((1, 3, 2, 2), np.float32)})
    e = info.value
    assert type(e) is ModelError
    assert str(path) in str(e) and "{'image': [1, 3, 2, 2]}" in str(e) and "\n" not in str(e)
    assert e.__cause__ is not None and not isinstance(e.__cause__, ModelError)


def test_warm_up_leaves_a_stateless_model_unchanged():
    """A warmed-up model (fixed shapes) gives the raw runtime's outputs on its first request."""
    path = MODELS / "vad_if.onnx"
    feeds = {"audio": np.ones((1, 256), np.float32), "sr": np.array(8000, np.int64)}
    np.testing.assert_array_equal(load_model(path).predict(feeds)["speech_prob"], raw_onnx(path, feeds)["speech_prob"])


# --- bench inputs: explicit arrays, shapes for dynamic dims, golden by default ---------------------------


def test_bench_takes_an_npz_in_the_sample_layout(tmp_path):
    from edgefleet.agent.benchmark import bench_inputs, bench_model

    model = load_model(MODELS / "vad_if.onnx")
    audio = rng.standard_normal((4, 2, 256)).astype(np.float32)  # (N, *[batch, 256])
    np.savez(tmp_path / "in.npz", audio=audio, **{"input.sr": np.full(4, 16000, np.int64)})  # scalars as (N,)
    feeds = bench_inputs(model, tmp_path / "in.npz")
    assert feeds["audio"].shape == (2, 256) and feeds["sr"].shape == ()
    result = bench_model(model, feeds, runs=10, warmup=2)
    assert result["runs"] == 10 and result["agent"]["p50_us"] > 0


def test_bench_inputs_in_the_wrong_layout_name_the_array_and_the_layout(tmp_path):
    from edgefleet.agent.benchmark import bench_inputs

    model = load_model(MODELS / "vad_if.onnx")
    np.savez(tmp_path / "in.npz", audio=np.zeros((2, 256), np.float32), sr=np.int64(16000))
    with pytest.raises(
        ModelError, match=r"array 'audio' has shape \[2, 256\]; expected samples stacked .*\(N, \*\[\?, 256\]\)"
    ):
        bench_inputs(model, tmp_path / "in.npz")
    with pytest.raises(ModelError, match=r"no array for input 'sr'"):
        bench_inputs(model, {"audio": np.zeros((1, 2, 256), np.float32)})
    with pytest.raises(ModelError, match=rf"{tmp_path / 'nope.npz'}: no such file"):
        bench_inputs(model, tmp_path / "nope.npz")


def test_bench_a_dynamic_model_at_the_shapes_given():
    from edgefleet.agent.benchmark import bench_inputs, bench_model

    model = load_model(MODELS / "segmenter_dense.onnx")
    with pytest.raises(ModelError, match=r"input 'image' has dynamic dims \[1, 3, \?, \?\]: give its shape"):
        bench_inputs(model)
    with pytest.raises(ModelError, match=r"shape for input 'image': expected \[1, 3, \?, \?\], got \[1, 4, 8, 8\]"):
        bench_inputs(model, shapes={"image": (1, 4, 8, 8)})
    with pytest.raises(ModelError, match=r"unknown input\(s\) \['img'\]"):
        bench_inputs(model, shapes={"img": (1, 3, 8, 8)})
    feeds = bench_inputs(model, shapes={"image": (1, 3, 32, 48)})
    assert feeds["image"].shape == (1, 3, 32, 48)
    assert bench_model(model, feeds, runs=10, warmup=2)["bare"]["p50_us"] > 0
    tfl = load_model(MODELS / "ocr_dynamic.tflite")
    assert bench_model(tfl, bench_inputs(tfl, shapes={"image": (1, 16, 40, 3)}), runs=10, warmup=2)["runs"] == 10


def test_bench_uses_a_bundles_golden_sample_by_default(tmp_path):
    from edgefleet.agent.benchmark import bench_inputs
    from edgefleet.converters.package import package_model

    x = np.stack([image(12, 20, "nchw") for _ in range(2)])
    bundle, _ = package_model(MODELS / "segmenter_dense.onnx", "seg", "1.0.0", out=tmp_path, golden={"image": x})
    feeds = bench_inputs(load_model(bundle))
    np.testing.assert_array_equal(feeds["image"], x[0])


def test_bench_leaves_a_stateful_model_in_its_initial_state():
    from edgefleet.agent.benchmark import bench_inputs, bench_model

    model = load_model(MODELS / "stream_state.tflite")
    result = bench_model(model, bench_inputs(model), runs=10, warmup=2)
    assert result["bare"]["p50_us"] > 0
    assert int(model.predict(_frames(1)[0])["frames"]) == 1


# --- bundles: golden self-test on every fixture; a stateful model after its self-test ------------------

GOLDEN = {  # samples on a new leading axis: (N, *input shape), scalars (N,)
    "ocr_dynamic.tflite": lambda r: {"image": r.random((3, 1, 16, 40, 3), dtype=np.float32)},
    "stream_state.tflite": lambda r: {
        "frame": r.random((4, 1, 64), dtype=np.float32),
        "gain": r.random(4).astype(np.float32),
    },
    "vad_if.onnx": lambda r: {"audio": r.random((3, 1, 256), dtype=np.float32), "sr": np.array([16000, 8000, 16000])},
    "digits_qio.onnx": lambda r: {"pixels": r.random((3, 1, 1, 8, 8), dtype=np.float32)},
    "segmenter_dense.onnx": lambda r: {"image": r.random((2, 1, 3, 12, 16), dtype=np.float32)},
}


@pytest.mark.parametrize("fname", FIXTURES)
def test_every_fixture_packages_with_golden_vectors_and_passes_its_self_test(tmp_path, fname):
    from edgefleet.agent.selftest import verify_bundle
    from edgefleet.converters.package import package_model

    golden = GOLDEN[fname](np.random.default_rng(1))
    bundle, _ = package_model(MODELS / fname, "m", "1.0.0", out=tmp_path, golden=golden)
    report = verify_bundle(str(bundle))
    assert report["ok"], report
    assert report["golden"]["samples"] == next(iter(golden.values())).shape[0]


def test_stateful_bundle_after_its_self_test_and_reset_serves_from_the_initial_state(tmp_path):
    from edgefleet.agent.selftest import run_golden
    from edgefleet.bundle.archive import BundleReader
    from edgefleet.converters.package import package_model

    golden = GOLDEN["stream_state.tflite"](np.random.default_rng(2))
    bundle, manifest = package_model(MODELS / "stream_state.tflite", "vad", "1.0.0", out=tmp_path, golden=golden)
    model = load_model(bundle)
    assert model.example_inputs is not None  # kept, but a stateful model is not warmed up
    with BundleReader(bundle) as b:
        data = b.read("golden.npz")
    assert manifest.golden is not None
    assert int(model.predict(_frames(1)[0])["frames"]) == 1  # served from the initial state...
    assert run_golden(model, data, manifest.golden).passed  # ...the self-test starts from it too
    assert int(model.predict(_frames(1)[0])["frames"]) == 1  # and leaves it: the four samples are undone
