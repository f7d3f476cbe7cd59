"""``edgefleet model convert`` through the CLI: Keras to TFLite, torch and scikit-learn to ONNX.

TensorFlow and PyTorch are optional extras: their tests skip (saying why) when one is missing, and
fail instead when ``CI=true``, where both must be installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import assert_one_line_error, run_cli

from edgefleet.agent import load_model

# Keras (numpy 2 __array__) and torch.jit (superseded by torch.export) warn about themselves.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def need(module: str, extra: str) -> None:
    """Skip without ``module`` (saying how to get it), or fail under ``CI=true``, where ``make test`` installs it."""
    if importlib.util.find_spec(module) is None:
        reason = (
            f"{module} is not installed: `make test-full` installs it into .venv "
            f"(or .venv/bin/pip install -e '.[{extra}]'; CI=true make test does it too)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the {extra} converters: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory: pytest.TempPathFactory, digits: Any) -> tuple[Path, Path]:
    """A tiny Keras CNN on 8x8 digits (a few seconds of training) and a data .npz keyed "image"."""
    need("tensorflow", "convert-tf")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    x, y = digits
    tf.keras.utils.set_random_seed(1)
    model = tf.keras.Sequential(
        [
            tf.keras.layers.Input((8, 8, 1), name="image"),
            tf.keras.layers.Conv2D(8, 3, activation="relu"),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10),
        ]
    )
    model.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:1200, ..., None], y[:1200], epochs=4, batch_size=64, verbose=0)
    d = tmp_path_factory.mktemp("keras")
    model.save(d / "cnn.keras")
    np.savez(d / "data.npz", image=x[1200:, ..., None], y=y[1200:])
    return d / "cnn.keras", d / "data.npz"


@pytest.mark.parametrize("io_type", ["int8", "uint8"])
def test_keras_to_full_integer_tflite_runs_through_load_model(
    capsys: Any, tmp_path: Path, keras_model: Any, io_type: str
) -> None:
    src, data = keras_model
    out = tmp_path / f"cnn_{io_type}.tflite"
    code, stdout, err = run_cli(
        capsys, "model", "convert", src, "-o", out, "--quantize", "int8", "--io-type", io_type,
        "--representative", data, "--labels", "y", "--max-accuracy-drop", "3", "--bench-runs", "20", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["settings"] == {"from": "keras", "quantize": "int8", "io_type": io_type}
    assert report["float_nodes"] == [] and report["quantized_nodes"] >= 3  # full integer: nothing left in float
    assert report["size_bytes"]["ratio"] > 1.5
    assert report["top1_agreement"] > 0.95 and report["accuracy"]["before"] > 0.8
    model = load_model(out)
    (spec,) = model.inputs
    assert spec.dtype == np.dtype(io_type) and spec.quantization is not None
    assert model.outputs[0].dtype == np.dtype(io_type)
    with np.load(data) as z:
        x, y = z["image"], z["y"]
    logits = model.predict({"image": x[:64]})["output_0"]  # float in, dequantized float out
    assert logits.dtype == np.float32 and (logits.argmax(1) == y[:64]).mean() > 0.8


@pytest.mark.parametrize(("mode", "still_float"), [("none", True), ("dynamic", True), ("float16", True)])
def test_keras_float_dynamic_and_float16_tflite(
    capsys: Any, tmp_path: Path, keras_model: Any, mode: str, still_float: bool
) -> None:
    src, data = keras_model
    out = tmp_path / f"cnn_{mode}.tflite"
    code, stdout, err = run_cli(
        capsys, "model", "convert", src, "-o", out, "--quantize", mode, "--validation", data, "--labels", "y",
        "--bench-runs", "10", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert bool(report["float_nodes"]) is still_float  # dynamic-range ops keep float activations
    assert (report["size_bytes"]["ratio"] > 1.2) is (mode != "none")
    assert report["top1_agreement"] > 0.95
    assert load_model(out).inputs[0].dtype == np.float32


def test_bad_representative_data_is_one_line_and_writes_nothing(capsys: Any, tmp_path: Path, keras_model: Any) -> None:
    src, data = keras_model
    with np.load(data) as z:
        np.savez(tmp_path / "rep.npz", image=z["image"].astype(np.float64))
    out = tmp_path / "out.tflite"
    code, _, err = run_cli(
        capsys, "model", "convert", src, "-o", out, "--quantize", "int8", "--representative", tmp_path / "rep.npz"
    )
    assert_one_line_error(code, err, "input 'image'", "expected dtype float32, got float64")
    assert not out.exists()


@pytest.fixture(scope="module")
def torch_lstm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript LSTM classifier: [batch, 6, 4] -> [batch, 3]."""
    need("torch", "convert-torch")
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(4, 16, batch_first=True)
            self.fc = torch.nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])  # type: ignore[no-any-return]

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torch") / "lstm.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(Net().eval()).save(str(path))
    return path


