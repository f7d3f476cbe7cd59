"""What a device installs: the agent extra, without the server or the converters' frameworks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
import zipfile
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


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``make wheel`` into a temp folder: the file a device installs (edgefleet is on no index)."""
    import edgefleet

    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run(
        ["make", "--no-print-directory", "wheel", f"DIST={dist}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    built = dist / f"edgefleet-{edgefleet.__version__}-py3-none-any.whl"
    assert built.is_file(), sorted(p.name for p in dist.iterdir())
    return built


@pytest.mark.slow
def test_make_wheel_holds_every_subpackage_and_its_data(wheel: Path) -> None:
    """The symlinked agent/, fleet-server/ and converters/ are inside, with profiles and migrations."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = z.read(metadata).decode()
    for member in (
        "edgefleet/agent/__init__.py",
        "edgefleet/server/__init__.py",
        "edgefleet/converters/__init__.py",
        "edgefleet/py.typed",
        "edgefleet/server/migrations/script.py.mako",
    ):
        assert member in names, member
    assert any(n.startswith("edgefleet/agent/profiles/") and n.endswith(".toml") for n in names)
    assert not any(n.split("/")[0] in {"agent", "converters", "tests"} for n in names), "bare top-level package"
    assert "Requires-Python: >=3.11" in meta
    assert "Provides-Extra: agent" in meta


@pytest.mark.slow
def test_agent_extra_of_the_wheel_in_a_clean_venv_gives_a_working_inspect(
    tmp_path: Path, models_dir: Path, wheel: Path
) -> None:
    """pip install 'edgefleet-VERSION-py3-none-any.whl[agent]' into a fresh venv: inspect works and nothing
    server-side is installed."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{wheel}[agent]"],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout.lower()
    assert f"edgefleet @ file://{wheel}".lower() in freeze, freeze  # the wheel, not a name from an index
    for dist in ("fastapi", "sqlalchemy", "tensorflow", "torch", "alembic"):
        assert f"\n{dist}==" not in f"\n{freeze}", f"{dist} was installed by the agent extra"
    cli = env_dir / "bin" / "edgefleet"
    for model in ("digits_cnn_int8.tflite", "digits_cnn_float.onnx"):
        r = subprocess.run(
            [str(cli), "model", "inspect", str(models_dir / model), "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # not the checkout: the installed wheel must stand alone
        )
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["inputs"]
    code = PROBE.format(mods=set(SERVER_SIDE))
    r = subprocess.run(
        [str(py), "-c", code, str(models_dir / "digits_cnn_int8.tflite")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
