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
    "edgefleet.agent.runtime",
    "edgefleet.agent.pipeline",
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
