"""`edgefleet agent serve` on models shaped like users' (dynamic dims, state, an `If` with a scalar,
quantized ONNX I/O, a dense map): a real process starts without printing an error, answers OIP
metadata and an infer request whose outputs equal `load_model().predict` on the same inputs, and
stops cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from _support import MODELS, free_port

from edgefleet.agent import load_model
from edgefleet.agent.oip import datatype_of

EDGEFLEET = str(Path(sys.executable).with_name("edgefleet"))
ALLOWED = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."  # LiteRT's one C++ line, not ours


def _inputs(name: str) -> dict[str, np.ndarray[Any, Any]]:
    rng = np.random.default_rng(3)
    if name == "ocr_dynamic.tflite":
        return {"image": rng.random((1, 32, 96, 3), dtype=np.float32)}
    if name == "stream_state.tflite":
        return {"frame": rng.random((1, 64), dtype=np.float32), "gain": np.array(0.5, np.float32)}
    if name == "vad_if.onnx":
        return {"audio": rng.standard_normal((2, 256)).astype(np.float32), "sr": np.array(16000, np.int64)}
    if name == "digits_qio.onnx":
        return {"pixels": rng.integers(0, 255, (3, 1, 8, 8), dtype=np.uint8)}
    assert name == "segmenter_dense.onnx"
    return {"image": rng.random((1, 3, 24, 40), dtype=np.float32)}


@pytest.mark.parametrize(
    "name", ["ocr_dynamic.tflite", "stream_state.tflite", "vad_if.onnx", "digits_qio.onnx", "segmenter_dense.onnx"]
)
def test_agent_serve_answers_on_every_kind_of_model_without_printing_an_error(name: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [EDGEFLEET, "agent", "serve", str(MODELS / name), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.startswith("ready:"), (ready, proc.stderr.read() if proc.poll() is not None else "")
        model_name = Path(name).stem
        base = f"http://127.0.0.1:{port}/v2/models/{model_name}"
        meta = httpx.get(base, timeout=10).json()
        assert {t["name"] for t in meta["inputs"]} == set(_inputs(name)), meta
        feeds = _inputs(name)
        body = {
            "inputs": [
                {"name": k, "shape": list(v.shape), "datatype": datatype_of(v.dtype), "data": v.ravel().tolist()}
                for k, v in feeds.items()
            ]
        }
        r = httpx.post(f"{base}/infer", json=body, timeout=30)
        assert r.status_code == 200, r.text
        got = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in r.json()["outputs"]}
        want = load_model(MODELS / name).predict(feeds)  # a fresh model: the same (initial) state
        assert set(got) == set(want)
        for k, w in want.items():
            np.testing.assert_allclose(got[k].astype(np.float64), np.asarray(w, np.float64), rtol=1e-5, atol=1e-5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    noisy = [ln for ln in err.splitlines() if ln.strip() and ln.strip() != ALLOWED and " INFO " not in ln]
    assert not noisy, err
    assert "Traceback" not in err and "rror" not in err.replace("error_count", ""), err
