"""Helpers shared by the tests (importable because pyproject puts tests/ on the path)."""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODELS = Path(__file__).resolve().parent / "fixtures" / "models"

DIGITS = {
    # file: (input name, layout)
    "digits_cnn_float.onnx": ("input", "nchw"),
    "digits_cnn_int8.onnx": ("input", "nchw"),
    "digits_cnn_float.tflite": ("image", "nhwc"),
    "digits_cnn_int8.tflite": ("image", "nhwc"),
    "digits_cnn_uint8io.tflite": ("image", "nhwc"),
}


def digits_input(x: np.ndarray[Any, Any], layout: str) -> np.ndarray[Any, Any]:
    """uint8 pixels 0..16 [N, 8, 8] to the float [0, 1] batch a digits model takes."""
    f = x.astype(np.float32) / 16.0
    return np.ascontiguousarray(f[:, None] if layout == "nchw" else f[..., None])


class CollectSink:
    """An in-memory sink for flow tests: every result lands in a queue."""

    name = "collect"

    def __init__(self) -> None:
        self.results: queue.Queue[dict[str, Any]] = queue.Queue()

    def send(self, result: dict[str, Any]) -> None:
        self.results.put(result)

    def close(self) -> None:
        pass

    def counters(self) -> dict[str, int]:
        return {"sent": self.results.qsize()}

    def take(self, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        return [self.results.get(timeout=timeout) for _ in range(n)]


def wait_until(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Wait for a condition that no event signals (files moved by another thread, say)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not cond():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.02)
    return True


def run_cli(capsys: Any, *args: str | Path) -> tuple[int, str, str]:
    """Run ``edgefleet ARGS`` in this process: (exit code, stdout, stderr)."""
    from edgefleet.cli.main import main

    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """The command failed with exit 1 and exactly one ``error: ...`` line holding every needle."""
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digits_bundle(out: Path, top_k: int = 3) -> Path:
    """The float TFLite digits model packaged with its pipeline (scale 1/16, NHWC, softmax, top-k) and labels."""
    from edgefleet.bundle.manifest import PipelineSpec
    from edgefleet.converters.package import package_model

    spec = PipelineSpec.model_validate(
        {
            "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nhwc"}],
            "postprocess": [{"op": "softmax"}, {"op": "topk", "k": top_k}],
        }
    )
    path, _ = package_model(
        MODELS / "digits_cnn_float.tflite",
        "digits",
        "1.0.0",
        out=out,
        labels=MODELS / "digits_labels.txt",
        pipeline=spec,
    )
    return path


def raw_tflite(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The bare LiteRT interpreter's first output for ``x`` as its first input, resized to ``x``'s shape."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    idx = it.get_input_details()[0]["index"]
    it.resize_tensor_input(idx, x.shape)
    it.allocate_tensors()
    it.set_tensor(idx, x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])  # type: ignore[no-any-return]
