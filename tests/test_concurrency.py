"""Concurrent calls of one model: a pool of LiteRT interpreters for a stateless model, ONE for a
stateful model (its state lives inside it), one thread-safe ONNX Runtime session; and the rule that
picks ONNX Runtime's intra-op threads and spinning. Outputs are compared with the raw runtimes; no
timing assertions (the figures are in bench/api_roundtrip.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from _support import MODELS, digits_input, wait_until
from ai_edge_litert.interpreter import Interpreter
from onnx import TensorProto, helper, numpy_helper

from edgefleet.agent import ModelError, load_model
from edgefleet.agent.backends.litert import MAX_POOL, default_pool_size
from edgefleet.agent.backends.onnx import SINGLE_THREAD_BELOW, choose_threads

HANG_GUARD = 60.0  # seconds a joined thread may take before the test calls it a deadlock


def raw_tflite(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(inp["index"], x)
    it.invoke()
    return it.get_tensor(out["index"]).copy()


def run_threads(work: Any, n: int) -> list[BaseException]:
    """``work(k)`` on ``n`` threads released together; the errors they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def body(k: int) -> None:
        try:
            start.wait(HANG_GUARD)
            work(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_GUARD)
        assert not t.is_alive(), "a predict never returned (deadlock?)"
    return errors


def digits_samples(holdout: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]], n: int) -> list[np.ndarray[Any, Any]]:
    x, _ = holdout
    return [digits_input(x[i : i + 1], "nhwc") for i in range(n)]


def test_two_threads_predicting_on_a_tflite_model_at_once_both_get_the_raw_runtimes_outputs(holdout):
    path = MODELS / "digits_cnn_float.tflite"
    model = load_model(path, pool_size=2)
    assert model.backend.thread_safe  # no lock around the pool: the two calls may overlap
    samples = digits_samples(holdout, 24)
    want = [raw_tflite(path, x) for x in samples]

    def work(k: int) -> None:
        for _ in range(20):
            for i in range(k, len(samples), 2):
                np.testing.assert_array_equal(model.predict({"image": samples[i]})["output_0"], want[i])

    assert not run_threads(work, 2)
    assert model.info()["interpreters"] <= 2


def test_a_predict_runs_while_another_call_holds_an_interpreter(holdout):
    """What one interpreter behind a lock could not do: with the first interpreter busy, a second
    call completes on a second one, built on demand."""
    path = MODELS / "digits_cnn_float.tflite"
    model = load_model(path, pool_size=2)
    backend = model.backend
    held = backend._acquire()  # a call in progress, as far as the pool can tell
    try:
        x = digits_samples(holdout, 1)[0]
        got: list[np.ndarray[Any, Any]] = []
        t = threading.Thread(target=lambda: got.append(model.predict({"image": x})["output_0"]))
        t.start()
        t.join(HANG_GUARD)
        assert not t.is_alive(), "the second call waited for the busy interpreter"
        np.testing.assert_array_equal(got[0], raw_tflite(path, x))
        assert backend.instances == 2
    finally:
        backend._release(held)


def test_pool_never_grows_past_its_size_and_a_waiting_call_runs_once_one_is_free(holdout):
    path = MODELS / "digits_cnn_float.tflite"
    model = load_model(path, pool_size=2)
    backend = model.backend
    held = [backend._acquire(), backend._acquire()]
    x = digits_samples(holdout, 1)[0]
    got: list[np.ndarray[Any, Any]] = []
    t = threading.Thread(target=lambda: got.append(model.predict({"image": x})["output_0"]))
    t.start()
    backend._release(held.pop())
    t.join(HANG_GUARD)
    backend._release(held.pop())
    assert not t.is_alive()
    np.testing.assert_array_equal(got[0], raw_tflite(path, x))
    assert backend.instances == 2


