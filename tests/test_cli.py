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
        ["agent", "batch"],
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
    assert r.returncode == 0, r.stderr
    assert {"op": "topk", "k": 2}.items() <= json.loads(r.stdout)["pipeline"]["postprocess"][1].items()
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


# ---------------------------------------------------------------- the operator CLI against a fleet server


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    from _support import assert_one_line_error

    assert_one_line_error(r.returncode, r.stderr, *needles)
    assert "Traceback" not in r.stderr


def test_server_without_a_scheme_is_one_line_saying_to_add_it() -> None:
    r = run("model", "list", "--server", "127.0.0.1:8700", env={"EDGEFLEET_TOKEN": "efo_x_y"})
    _one_line_error(r, "server: '127.0.0.1:8700'", "add http:// or https://", "http://127.0.0.1:8700")
    r = run("device", "list", env={"EDGEFLEET_SERVER": "fleet.example.com", "EDGEFLEET_TOKEN": "efo_x_y"})
    _one_line_error(r, "add http:// or https://")


def test_commands_wait_for_a_server_that_is_still_starting(tmp_path: Path) -> None:
    from _support import free_port

    data = tmp_path / "data"
    init = run("server", "init", "--data", str(data), "--json")
    assert init.returncode == 0, init.stderr
    port = free_port()
    env = {
        **os.environ,
        "EDGEFLEET_SERVER": f"http://127.0.0.1:{port}",
        "EDGEFLEET_TOKEN": json.loads(init.stdout)["admin_token"],
    }
    # as a README tour does: `server run &`, then at once a command
    server = subprocess.Popen(
        [EDGEFLEET, "server", "run", "--data", str(data), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        r = subprocess.run([EDGEFLEET, "model", "list", "--json"], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == []
    finally:
        server.terminate()
        server.wait(10)


def test_a_server_that_never_answers_is_one_line_after_the_bounded_wait() -> None:
    from _support import free_port

    r = run("model", "list", "--server", f"http://127.0.0.1:{free_port()}", env={"EDGEFLEET_TOKEN": "efo_x_y"})
    _one_line_error(r, "cannot connect", "is the server running?")


def test_push_of_a_file_that_is_not_a_bundle_is_one_line_before_any_connection(tmp_path: Path) -> None:
    from _support import free_port

    junk = tmp_path / "notes-1.0.0.efb"
    junk.write_text("not a bundle\n" * 100)
    r = run("model", "push", str(junk), "--server", f"http://127.0.0.1:{free_port()}", env={"EDGEFLEET_TOKEN": "x"})
    _one_line_error(r, "notes-1.0.0.efb", "not a valid bundle")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.txt", b"hello\n", "not a model: give a .onnx or .tflite model file or a .efb bundle"),
        ("empty.onnx", b"", "an empty file, not a model"),
        ("random.onnx", bytes(range(256)) * 8, "not a loadable ONNX model"),
        ("random.tflite", bytes(range(256)) * 8, "not a loadable TFLite model"),
        ("random.efb", bytes(range(256)) * 8, "not a valid bundle"),
    ],
)
def test_inspect_of_a_file_that_is_not_a_model_is_one_line(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    _one_line_error(run("model", "inspect", str(tmp_path / name)), message)


def test_a_missing_ca_cert_or_a_broken_url_is_one_line() -> None:
    env = {"EDGEFLEET_TOKEN": "efo_x_y", "EDGEFLEET_CA_CERT": "/nonexistent/ca.crt"}
    _one_line_error(run("model", "list", "--server", "https://127.0.0.1:9", env=env), "ca_cert: /nonexistent/ca.crt")
    _one_line_error(run("model", "list", "--server", "http://[::1", env={"EDGEFLEET_TOKEN": "x"}), "not a valid URL")


def test_a_server_that_is_not_a_fleet_server_is_one_line(tmp_path: Path) -> None:
    import socket

    from _support import free_port, wait_until

    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    try:
        assert wait_until(listening, 30)
        r = run("model", "list", "--server", f"http://127.0.0.1:{port}", env={"EDGEFLEET_TOKEN": "efo_x_y"})
        _one_line_error(r, "404", "is 127.0.0.1 a fleet server?")
    finally:
        web.terminate()
        web.wait(10)