def test_torch_lstm_to_onnx_has_a_dynamic_batch(capsys: Any, tmp_path: Path, torch_lstm: Path) -> None:
    import torch

    out = tmp_path / "lstm.onnx"
    code, stdout, err = run_cli(
        capsys, "model", "convert", torch_lstm, "-o", out, "--input-shape", "x:1,6,4", "--bench-runs", "10", "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["settings"]["from"] == "torch"
    model = load_model(out)
    assert model.inputs[0].name == "x" and model.inputs[0].shape == (None, 6, 4)
    reference = torch.jit.load(str(torch_lstm))
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 6, 4)).astype(np.float32)
        got = model.predict({"x": x})["output"]
        with torch.no_grad():
            want = reference(torch.from_numpy(x)).numpy()
        assert got.shape == (batch, 3)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_torch_to_onnx_quantized_dynamic_on_the_way(capsys: Any, tmp_path: Path, torch_lstm: Path) -> None:
    np.savez(tmp_path / "seq.npz", input=np.random.default_rng(0).standard_normal((32, 6, 4)).astype(np.float32))
    out = tmp_path / "lstm_dyn.onnx"
    code, stdout, err = run_cli(
        capsys, "model", "convert", torch_lstm, "-o", out, "--quantize", "dynamic", "--validation",
        tmp_path / "seq.npz", "--bench-runs", "10", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["quantized_nodes"] >= 2 and report["top1_agreement"] > 0.9  # the LSTM and the Linear
    assert load_model(out).predict({"input": np.zeros((5, 6, 4), np.float32)})["output"].shape == (5, 3)


def test_sklearn_mlp_to_onnx_without_zipmap(capsys: Any, tmp_path: Path) -> None:
    import joblib
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    d = load_digits()
    x, y = (d.data / 16).astype(np.float32), d.target
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joblib.dump(MLPClassifier((16,), max_iter=40, random_state=0).fit(x[:1200], y[:1200]), tmp_path / "mlp.pkl")
    np.savez(tmp_path / "val.npz", input=x[1200:], y=y[1200:])
    out = tmp_path / "mlp.onnx"
    code, stdout, err = run_cli(
        capsys, "model", "convert", tmp_path / "mlp.pkl", "-o", out, "--validation", tmp_path / "val.npz",
        "--labels", "y", "--bench-runs", "10", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["accuracy"]["before"] > 0.8 and report["top1_agreement"] == 1.0
    model = load_model(out)
    assert [o.name for o in model.outputs] == ["label", "probabilities"]
    assert model.outputs[1].dtype == np.float32  # a tensor, not ZipMap's list of dicts


BLOCKER = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"tensorflow", "torch"}:
            raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, Refuse())
from edgefleet.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    ("name", "extra"), [("model.keras", "convert-tf"), ("saved", "convert-tf"), ("model.pt", "convert-torch")]
)
def test_missing_framework_names_the_extra_to_install(tmp_path: Path, name: str, extra: str) -> None:
    src = tmp_path / name
    if name == "saved":
        src.mkdir()
    else:
        src.write_bytes(b"not really a model: the framework is needed first")
    out = tmp_path / ("out.onnx" if extra == "convert-torch" else "out.tflite")
    r = subprocess.run(
        [sys.executable, "-c", BLOCKER, "model", "convert", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert_one_line_error(r.returncode, r.stderr, f"[{extra}] extra")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["m.keras", "-o", "m.onnx"], "the output must end in .tflite"),
        (["m.keras", "-o", "m.tflite", "--io-type", "int8"], "--io-type int8: needs a full-integer"),
        (["m.keras", "-o", "m.tflite", "--quantize", "int8"], "needs --representative"),
        (["m.pkl", "-o", "m.onnx", "--quantize", "float16"], "TFLite only"),
        (["m.bin", "-o", "m.onnx"], "cannot tell the framework"),
        (["m.pt", "-o", "m.onnx", "--input-shape", "1,a"], "--input-shape"),
    ],
)
def test_convert_options_that_do_not_fit_are_one_line(
    capsys: Any, tmp_path: Path, args: list[str], needle: str
) -> None:
    (tmp_path / args[0]).write_bytes(b"x")
    code, _, err = run_cli(capsys, "model", "convert", *[str(tmp_path / a) if "." in a else a for a in args])
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == [args[0]]
