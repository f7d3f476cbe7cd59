"""The edgefleet command, run as a real process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

EDGEFLEET = shutil.which("edgefleet", path=str(Path(sys.executable).parent)) or "edgefleet"


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFLEET, *args], capture_output=True, text=True, timeout=120, cwd=cwd, env={**os.environ, **(env or {})}
    )


def test_help_for_every_command() -> None:
    for args in (
        [],
        ["model"],
        ["model", "inspect"],
        ["model", "bench"],
        ["model", "package"],
        ["model", "verify"],
        ["demo"],
    ):
        r = run(*args, "--help")
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout


def test_inspect_json_describes_tensors(models_dir: Path) -> None:
    r = run("model", "inspect", str(models_dir / "digits_cnn_int8.tflite"), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["inputs"] == [
        {
            "name": "image",
            "dtype": "int8",
            "shape": [None, 8, 8, 1],
            "quantization": {"scale": pytest.approx(1 / 255), "zero_point": -128},
        }
    ]


def test_package_inspect_verify_bench_through_the_cli(models_dir: Path, holdout: Any, tmp_path: Path) -> None:
    x, _ = holdout
    np.savez(tmp_path / "golden.npz", input=(x[:4, None] / 16).astype(np.float32))
    np.savez(tmp_path / "train.npz", input=(x[:, None] / 16).astype(np.float32))
    (tmp_path / "pipe.toml").write_text(
        '[[preprocess]]\nop = "scale"\nfactor = 0.0625\n[[preprocess]]\nop = "layout"\ntarget = "nchw"\n'
        '[[postprocess]]\nop = "softmax"\n[[postprocess]]\nop = "topk"\nk = 2\n'
    )
    r = run(
        "model",
        "package",
        str(models_dir / "digits_cnn_int8.onnx"),
        "--name",
        "digits",
        "--version",
        "3.0.0",
        "--labels",
        str(models_dir / "digits_labels.txt"),
        "--golden",
        str(tmp_path / "golden.npz"),
        "--baseline",
        str(tmp_path / "train.npz"),
        "--pipeline",
        str(tmp_path / "pipe.toml"),
        "-o",
        str(tmp_path),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    bundle = Path(json.loads(r.stdout)["bundle"])
    assert bundle == tmp_path / "digits-3.0.0.efb"
    r = run("model", "inspect", str(bundle), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["pipeline"]["postprocess"][1] == {"op": "topk", "k": 2}
    r = run("model", "inspect", str(bundle))
    assert "scale → layout → model → softmax → topk" in r.stdout
    r = run("model", "verify", str(bundle), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["golden"]["passed"]
    r = run("model", "bench", str(bundle), "--runs", "20", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    assert {"agent", "bare", "ratio_p50"} <= set(b) and b["agent"]["p50_us"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model", "inspect", "/nonexistent/model.onnx"], "error: /nonexistent/model.onnx: no such model file"),
        (["model", "verify", "/nonexistent/b.efb"], "error: /nonexistent/b.efb: cannot open bundle"),
        (
            ["model", "package", "{models}/multi_io.onnx", "--name", "Bad", "--version", "1.0.0", "-o", "{tmp}"],
            "error: manifest: name: String should match pattern",
        ),
        (
            ["model", "package", "{models}/multi_io.onnx", "--name", "m", "--version", "1", "-o", "{tmp}"],
            "version must be a semantic version",
        ),
        (
            [
                "model",
                "package",
                "{models}/multi_io.onnx",
                "--name",
                "m",
                "--version",
                "1.0.0",
                "--golden",
                "{tmp}/missing.npz",
                "-o",
                "{tmp}",
            ],
            "missing.npz: no such file",
        ),
    ],
)
def test_failures_exit_non_zero_with_one_line(models_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    r = run(*[a.format(models=models_dir, tmp=tmp_path) for a in args])
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.efb")) and not list(tmp_path.glob(".*.tmp"))


def test_demo_prints_real_predictions() -> None:
    r = run("demo", "--runs", "20")
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "predictions of" in r.stdout
    assert "passed" in r.stdout and "FAILED" not in r.stdout
    assert "agent stopped on SIGTERM (exit 0)" in r.stdout  # a real agent process served a bundle
    assert "edgefleet model list" in r.stdout and "digits-cnn-int8-tflite" in r.stdout  # pushed to a real server
