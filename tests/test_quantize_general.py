"""``edgefleet model quantize`` on models shaped like the ones users bring (the fixtures of
tests/fixtures/make_general_models.py): an ``If`` with a scalar input, a dense output map with
dynamic height and width, models that are already quantized. The report must not mislead: body
nodes counted, no gain said (and refused unless allowed), dense outputs measured by error figures.
Quantized models are compared with onnxruntime running the same file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _support import MODELS, assert_one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent import load_model
from edgefleet.converters.calibration import iter_samples, stack_samples
from edgefleet.converters.report import compare_outputs, output_kind
from edgefleet.errors import BundleError, ModelError

rng = np.random.default_rng(9)


def raw_onnx(path: Path, feeds: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def quantize(capsys: Any, model: Path, out: Path, *args: str | Path) -> tuple[int, dict[str, Any] | None, str]:
    code, stdout, err = run_cli(capsys, "model", "quantize", model, "-o", out, "--json", *args)
    return code, (json.loads(stdout) if stdout.strip() else None), err


@pytest.fixture
def vad_data(tmp_path: Path) -> Path:
    """Calibration for vad_if.onnx in the sample layout: audio (N, 2, 256), the scalar sr as (N,)."""
    path = tmp_path / "vad.npz"
    np.savez(path, audio=rng.standard_normal((12, 2, 256)).astype(np.float32), sr=np.full(12, 16000, np.int64))
    return path


# --- the sample layout -----------------------------------------------------------------------------


def test_a_scalar_input_stays_a_scalar_in_every_sample() -> None:
    specs = load_model(MODELS / "vad_if.onnx").inputs
    arrays, shorthand = stack_samples(
        {"audio": np.zeros((3, 2, 256), np.float32), "sr": np.array([8000, 16000, 16000], np.int32)}, specs, "data"
    )
    assert shorthand == set() and arrays["sr"].dtype == np.int64  # int32 casts safely to the input's int64
    samples = list(iter_samples(arrays))
    assert len(samples) == 3
    assert samples[1]["sr"].shape == () and int(samples[1]["sr"]) == 16000
    assert samples[1]["audio"].shape == (2, 256) and samples[1]["audio"].flags.c_contiguous


def test_rows_of_a_batch_axis_are_the_documented_shorthand() -> None:
    specs = load_model(MODELS / "digits_cnn_float.onnx").inputs  # input [?, 1, 8, 8]
    arrays, shorthand = stack_samples({"input": np.zeros((5, 1, 8, 8), np.float32)}, specs, "data")
    assert shorthand == {"input"} and arrays["input"].shape == (5, 1, 1, 8, 8)
    stacked, shorthand = stack_samples({"input": np.zeros((5, 3, 1, 8, 8), np.float32)}, specs, "data")
    assert shorthand == set() and next(iter_samples(stacked))["input"].shape == (3, 1, 8, 8)


@pytest.mark.parametrize(
    ("arrays", "needles"),
    [
        (
            {"audio": np.zeros((4, 2, 256), np.float32), "sr": np.zeros((4, 1), np.int64)},
            ["array 'sr' has shape [4, 1]", "expected [N]", "a scalar input as (N,)"],
        ),
        (
            {"audio": np.zeros((4, 2, 255), np.float32), "sr": np.zeros(4, np.int64)},
            ["input 'audio'", "each sample must have shape [?, 256], got [2, 255]"],
        ),
        (
            {"audio": np.zeros((4, 2, 256), np.float32), "sr": np.zeros(3, np.int64)},
            ["different sample counts", "'audio': 4", "'sr': 3", "the first axis counts samples"],
        ),
        (
            {"audio": np.zeros((4, 2, 256), np.float32), "sr": np.zeros(4, np.float32)},
            ["input 'sr'", "expected dtype int64, got float32"],
        ),
    ],
    ids=["scalar with an extra axis", "wrong sample shape", "unequal counts", "wrong dtype"],
)
def test_data_off_the_layout_is_one_line_naming_the_array(
    capsys: Any, tmp_path: Path, arrays: dict[str, Any], needles: list[str]
) -> None:
    np.savez(tmp_path / "cal.npz", **arrays)
    out = tmp_path / "q.onnx"
    code, _, err = quantize(capsys, MODELS / "vad_if.onnx", out, "--calibration", tmp_path / "cal.npz")
    assert_one_line_error(code, err, "cal.npz", *needles)
    assert not out.exists()


def test_a_rank_one_input_has_no_row_shorthand() -> None:
    """A waveform ``[T]``: ``(N,)`` would be N one-value waveforms; the layout asks for ``(N, T)``."""
    from edgefleet.agent.tensors import TensorSpec

    wave = [TensorSpec("waveform", (None,), np.dtype(np.float32), None)]
    arrays, shorthand = stack_samples({"waveform": np.zeros((3, 16000), np.float32)}, wave, "wav.npz")
    assert shorthand == set() and next(iter_samples(arrays))["waveform"].shape == (16000,)
    with pytest.raises(ModelError, match=r"wav\.npz: array 'waveform' has shape \[16000\]; expected \[N, \?\]"):
        stack_samples({"waveform": np.zeros(16000, np.float32)}, wave, "wav.npz")


def test_the_layout_check_raises_the_callers_error_class() -> None:
    specs = load_model(MODELS / "vad_if.onnx").inputs
    with pytest.raises(BundleError, match=r"golden\.npz: missing input 'sr'"):
        stack_samples({"audio": np.zeros((1, 1, 256), np.float32)}, specs, "golden.npz", error=BundleError)


# --- If bodies and no gain ---------------------------------------------------------------------------


def test_if_model_with_a_scalar_input_quantizes_and_the_report_counts_its_body_nodes(
    capsys: Any, tmp_path: Path, vad_data: Path
) -> None:
    out = tmp_path / "vad_q.onnx"
    code, report, err = quantize(capsys, MODELS / "vad_if.onnx", out, "--calibration", vad_data, "--allow-no-gain")
    assert code == 0, err
    assert report is not None
    assert report["subgraph_nodes"] == 2
    bodies = [n for n in report["float_nodes"] if n.startswith("If_1/")]
    assert len(bodies) == 2 and {b.split("/")[1] for b in bodies} == {"then_branch", "else_branch"}
    assert any("inside If/Loop/Scan bodies left in float" in w for w in report["warnings"])
    assert report["gate"]["no_gain"] and report["gate"]["passed"]  # allowed, and said
    assert "warning:" in err and "--allow-no-gain" not in err
    # speech_prob [batch, 1] is one probability per row: error figures, no top-1
    assert report["top1_agreement"] is None and report["outputs"]["speech_prob"]["kind"] == "dense"
    assert report["cosine_similarity"] > 0.99 and report["max_abs_error"] < 0.05
    feeds = {"audio": rng.standard_normal((3, 256)).astype(np.float32), "sr": np.array(8000, np.int64)}
    got = load_model(out).predict(feeds)["speech_prob"]
    np.testing.assert_array_equal(got, raw_onnx(out, feeds)["speech_prob"])


def test_no_gain_exits_non_zero_and_writes_nothing_unless_allowed(capsys: Any, tmp_path: Path, vad_data: Path) -> None:
    out, rep = tmp_path / "vad_q.onnx", tmp_path / "report.json"
    code, report, err = quantize(
        capsys, MODELS / "vad_if.onnx", out, "--calibration", vad_data, "--bench-runs", "0", "--report", rep
    )
    assert_one_line_error(code, err, "vad_q.onnx", "the output is larger", "--allow-no-gain", "nothing written")
    assert not out.exists()
    saved = json.loads(rep.read_text())
    assert saved == report and saved["gate"]["passed"] is False and saved["gate"]["allow_no_gain"] is False


def if_only_graph() -> onnx.ModelProto:
    """Every float op lives in the If's bodies: the quantizer has nothing it will touch."""

    def branch(name: str, scale: float) -> onnx.GraphProto:
        w = numpy_helper.from_array((np.eye(16, 4) * scale).astype(np.float32), f"{name}.w")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}.y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, ["batch", 4])],
            initializer=[w],
        )

    nodes = [
        helper.make_node("Cast", ["flag"], ["cond"], to=TensorProto.BOOL),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("a", 1.0), else_branch=branch("b", -1.0)),
    ]
    graph = helper.make_graph(
        nodes,
        "if_only",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16]),
            helper.make_tensor_value_info("flag", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_model_the_quantizer_did_not_touch_is_reported_as_such(capsys: Any, tmp_path: Path, mode: str) -> None:
    onnx.save(if_only_graph(), tmp_path / "if_only.onnx")
    np.savez(tmp_path / "cal.npz", x=rng.random((8, 2, 16), dtype=np.float32), flag=np.ones(8, np.int64))
    out = tmp_path / "q.onnx"
    code, report, err = quantize(
        capsys, tmp_path / "if_only.onnx", out, "--mode", mode, "--calibration", tmp_path / "cal.npz",
        "--bench-runs", "0",
    )  # fmt: skip
    assert_one_line_error(code, err, "nothing was quantized (2 node(s) left in float)", "nothing written")
    assert not out.exists()
    assert report is not None and report["quantized_nodes"] == 0 and report["subgraph_nodes"] == 2
    assert sorted(report["float_nodes"]) == ["If_1/else_branch/MatMul_0 (MatMul)", "If_1/then_branch/MatMul_0 (MatMul)"]
    assert report["max_abs_error"] == 0.0  # nothing changed, and the figures say so


# --- dense outputs, dynamic dims ---------------------------------------------------------------------


def test_dense_map_output_gets_error_figures_not_a_top1(capsys: Any, tmp_path: Path) -> None:
    np.savez(tmp_path / "seg.npz", image=rng.random((6, 1, 3, 16, 24), dtype=np.float32))
    out = tmp_path / "seg_q.onnx"
    code, report, err = quantize(
        capsys, MODELS / "segmenter_dense.onnx", out, "--calibration", tmp_path / "seg.npz", "--bench-runs", "5",
        "--allow-no-gain",
    )  # fmt: skip
    assert code == 0, err
    assert report is not None
    assert report["validation"]["output"] == "mask" and report["outputs"]["mask"]["kind"] == "dense"
    assert report["top1_agreement"] is None and "top1_agreement" not in report["outputs"]["mask"]
    assert report["cosine_similarity"] > 0.99 and report["max_abs_error"] >= report["mean_abs_error"] > 0
    assert report["latency_us"]["runs"] == 5 and report["quantized_nodes"] >= 3
    model = load_model(out)
    for h, w in ((16, 24), (20, 28)):  # the quantized model keeps its dynamic height and width
        feeds = {"image": rng.random((1, 3, h, w), dtype=np.float32)}
        got = model.predict(feeds)["mask"]
        assert got.shape == (1, 4, h, w)
        np.testing.assert_array_equal(got, raw_onnx(out, feeds)["mask"])


def test_dynamic_dims_without_data_quantize_with_a_warning_instead_of_latency(capsys: Any, tmp_path: Path) -> None:
    out = tmp_path / "seg_dyn.onnx"
    code, report, err = quantize(capsys, MODELS / "segmenter_dense.onnx", out, "--mode", "dynamic", "--allow-no-gain")
    assert code == 0, err
    assert report is not None and report["latency_us"] == {"runs": 0, "before": None, "after": None}
    assert any("latency not measured" in w and "image: float32[1, 3, ?, ?]" in w for w in report["warnings"])
    assert "Traceback" not in err and out.exists()


# --- already quantized ------------------------------------------------------------------------------


@pytest.mark.parametrize("fname", ["digits_qio.onnx", "digits_cnn_int8.onnx"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_an_already_quantized_model_is_one_line(capsys: Any, tmp_path: Path, fname: str, mode: str) -> None:
    np.savez(
        tmp_path / "cal.npz", pixels=np.zeros((2, 1, 1, 8, 8), np.float32), input=np.zeros((2, 1, 8, 8), np.float32)
    )
    out = tmp_path / "q.onnx"
    code, _, err = quantize(capsys, MODELS / fname, out, "--mode", mode, "--calibration", tmp_path / "cal.npz")
    assert_one_line_error(code, err, fname, "already quantized", "DequantizeLinear", "float original")
    assert not out.exists()


def test_quantize_onnx_raises_model_error_for_an_already_quantized_model(tmp_path: Path) -> None:
    from edgefleet.converters import quantize_onnx
    from edgefleet.converters.quantize import QuantizeOptions

    with pytest.raises(ModelError, match="already quantized"):
        quantize_onnx(MODELS / "digits_qio.onnx", tmp_path / "q.onnx", QuantizeOptions(mode="dynamic"))


# --- the comparison, pure -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "sample", "kind"),
    [
        ((None, 10), (1, 10), "scores"),
        ((None, 10), (3, 10), "scores"),
        ((1, None, 12), (1, 38, 12), "dense"),
        ((1, 4, None, None), (1, 4, 16, 24), "dense"),
        ((None, 1), (2, 1), "dense"),
        (None, (1, 10), "scores"),
        (None, (2, 1), "scores"),
    ],
)
def test_output_kind_reads_the_declared_shape(shape: Any, sample: tuple[int, ...], kind: str) -> None:
    assert output_kind(np.zeros((4, *sample), np.float32), shape)[0] == kind


def test_compare_outputs_top1_per_row_and_errors_for_dense() -> None:
    before = {"logits": np.array([[[1.0, 2.0], [3.0, 0.0]]] * 2), "map": np.ones((2, 1, 4, 3, 3))}
    after = {"logits": np.array([[[1.0, 2.0], [0.0, 3.0]]] * 2), "map": np.ones((2, 1, 4, 3, 3)) * 2}
    r = compare_outputs(before, after, None, {"logits": (None, 2), "map": (1, 4, None, None)})
    assert r["compared_output"] == "logits" and r["top1_agreement"] == 0.5
    assert r["outputs"]["map"] == {
        "kind": "dense",
        "max_abs_error": 1.0,
        "mean_abs_error": 1.0,
        "cosine_similarity": 1.0,
    }
    r = compare_outputs({"map": before["map"]}, {"map": -before["map"]}, None, {"map": (1, 4, None, None)})
    assert r["compared_output"] == "map" and r["cosine_similarity"] == -1.0 and "top1_agreement" not in r


@pytest.mark.parametrize("fname", ["ocr_dynamic.tflite", "stream_state.tflite"])
def test_a_tflite_model_is_pointed_to_model_convert(capsys: Any, tmp_path: Path, fname: str) -> None:
    out = tmp_path / "q.onnx"
    code, _, err = quantize(capsys, MODELS / fname, out, "--mode", "dynamic")
    assert_one_line_error(code, err, fname, "a TFLite model", "model convert --quantize")
    assert not out.exists()
