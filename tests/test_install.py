"""What a device installs: the agent extra, without the server or the converters' frameworks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_SIDE = ("fastapi", "sqlalchemy", "alembic", "tensorflow", "torch", "skl2onnx", "psycopg")

PROBE = """
import json, sys
from edgefleet.agent import load_model, Pipeline
for path in sys.argv[1:]:
    m = load_model(path)
    Pipeline(m)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {mods!r})))
"""


def test_loading_models_imports_nothing_server_side(models_dir: Path) -> None:
    code = PROBE.format(mods=set(SERVER_SIDE))
    paths = [str(models_dir / f) for f in ("digits_cnn_int8.tflite", "digits_cnn_float.onnx")]
    r = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_agent_extra_in_a_clean_venv_gives_a_working_inspect(tmp_path: Path, models_dir: Path) -> None:
    """pip install '.[agent]' into a fresh venv: inspect works and nothing server-side is installed."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{REPO}[agent]"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.lower()
    for dist in ("fastapi", "sqlalchemy", "tensorflow", "torch", "alembic"):
        assert f"\n{dist}==" not in f"\n{freeze}", f"{dist} was installed by the agent extra"
    cli = env_dir / "bin" / "edgefleet"
    for model in ("digits_cnn_int8.tflite", "digits_cnn_float.onnx"):
        r = subprocess.run(
            [str(cli), "model", "inspect", str(models_dir / model), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["inputs"]
    code = PROBE.format(mods=set(SERVER_SIDE))
    r = subprocess.run(
        [str(py), "-c", code, str(models_dir / "digits_cnn_int8.tflite")], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
