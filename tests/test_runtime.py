"""load_model / Model.predict against the bare runtimes, on every fixture model."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from _support import DIGITS, digits_input
from ai_edge_litert.interpreter import Interpreter

from edgefleet.agent import ModelError, load_model
from edgefleet.agent.runtime import dequantize, quantize


def bare_onnx(path: Path, feeds: dict[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def bare_tflite_sample(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """One sample through the bare interpreter, quantizing by hand as a user would."""
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if inp["dtype"] != np.float32:
        scale, zp = inp["quantization"]
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.rint(x / scale) + zp, info.min, info.max).astype(inp["dtype"])
    it.set_tensor(inp["index"], x)
    it.invoke()
    y = it.get_tensor(out["index"])
    if out["dtype"] != np.float32:
        scale, zp = out["quantization"]
        y = (y.astype(np.float32) - zp) * scale
    return y


@pytest.mark.parametrize("fname", [f for f in DIGITS if f.endswith(".onnx")])
def test_onnx_digits_same_outputs_as_bare_runtime(models_dir, holdout, fname):
    x, _ = holdout
    name, layout = DIGITS[fname]
    batch = digits_input(x[:64], layout)
    model = load_model(models_dir / fname)
    got = model.predict({name: batch})["logits"]
    want = bare_onnx(models_dir / fname, {name: batch})["logits"]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fname", [f for f in DIGITS if f.endswith(".tflite")])
def test_tflite_digits_same_outputs_as_bare_runtime(models_dir, holdout, fname):
    x, _ = holdout
    name, layout = DIGITS[fname]
    model = load_model(models_dir / fname)
    for i in range(16):
        sample = digits_input(x[i : i + 1], layout)
        got = model.predict({name: sample})["output_0"]
        np.testing.assert_array_equal(got, bare_tflite_sample(models_dir / fname, sample))


@pytest.mark.parametrize("fname", list(DIGITS))
def test_digits_models_are_accurate_through_load_model(models_dir, holdout, fname):
    x, y = holdout
    name, layout = DIGITS[fname]
    model = load_model(models_dir / fname)
    # TFLite models take a dynamic batch: the interpreter is resized to the whole split.
    logits = next(iter(model.predict({name: digits_input(x, layout)}).values()))
    assert logits.dtype == np.float32
    assert float((logits.argmax(1) == y).mean()) > 0.95


def test_int8_tflite_integer_input_gives_integer_output(models_dir, holdout):
    x, _ = holdout
    model = load_model(models_dir / "digits_cnn_int8.tflite")
    spec = model.inputs[0]
    assert spec.dtype == np.int8 and spec.quantization is not None
    f = digits_input(x[:1], "nhwc")
    q = quantize(f, spec.quantization, spec.dtype)
    raw = model.predict({"image": q})["output_0"]
    assert raw.dtype == np.int8
    deq = model.predict({"image": f})["output_0"]
    np.testing.assert_allclose(dequantize(raw, model.outputs[0].quantization), deq)
    forced = model.predict({"image": q}, dequantize_outputs=True)["output_0"]
    np.testing.assert_array_equal(forced, deq)


def test_quantize_rounds_and_clips_to_the_dtype():
    from edgefleet.agent.tensors import Quantization

    q = Quantization(scale=0.5, zero_point=-128)
    x = np.array([-1000.0, 0.0, 0.26, 0.74, 1000.0], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, q, np.dtype(np.int8)), np.array([-128, -128, -127, -127, 127], np.int8))
    u = Quantization(scale=1.0, zero_point=0)
    np.testing.assert_array_equal(
        quantize(np.array([-3.0, 255.7]), u, np.dtype(np.uint8)), np.array([0, 255], np.uint8)
    )


def _multi_feeds(batch: int, n: int, scale: int) -> dict[str, Any]:
    rng = np.random.default_rng(batch * 31 + n)
    return {"features": rng.standard_normal((batch, n)).astype(np.float32), "scale": np.array(scale, dtype=np.int64)}


@pytest.mark.parametrize(("batch", "n"), [(1, 1), (3, 5), (7, 2), (1, 9)])
def test_multi_io_onnx_dynamic_dims_and_int64_scalar(models_dir, batch, n):
    model = load_model(models_dir / "multi_io.onnx")
    assert {s.name: s.shape for s in model.inputs} == {"features": (None, None), "scale": ()}
    feeds = _multi_feeds(batch, n, 3)
    got = model.predict(feeds)
    want = bare_onnx(models_dir / "multi_io.onnx", feeds)
    assert set(got) == {"weighted", "total", "best"}
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert got["best"].dtype == np.int64


@pytest.mark.parametrize(("batch", "n"), [(1, 1), (3, 5), (7, 2), (3, 5), (1, 9)])
def test_multi_io_tflite_resizes_for_dynamic_dims(models_dir, batch, n):
    model = load_model(models_dir / "multi_io.tflite")
    feeds = _multi_feeds(batch, n, 2)
    got = model.predict(feeds)
    weighted = feeds["features"] * 2 + 0.5
    np.testing.assert_allclose(got["weighted"], weighted, rtol=1e-6)
    np.testing.assert_allclose(got["total"], weighted.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(got["best"], weighted.argmax(1))
    # The ONNX twin agrees.
    onnx_out = load_model(models_dir / "multi_io.onnx").predict(feeds)
    np.testing.assert_allclose(got["total"], onnx_out["total"], rtol=1e-5)


def test_python_scalars_and_lists_are_accepted(models_dir):
    model = load_model(models_dir / "multi_io.onnx")
    out = model.predict({"features": [[1.0, 2.0]], "scale": 2})
    np.testing.assert_allclose(out["weighted"], [[2.5, 4.5]])


def test_tflite_raw_tensor_names_are_aliases(models_dir):
    model = load_model(models_dir / "multi_io.tflite")
    out = model.predict({"serving_default_features:0": np.ones((1, 2), np.float32), "scale": 1})
    np.testing.assert_allclose(out["weighted"], [[1.5, 1.5]])


def test_outputs_can_be_selected(models_dir):
    model = load_model(models_dir / "multi_io.onnx")
    out = model.predict(_multi_feeds(2, 3, 1), outputs=["total"])
    assert list(out) == ["total"]


def test_concurrent_predicts_on_tflite_are_safe(models_dir):
    model = load_model(models_dir / "multi_io.tflite")
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(50):
                feeds = _multi_feeds(1 + (k + i) % 4, 1 + (k * i) % 5, k)
                got = model.predict(feeds)
                np.testing.assert_allclose(got["weighted"], feeds["features"] * k + 0.5, rtol=1e-6)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_threads_option_reaches_the_runtime(models_dir):
    assert load_model(models_dir / "digits_cnn_float.tflite", threads=1).info()["threads"] == 1
    assert load_model(models_dir / "digits_cnn_float.onnx", threads=2).info()["threads"] == 2


def test_backend_detected_from_content_when_suffix_is_unknown(models_dir, tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes((models_dir / "digits_cnn_float.tflite").read_bytes())
    assert load_model(p).backend.name == "litert"
    q = tmp_path / "other.bin"
    q.write_bytes((models_dir / "multi_io.onnx").read_bytes())
    assert load_model(q).backend.name == "onnxruntime"


# --- errors name the tensor or file, what was expected and what was given ------------------------


@pytest.fixture(scope="module")
def multi(models_dir):
    return {"onnx": load_model(models_dir / "multi_io.onnx"), "tflite": load_model(models_dir / "multi_io.tflite")}


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_missing_input_is_named(multi, kind):
    with pytest.raises(ModelError, match=r"missing input\(s\) \['scale'\]"):
        multi[kind].predict({"features": np.ones((1, 2), np.float32)})


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_unknown_input_name_lists_the_real_ones(multi, kind):
    with pytest.raises(ModelError, match=r"unknown input 'feature'.*'features'"):
        multi[kind].predict({"feature": np.ones((1, 2), np.float32), "scale": 1})


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_wrong_rank_names_tensor_expected_and_given(multi, kind):
    with pytest.raises(
        ModelError, match=r"input 'features': expected shape \[\?, \?\], got \[4\] \(rank 2, got rank 1\)"
    ):
        multi[kind].predict({"features": np.ones(4, np.float32), "scale": 1})


def test_wrong_fixed_dim_names_tensor_expected_and_given(models_dir):
    model = load_model(models_dir / "digits_cnn_float.onnx")
    with pytest.raises(ModelError, match=r"input 'input': expected shape \[\?, 1, 8, 8\], got \[1, 1, 8, 9\]"):
        model.predict({"input": np.zeros((1, 1, 8, 9), np.float32)})


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_wrong_dtype_names_tensor_expected_and_given(multi, kind):
    with pytest.raises(ModelError, match=r"input 'scale': expected dtype int64, got float32"):
        multi[kind].predict({"features": np.ones((1, 2), np.float32), "scale": np.float32(2.0)})
    with pytest.raises(ModelError, match=r"input 'features': expected dtype float32, got <U1"):
        multi[kind].predict({"features": np.array([["a"]]), "scale": 1})


def test_non_finite_values_refused_for_quantized_input(models_dir):
    model = load_model(models_dir / "digits_cnn_int8.tflite")
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 3, 3, 0] = np.nan
    with pytest.raises(ModelError, match=r"input 'image': non-finite values .* int8"):
        model.predict({"image": x})


def test_wrong_integer_dtype_for_quantized_input_is_refused(models_dir):
    model = load_model(models_dir / "digits_cnn_int8.tflite")
    with pytest.raises(ModelError, match=r"input 'image': expected dtype int8 \(or float, quantized"):
        model.predict({"image": np.zeros((1, 8, 8, 1), np.uint8)})


def test_ragged_input_is_refused(multi):
    with pytest.raises(ModelError, match="input 'features'"):
        multi["onnx"].predict({"features": [[1.0], [1.0, 2.0]], "scale": 1})


def test_inputs_must_be_a_mapping(multi):
    with pytest.raises(ModelError, match="mapping"):
        multi["onnx"].predict([np.ones((1, 2))])  # type: ignore[arg-type]


def test_unknown_output_is_named(multi):
    with pytest.raises(ModelError, match=r"unknown output\(s\) \['nope'\]"):
        multi["onnx"].predict({"features": np.ones((1, 2), np.float32), "scale": 1}, outputs=["nope"])


@pytest.mark.parametrize("suffix", [".onnx", ".tflite"])
def test_corrupt_model_file_names_the_path(tmp_path, models_dir, suffix):
    good = (models_dir / f"digits_cnn_float{suffix}").read_bytes()
    p = tmp_path / f"broken{suffix}"
    p.write_bytes(good[: len(good) // 3])
    with pytest.raises(ModelError, match=rf"{p}: not a loadable"):
        load_model(p)


def test_garbage_file_with_unknown_suffix_names_the_path(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelError, match=rf"{p}: not a loadable ONNX model"):
        load_model(p)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ModelError, match=rf"{tmp_path / 'nope.onnx'}: no such model file"):
        load_model(tmp_path / "nope.onnx")


def test_unknown_option_and_backend_are_named(models_dir):
    with pytest.raises(ModelError, match=r"unknown option\(s\) \['turbo'\]"):
        load_model(models_dir / "multi_io.onnx", turbo=True)
    with pytest.raises(ModelError, match=r"backend: expected one of"):
        load_model(models_dir / "multi_io.onnx", backend="tensorrt")
    with pytest.raises(ModelError, match=r"threads: expected a positive integer"):
        load_model(models_dir / "multi_io.onnx", threads=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # LiteRT Delegate.__del__ bug
def test_missing_delegate_library_is_named(models_dir):
    with pytest.raises(ModelError, match=r"cannot load delegate 'libedgetpu-missing\.so\.1'"):
        load_model(models_dir / "digits_cnn_int8.tflite", delegates=["libedgetpu-missing.so.1"])


def test_unavailable_execution_provider_is_named(models_dir):
    with pytest.raises(ModelError, match=r"execution provider\(s\) \['TensorrtExecutionProvider'\] not available"):
        load_model(models_dir / "multi_io.onnx", delegates=["TensorrtExecutionProvider"])


def test_sklearn_zipmap_output_is_passed_through(tmp_path, holdout):
    """A scikit-learn classifier exported with ZipMap: probabilities are a sequence of maps."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = holdout
    flat = (x.reshape(len(x), -1) / 16).astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(flat, y)
    path = tmp_path / "logreg.onnx"
    path.write_bytes(to_onnx(clf, flat[:1]).SerializeToString())
    model = load_model(path)
    assert [o.dtype for o in model.outputs] == [np.dtype(np.int64), np.dtype(object)]
    out = model.predict({model.inputs[0].name: flat[:3]})
    labels, probs = out["output_label"], out["output_probability"]
    np.testing.assert_array_equal(labels, clf.predict(flat[:3]))
    assert probs.shape == (3,) and set(probs[0]) == set(range(10))
    assert abs(sum(probs[0].values()) - 1) < 1e-4