def test_dynamic_shapes_on_several_interpreters_match_the_raw_runtime():
    path = MODELS / "multi_io.tflite"
    model = load_model(path, pool_size=3)

    def work(k: int) -> None:
        rng = np.random.default_rng(k)
        for i in range(40):
            feats = rng.random((1 + (k + i) % 4, 1 + (k * i) % 5), dtype=np.float32)
            got = model.predict({"scale": np.int64(k + 1), "features": feats})
            np.testing.assert_allclose(got["weighted"], feats * (k + 1) + 0.5, rtol=1e-6)

    assert not run_threads(work, 3)
    assert model.info()["interpreters"] <= 3


def test_stateful_model_keeps_one_interpreter_and_serialises_concurrent_calls():
    """Every call advances the one state by one frame: across two threads the frame counters are
    1..N, each once, and each call's energy is the raw runtime's after that many frames."""
    path = MODELS / "stream_state.tflite"
    model = load_model(path, pool_size=4)
    assert model.stateful and model.info()["pool_size"] == 1 and not model.backend.thread_safe
    frame = {"frame": np.full((1, 64), 0.5, np.float32), "gain": np.float32(1.0)}
    per_thread = 30
    seen: list[tuple[int, float]] = []
    lock = threading.Lock()

    def work(k: int) -> None:
        for _ in range(per_thread):
            out = model.predict(frame)
            with lock:
                seen.append((int(out["frames"]), float(out["energy"][0])))

    assert not run_threads(work, 2)
    total = 2 * per_thread
    assert sorted(n for n, _ in seen) == list(range(1, total + 1))
    it = Interpreter(model_path=str(path))
    run = it.get_signature_runner("serving_default")
    raw = [float(run(**frame)["energy"][0]) for _ in range(total)]
    for n, energy in seen:
        assert energy == pytest.approx(raw[n - 1], rel=1e-6)


def test_pool_size_follows_the_option_and_defaults_to_the_cores_available():
    path = MODELS / "digits_cnn_float.tflite"
    assert load_model(path, pool_size=3).info()["pool_size"] == 3
    assert load_model(path, pool_size=1).backend.thread_safe is False  # one interpreter: the Model locks
    assert load_model(path).info()["pool_size"] == default_pool_size()
    assert default_pool_size() == max(1, min(4, len(__import__("os").sched_getaffinity(0))))
    model = load_model(path, pool_size=3)
    assert model.info()["interpreters"] == 1  # built on demand, not at load


@pytest.mark.parametrize("bad", [0, MAX_POOL + 1, "2", 1.5])
def test_bad_pool_size_is_refused_naming_the_option(bad):
    with pytest.raises(ModelError, match="pool_size"):
        load_model(MODELS / "digits_cnn_float.tflite", pool_size=bad)


def test_reset_of_a_pooled_stateless_model_keeps_its_outputs(holdout):
    path = MODELS / "digits_cnn_float.tflite"
    model = load_model(path, pool_size=2)
    x = digits_samples(holdout, 1)[0]
    model.reset()
    np.testing.assert_array_equal(model.predict({"image": x})["output_0"], raw_tflite(path, x))


# --- ONNX Runtime: one session, concurrent runs; threads and spinning from the model's cost -----


def heavy_onnx(path: Path, width: int = 1024, layers: int = 4, batch: int = 64) -> Path:
    """A model of several milliseconds per run: ``layers`` dense layers on a ``batch`` x ``width`` input."""
    rng = np.random.default_rng(0)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_two_threads_on_one_onnx_session_both_get_the_raw_runtimes_outputs(holdout):
    path = MODELS / "digits_cnn_float.onnx"
    model = load_model(path)
    assert model.backend.thread_safe
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, _ = holdout
    samples = [digits_input(x[i : i + 1], "nchw") for i in range(16)]
    want = [sess.run(["logits"], {"input": s})[0] for s in samples]

    def work(k: int) -> None:
        for _ in range(20):
            for i in range(k, len(samples), 2):
                np.testing.assert_allclose(model.predict({"input": samples[i]})["logits"], want[i], rtol=1e-5)

    assert not run_threads(work, 2)


