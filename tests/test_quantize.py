"""``edgefleet model quantize`` through the CLI: real models quantize, bad input fails in one line.

Models are tiny and built here: an MLP exported by skl2onnx, an ONNX LSTM graph, the committed
digits CNN, and a graph with a custom-domain op. Every failure must leave no file behind.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from _support import MODELS, assert_one_line_error, run_cli
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent import load_model

REPORT_KEYS = {
    "command",
    "source",
    "output",
    "before",
    "settings",
    "size_bytes",
    "latency_us",
    "validation",
    "top1_agreement",
    "accuracy",
    "max_abs_error",
    "mean_abs_error",
    "cosine_similarity",
    "outputs",
    "float_nodes",
    "quantized_nodes",
    "subgraph_nodes",
    "warnings",
    "gate",
}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> tuple[Path, Path]:
    """An MLP classifier exported by skl2onnx (no ZipMap), and a validation .npz with labels."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    x, y = digits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a few iterations are plenty here
        clf = MLPClassifier((24,), max_iter=60, random_state=0).fit(x[:1200], y[:1200])
    d = tmp_path_factory.mktemp("mlp")
    model = convert_sklearn(
        clf, initial_types=[("input", FloatTensorType([None, 64]))], options={"zipmap": False}, target_opset=17
    )
    onnx.save(model, d / "mlp.onnx")
    np.savez(d / "val.npz", input=x[1200:], y=y[1200:])
    return d / "mlp.onnx", d / "val.npz"


