"""The public names each package promises exist, and importing the agent loads no runtime."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

PACKAGES = [
    "edgefleet.agent",
    "edgefleet.bundle",
    "edgefleet.errors",
    "edgefleet.durable",
    "edgefleet.stats",
    "edgefleet.tomlconf",
    "edgefleet.agent.sources",
    "edgefleet.agent.telemetry",
    "edgefleet.agent.telemetry.loop",
    "edgefleet.agent.updater.machine",
    "edgefleet.agent.updater.state",
    "edgefleet.agent.updater.trust",
    "edgefleet.agent.updater.install",
    "edgefleet.agent.updater.client",
    "edgefleet.agent.runtime",
    "edgefleet.agent.pipeline",
    "edgefleet.agent.benchmark",
    "edgefleet.agent.backends",
    "edgefleet.agent.backends.onnx",
    "edgefleet.agent.backends.litert",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_name_in_all_exists(name: str) -> None:
    module = importlib.import_module(name)
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which do not exist"


def test_importing_the_agent_loads_no_runtime_camera_or_broker_library() -> None:
    code = (
        "import sys, json, edgefleet.agent; from edgefleet.agent import load_model, Pipeline; "
        "print(json.dumps(sorted(m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'cv2', 'paho') "
        "if m in sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []


def test_an_onnx_model_with_quantized_io_loads_without_the_onnx_package() -> None:
    """Scale and zero point come from the model's own bytes; the ``onnx`` package (not in the agent
    extra) is never imported, nor protobuf."""
    from _support import MODELS

    code = (
        "import sys, json; from edgefleet.agent import load_model; "
        f"m = load_model({str(MODELS / 'digits_qio.onnx')!r}); "
        "assert m.inputs[0].quantization is not None; "
        "print(json.dumps(sorted(n for n in ('onnx', 'google.protobuf') if n in sys.modules)))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