def test_small_onnx_model_runs_on_one_thread_without_spinning():
    info = load_model(MODELS / "digits_cnn_float.onnx", max_threads=2).info()
    assert (info["threads"], info["spinning"]) == (1, False)


def test_explicit_threads_and_spinning_win_over_the_rule():
    path = MODELS / "digits_cnn_float.onnx"
    info = load_model(path, threads=2).info()
    assert (info["threads"], info["spinning"]) == (2, None)  # ORT's own spinning default
    info = load_model(path, threads=2, allow_spinning=False).info()
    assert (info["threads"], info["spinning"]) == (2, False)


def test_costly_onnx_model_keeps_the_profiles_threads_and_matches_the_raw_runtime(tmp_path):
    path = heavy_onnx(tmp_path / "heavy.onnx")
    model = load_model(path, max_threads=2)
    cost = model.backend.measured_cost
    assert cost is not None
    want_threads, want_spin = choose_threads(cost, 2, len(__import__("os").sched_getaffinity(0)))
    info = model.info()
    assert (info["threads"], info["spinning"]) == (want_threads, want_spin)
    x = np.random.default_rng(1).standard_normal((64, 1024)).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(model.predict({"x": x})["y"], sess.run(["y"], {"x": x})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("seconds", "max_threads", "cores", "want"),
    [
        (20e-6, 2, 2, (1, False)),  # a 20 µs model: one thread (it ran fastest so)
        (SINGLE_THREAD_BELOW / 2, 4, 4, (1, False)),
        (5e-3, 2, 2, (2, False)),  # costly, but no spare core for the event loop: no spinning
        (5e-3, 2, 4, (2, True)),  # costly, and cores to spare: spin
        (5e-3, 1, 2, (1, True)),
    ],
)
def test_thread_rule(seconds, max_threads, cores, want):
    assert choose_threads(seconds, max_threads, cores) == want


@pytest.mark.parametrize(("option", "value"), [("max_threads", 0), ("allow_spinning", "yes")])
def test_bad_thread_options_are_refused_naming_the_option(option, value):
    with pytest.raises(ModelError, match=option):
        load_model(MODELS / "digits_cnn_float.onnx", **{option: value})


def test_model_cost_is_measured_at_warm_up_and_follows_predicts_without_lock_waits(holdout):
    model = load_model(MODELS / "digits_cnn_float.tflite", pool_size=1)
    assert model.cost is not None and model.cost > 0
    x = digits_samples(holdout, 1)[0]
    before = model.cost
    model.predict({"image": x})
    assert model.cost != before  # every call feeds the moving average
    assert load_model(MODELS / "digits_cnn_float.tflite", warmup=False).cost is None
    assert load_model(MODELS / "stream_state.tflite").cost is None  # not warmed up: not measured yet


def test_pool_that_cannot_build_another_interpreter_keeps_serving_with_those_it_has(holdout, monkeypatch, caplog):
    path = MODELS / "digits_cnn_float.tflite"
    model = load_model(path, pool_size=3)
    backend = model.backend

    def refuse() -> Any:
        raise ModelError(f"{path}: cannot load delegate 'libedgetpu.so.1': device busy")

    monkeypatch.setattr(backend, "_new_interpreter", refuse)
    held = backend._acquire()
    x = digits_samples(holdout, 1)[0]
    got: list[np.ndarray[Any, Any]] = []
    t = threading.Thread(target=lambda: got.append(model.predict({"image": x})["output_0"]))
    with caplog.at_level("WARNING"):
        t.start()
        # the call fails to build a second interpreter, then waits for the held one
        assert wait_until(lambda: backend.pool_size == 1, HANG_GUARD)
        backend._release(held)
        t.join(HANG_GUARD)
    assert not t.is_alive()
    np.testing.assert_array_equal(got[0], raw_tflite(path, x))
    assert backend.instances == 1 and "serving with 1" in caplog.text