def lstm_graph() -> onnx.ModelProto:
    """x [batch, 6, 4] -> LSTM(hidden 8) -> last step -> Gemm -> [batch, 3]."""
    rng = np.random.default_rng(3)
    h = 8

    def w(*shape: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal(shape) * 0.4).astype(np.float32)

    inits = [
        numpy_helper.from_array(w(1, 4 * h, 4), "W"),
        numpy_helper.from_array(w(1, 4 * h, h), "R"),
        numpy_helper.from_array(w(1, 8 * h), "B"),
        numpy_helper.from_array(w(h, 3), "fc.w"),
        numpy_helper.from_array(w(3), "fc.b"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"),
        helper.make_node("LSTM", ["xt", "W", "R", "B"], ["", "h_last"], hidden_size=h, name="lstm"),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["h"], name="squeeze"),
        helper.make_node("Gemm", ["h", "fc.w", "fc.b"], ["y"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "lstm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def lstm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("lstm")
    onnx.save(lstm_graph(), d / "lstm.onnx")
    np.savez(d / "seq.npz", x=np.random.default_rng(0).standard_normal((48, 6, 4)).astype(np.float32))
    return d / "lstm.onnx", d / "seq.npz"


def custom_op_graph() -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Swish", ["h"], ["y"], name="swish1", domain="com.acme"),
    ]
    graph = helper.make_graph(
        nodes,
        "custom",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.acme", 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_skl2onnx_mlp_quantizes_through_the_cli(capsys: Any, tmp_path: Path, mlp: Any, mode: str) -> None:
    model, val = mlp
    out = tmp_path / f"mlp_{mode}.onnx"
    code, stdout, err = run_cli(
        capsys, "model", "quantize", model, "-o", out, "--mode", mode, "--calibration", val, "--labels", "y",
        "--max-accuracy-drop", "3", "--bench-runs", "20", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["settings"]["mode"] == mode
    assert report["quantized_nodes"] >= 2  # both MatMul/Gemm layers
    assert report["top1_agreement"] > 0.95
    assert report["accuracy"]["drop_points"] <= 3 and report["gate"]["passed"]
    m = load_model(out)
    probs = m.predict({"input": np.load(val)["input"][:5]})["probabilities"]
    assert probs.shape == (5, 10) and np.allclose(probs.sum(1), 1, atol=0.05)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_lstm_graph_quantizes_and_the_report_says_what_stayed_float(
    capsys: Any, tmp_path: Path, lstm: Any, mode: str
) -> None:
    model, seq = lstm
    out = tmp_path / "lstm_q.onnx"
    # Weights this small grow with their scales and Q/DQ nodes: --allow-no-gain writes it anyway.
    code, stdout, err = run_cli(
        capsys, "model", "quantize", model, "-o", out, "--mode", mode, "--calibration", seq, "--bench-runs", "10",
        "--allow-no-gain", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["max_abs_error"] < 0.1 and report["top1_agreement"] > 0.9
    assert report["gate"]["allow_no_gain"] and report["gate"]["passed"]
    assert report["warnings"] == report["gate"]["no_gain"]
    if report["gate"]["no_gain"]:
        assert "the output is larger" in report["gate"]["no_gain"][0]
        assert "warning:" in err and "the output is larger" in err
    ops = {n.op_type for n in onnx.load(out).graph.node}
    if mode == "dynamic":  # onnxruntime has an integer LSTM only for dynamic quantization
        assert "DynamicQuantizeLSTM" in ops and "lstm (LSTM)" not in report["float_nodes"]
    else:
        assert "lstm (LSTM)" in report["float_nodes"] and "DequantizeLinear" in ops
    y = load_model(out).predict({"x": np.load(seq)["x"][:5]})["y"]
    assert y.shape == (5, 3)


def test_report_json_has_every_field_and_matches_the_report_file(capsys: Any, tmp_path: Path, mlp: Any) -> None:
    model, val = mlp
    out, rep = tmp_path / "q.onnx", tmp_path / "report.json"
    code, stdout, err = run_cli(
        capsys, "model", "quantize", model, "-o", out, "--calibration", val, "--labels", "y", "--per-channel",
        "--method", "percentile", "--bench-runs", "20", "--report", rep, "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert set(report) == REPORT_KEYS
    assert json.loads(rep.read_text()) == report
    assert set(report["size_bytes"]) == {"before", "after", "ratio"}
    assert report["size_bytes"]["after"] == out.stat().st_size
    assert set(report["latency_us"]["before"]) == set(report["latency_us"]["after"]) == {"p50", "p99"}
    assert report["latency_us"]["runs"] == 20
    assert report["validation"] == {"data": str(val), "samples": 597, "output": "probabilities"}
    assert report["outputs"]["probabilities"]["kind"] == "scores"
    assert 0.99 < report["cosine_similarity"] <= 1.0 and report["subgraph_nodes"] == 0 and report["warnings"] == []
    assert set(report["accuracy"]) == {"before", "after", "drop_points"}
    assert all(0 <= report["accuracy"][k] <= 1 for k in ("before", "after"))
    assert report["max_abs_error"] >= report["mean_abs_error"] >= 0
    assert isinstance(report["float_nodes"], list)
    assert report["gate"] == {"max_accuracy_drop": None, "allow_no_gain": False, "no_gain": [], "passed": True}


def test_table_output_and_image_folder_calibration_through_a_pipeline(
    capsys: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cv2

    from edgefleet.cli import convert as convert_cli

    # what the table says, not how it wraps: the width rich finds depends on the terminal (none under CI or
    # an xdist worker) and the long tmp path in the table shrinks its other columns at 80 columns
    monkeypatch.setattr(convert_cli.console, "_width", 200)  # what the width setter sets; restored to None

    with np.load(MODELS / "digits_holdout.npz") as z:
        x = z["x"]
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        cv2.imwrite(str(images / f"{i:03d}.png"), (x[i] * 15).astype(np.uint8))  # 0..240 grey
    (tmp_path / "pipe.toml").write_text(
        '[[preprocess]]\nop = "color"\nsource = "bgr"\ntarget = "gray"\n'
        '[[preprocess]]\nop = "scale"\nfactor = 0.0041666\n'
        '[[preprocess]]\nop = "layout"\ntarget = "nchw"\n'
    )
    out = tmp_path / "cnn_int8.onnx"
    code, stdout, err = run_cli(
        capsys, "model", "quantize", MODELS / "digits_cnn_float.onnx", "-o", out, "--calibration", images,
        "--pipeline", tmp_path / "pipe.toml", "--per-channel", "--bench-runs", "10",
    )  # fmt: skip
    assert code == 0, err
    text = " ".join(stdout.split())  # rich wraps long lines
    assert "size (bytes)" in text and "top-1 agreement" in text and "wrote" in text and "cnn_int8.onnx (" in text
    assert out.stat().st_size * 3 < (MODELS / "digits_cnn_float.onnx").stat().st_size


BAD_DATA = {
    # case: (arrays to save, or None for an empty image folder; what the one line must say)
    "missing input": ({"inputs": np.zeros((4, 64), np.float32)}, ["missing input 'input'", "['inputs']"]),
    "wrong shape": ({"input": np.zeros((4, 63), np.float32)}, ["input 'input'", "shape [1, 64], got [1, 63]"]),
    "wrong rank": ({"input": np.zeros((4, 8, 8), np.float32)}, ["input 'input'", "shape [?, 64], got [8, 8]"]),
    "wrong layout": (
        {"input": np.zeros((4, 2, 8, 8), np.float32)},
        ["array 'input' has shape [4, 2, 8, 8]", "expected [N, ?, 64]", "new leading axis"],
    ),
    "wrong dtype": ({"input": np.zeros((4, 64), np.float64)}, ["input 'input'", "expected dtype float32, got float64"]),
    "no samples": ({"input": np.zeros((0, 64), np.float32)}, ["empty calibration set", "'input' has no samples"]),
    "no arrays": ({}, ["empty calibration set", "no arrays"]),
    "NaN": ({"input": np.full((4, 64), np.nan, np.float32)}, ["input 'input'", "NaN"]),
    "empty folder": (None, ["empty calibration set", "no images"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_calibration_data_is_one_line_naming_the_input_and_writes_nothing(
    capsys: Any, tmp_path: Path, mlp: Any, case: str
) -> None:
    arrays, needles = BAD_DATA[case]
    data = tmp_path / "cal"
    if arrays is None:
        data.mkdir()
    else:
        data = data.with_suffix(".npz")
        np.savez(data, **arrays)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run_cli(capsys, "model", "quantize", mlp[0], "-o", out_dir / "q.onnx", "--calibration", data)
    assert_one_line_error(code, err, *needles)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_custom_domain_op_is_refused_in_one_line(capsys: Any, tmp_path: Path, mode: str) -> None:
    onnx.save(custom_op_graph(), tmp_path / "custom.onnx")
    np.savez(tmp_path / "cal.npz", x=np.ones((4, 8), np.float32))
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(
        capsys, "model", "quantize", tmp_path / "custom.onnx", "-o", out, "--mode", mode, "--calibration",
        tmp_path / "cal.npz",
    )  # fmt: skip
    assert_one_line_error(code, err, "node 'swish1'", "com.acme::Swish", "no kernel")
    assert not out.exists()


def test_accuracy_gate_fails_in_one_line_and_writes_no_model(capsys: Any, tmp_path: Path, mlp: Any) -> None:
    model, val = mlp
    # Calibrating on inputs 100x smaller than real ones clips every activation: accuracy collapses.
    np.savez(tmp_path / "tiny.npz", input=np.load(val)["input"][:50] * 0.01)
    out, rep = tmp_path / "q.onnx", tmp_path / "report.json"
    code, stdout, err = run_cli(
        capsys, "model", "quantize", model, "-o", out, "--calibration", tmp_path / "tiny.npz", "--validation", val,
        "--labels", "y", "--max-accuracy-drop", "1", "--bench-runs", "0", "--report", rep,
    )  # fmt: skip
    assert_one_line_error(code, err, "accuracy fell", "--max-accuracy-drop 1", "nothing written")
    assert not out.exists()
    report = json.loads(rep.read_text())  # the report still says why
    assert report["gate"] == {"max_accuracy_drop": 1.0, "allow_no_gain": False, "no_gain": [], "passed": False}
    assert report["accuracy"]["drop_points"] > 1
    assert "FAILED" in stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "--calibration: static quantization needs calibration data"),
        (["--mode", "dynamic", "--method", "entropy"], "apply to static quantization"),
        (["--calibration", "VAL", "--exclude", "nope"], "--exclude: no node named ['nope']"),
        (["--calibration", "VAL", "--max-accuracy-drop", "1"], "needs --labels"),
        (["--calibration", "VAL", "--labels", "z"], "--labels: 'z' is neither"),
    ],
)
def test_options_that_do_not_fit_are_one_line(
    capsys: Any, tmp_path: Path, mlp: Any, args: list[str], needle: str
) -> None:
    args = [str(mlp[1]) if a == "VAL" else a for a in args]
    code, _, err = run_cli(capsys, "model", "quantize", mlp[0], "-o", tmp_path / "q.onnx", *args)
    assert_one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_not_an_onnx_file_is_one_line(capsys: Any, tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    code, _, err = run_cli(
        capsys, "model", "quantize", tmp_path / "junk.onnx", "-o", tmp_path / "q.onnx", "--mode", "dynamic"
    )
    assert_one_line_error(code, err, "junk.onnx")
    assert not (tmp_path / "q.onnx").exists()


def test_quantized_node_without_a_kernel_is_named_with_a_way_out(tmp_path: Path) -> None:
    """onnxruntime has no QLinearMatMul for int8 activations with uint8 weights: the check that loads
    every quantized model before writing it must say which node and what to do."""
    from edgefleet.converters.quantize import QuantizeOptions, _load_quantized
    from edgefleet.errors import ModelError

    s8, u8 = TensorProto.INT8, TensorProto.UINT8
    inits = [
        helper.make_tensor("xs", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("xz", s8, [], [0]),
        helper.make_tensor("w", u8, [2, 2], [1, 2, 3, 4]),
        helper.make_tensor("ws", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("wz", u8, [], [0]),
        helper.make_tensor("ys", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("yz", s8, [], [0]),
    ]
    node = helper.make_node("QLinearMatMul", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], name="fc_quant")
    graph = helper.make_graph(
        [node],
        "s8u8",
        [helper.make_tensor_value_info("x", s8, ["batch", 2])],
        [helper.make_tensor_value_info("y", s8, ["batch", 2])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "q.onnx")
    with pytest.raises(ModelError) as e:
        _load_quantized(tmp_path / "q.onnx", Path("model.onnx"), QuantizeOptions(fmt="qoperator"))
    msg = str(e.value)
    assert "\n" not in msg
    assert "node 'fc_quant' quantized to QLinearMatMul" in msg and "no kernel" in msg and "--format qdq" in msg
