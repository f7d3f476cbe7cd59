"""``model inspect|bench|package|verify`` on models from other projects (the general fixtures) and the
digits models, each as a real ``edgefleet`` process: no traceback and no runtime error on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import MODELS

EDGEFLEET = shutil.which("edgefleet", path=str(Path(sys.executable).parent)) or "edgefleet"
# LiteRT prints this one line to stderr when it applies XNNPACK; it is not an error.
ALLOWED_STDERR = {"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEFLEET, *map(str, args)], capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}
    )


def clean_stderr(r: subprocess.CompletedProcess[str]) -> None:
    """Exit 0 and nothing on stderr but LiteRT's XNNPACK line."""
    assert r.returncode == 0, r.stderr
    extra = [line for line in r.stderr.splitlines() if line.strip() and line.strip() not in ALLOWED_STDERR]
    assert not extra, r.stderr


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and line.strip() not in ALLOWED_STDERR]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@dataclass
class Case:
    model: str
    pipeline: dict[str, Any]
    golden: dict[str, np.ndarray[Any, Any]]
    shape: list[str] = field(default_factory=list)  # --shape for a bare model with dynamic dims
    labels: bool = False


def _digits(name: str, layout: str, key: str) -> Case:
    x = np.random.default_rng(1).integers(0, 17, (3, 8, 8)).astype(np.float32) / 16
    sample = x[:, None, None] if layout == "nchw" else x[:, None, :, :, None]
    return Case(
        name,
        {
            "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": layout}],
            "postprocess": [{"op": "softmax"}, {"op": "topk", "k": 3}],
        },
        {key: sample},
        labels=True,
    )


def _cases() -> list[Case]:
    r = np.random.default_rng(7)
    return [
        Case(
            "ocr_dynamic.tflite",
            {
                "preprocess": [
                    {"op": "resize", "height": 32, "keep_aspect": True, "multiple": 4},
                    {"op": "scale", "factor": 1 / 255},
                ],
                "postprocess": [{"op": "argmax", "axis": -1}],
            },
            {"image": r.random((3, 1, 32, 64, 3), dtype=np.float32)},
            shape=["image=1x32x64x3"],
        ),
        Case(
            "stream_state.tflite",
            {"output": "speech"},
            {"frame": r.random((4, 1, 64), dtype=np.float32), "gain": np.float32([0.5, 1.0, 1.5, 2.0])},
        ),
        Case(
            "vad_if.onnx",
            {"input": "audio", "output": "speech_prob"},
            {"audio": r.normal(0, 0.3, (3, 1, 256)).astype(np.float32), "sr": np.int64([16000, 8000, 16000])},
        ),
        _digits("digits_qio.onnx", "nchw", "pixels"),
        Case(
            "segmenter_dense.onnx",
            {
                "preprocess": [
                    {"op": "resize", "width": 48, "height": 32},
                    {"op": "color", "target": "rgb"},
                    {"op": "scale", "factor": 1 / 255},
                    {"op": "layout", "target": "nchw"},
                ],
                "postprocess": [{"op": "argmax", "axis": 0}],
            },
            {"image": r.random((2, 1, 3, 32, 48), dtype=np.float32)},
            shape=["image=1x3x32x48"],
        ),
        _digits("digits_cnn_float.onnx", "nchw", "input"),
        _digits("digits_cnn_int8.onnx", "nchw", "input"),
        _digits("digits_cnn_float.tflite", "nhwc", "image"),
        _digits("digits_cnn_int8.tflite", "nhwc", "image"),
        _digits("digits_cnn_uint8io.tflite", "nhwc", "image"),
    ]


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[c.model for c in CASES])
def test_inspect_bench_package_verify_run_clean_on_every_model(case: Case, tmp_path: Path) -> None:
    model = MODELS / case.model
    r = run("model", "inspect", model)
    clean_stderr(r)
    assert "stateful: " in r.stdout
    r = run("model", "inspect", model, "--json")
    clean_stderr(r)
    info = json.loads(r.stdout)
    assert {"metadata", "signatures", "stateful"} <= set(info)

    r = run("model", "bench", model, "--runs", "10", *[a for s in case.shape for a in ("--shape", s)], "--json")
    clean_stderr(r)
    assert json.loads(r.stdout)["agent"]["p50_us"] > 0

    np.savez(tmp_path / "golden.npz", **case.golden)  # type: ignore[arg-type]
    (tmp_path / "pipe.json").write_text(json.dumps(case.pipeline))
    extra = ["--labels", MODELS / "digits_labels.txt"] if case.labels else []
    r = run(
        "model", "package", model, "--name", "general", "--version", "1.0.0", "--golden", tmp_path / "golden.npz",
        "--pipeline", tmp_path / "pipe.json", "-o", tmp_path, "--json", *extra,
    )  # fmt: skip
    clean_stderr(r)
    bundle = Path(json.loads(r.stdout)["bundle"])

    r = run("model", "verify", bundle, "--json")
    clean_stderr(r)
    report = json.loads(r.stdout)
    assert report["ok"] and report["golden"]["passed"], report
    assert report["golden"]["samples"] == len(next(iter(case.golden.values())))
    assert report["pipeline"]["checked"], report  # the pipeline ran on a synthetic input

    r = run("model", "bench", bundle, "--runs", "10", "--json")  # the bundle's golden inputs by default
    clean_stderr(r)
    shapes = {k: v["shape"] for k, v in json.loads(r.stdout)["inputs"].items()}
    assert shapes == {k: list(v.shape[1:]) for k, v in case.golden.items()}


def test_bench_of_a_dynamic_model_without_shapes_names_the_flags() -> None:
    for name, shape in (("ocr_dynamic.tflite", "image=1xHxWx3"), ("segmenter_dense.onnx", "image=1x3xHxW")):
        one_line_error(run("model", "bench", MODELS / name), f"--shape {shape}", "--inputs")


def test_bench_takes_inputs_in_the_sample_layout_and_shapes(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", image=np.zeros((2, 1, 40, 72, 3), np.float32))
    r = run("model", "bench", MODELS / "ocr_dynamic.tflite", "--inputs", tmp_path / "x.npz", "--runs", "10", "--json")
    clean_stderr(r)
    assert json.loads(r.stdout)["inputs"]["image"]["shape"] == [1, 40, 72, 3]
    np.savez(tmp_path / "bad.npz", image=np.zeros((1, 40, 72, 3), np.float32))  # no sample axis
    one_line_error(run("model", "bench", MODELS / "ocr_dynamic.tflite", "--inputs", tmp_path / "bad.npz"), "(N, *")
    one_line_error(run("model", "bench", MODELS / "ocr_dynamic.tflite", "--shape", "image=1x40"), "image")
    one_line_error(run("model", "bench", MODELS / "ocr_dynamic.tflite", "--shape", "image=1xfoo"), "--shape")
    one_line_error(run("model", "bench", MODELS / "ocr_dynamic.tflite", "--shape", "nope=1x2"), "nope")


def test_inspect_shows_metadata_signatures_and_state() -> None:
    r = run("model", "inspect", MODELS / "stream_state.tflite")
    clean_stderr(r)
    assert "signatures: reset, serving_default (using serving_default)" in r.stdout
    assert "stateful: yes — Model.reset()" in r.stdout
    r = run("model", "inspect", MODELS / "stream_state.tflite", "--signature", "reset", "--json")
    clean_stderr(r)
    info = json.loads(r.stdout)
    assert info["signature"] == "reset" and info["inputs"] == [] and info["stateful"] is True
    r = run("model", "inspect", MODELS / "vad_if.onnx")
    clean_stderr(r)
    assert "metadata: sample_rates=8000,16000" in r.stdout and "stateful: no" in r.stdout
    assert json.loads(run("model", "inspect", MODELS / "segmenter_dense.onnx", "--json").stdout)["metadata"] == {
        "classes": "background,road,car,person"
    }
    one_line_error(run("model", "inspect", MODELS / "stream_state.tflite", "--signature", "nope"), "nope", "reset")
    one_line_error(run("model", "inspect", MODELS / "vad_if.onnx", "--signature", "x"), "--signature", "ONNX")


def test_bench_runs_the_signature_asked_for() -> None:
    r = run("model", "bench", MODELS / "stream_state.tflite", "--signature", "reset", "--runs", "10", "--json")
    clean_stderr(r)
    out = json.loads(r.stdout)
    assert out["runtime"]["signature"] == "reset" and out["inputs"] == {}


DIGITS_NCHW = [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nchw"}]


@pytest.mark.parametrize(
    ("model", "pipeline", "needles"),
    [
        (  # channels last for an NCHW model
            "digits_cnn_float.onnx",
            {"preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nhwc"}]},
            ["expected shape [?, 1, 8, 8], got [1, 8, 8, 1]", "layout step with target 'nchw'"],
        ),
        (  # a resize to a size the model does not take
            "digits_cnn_float.onnx",
            {"preprocess": [{"op": "resize", "width": 16, "height": 16}, *DIGITS_NCHW]},
            ["16x16 image", "expected shape [?, 1, 8, 8], got [1, 1, 16, 16]"],
        ),
        (  # float data for an int64 input
            "vad_if.onnx",
            {"input": "sr", "preprocess": [{"op": "scale", "factor": 2.0}]},
            ["input 'sr': expected dtype int64, got float32"],
        ),
        ("digits_cnn_float.onnx", {"output": "nope", "preprocess": DIGITS_NCHW}, ["'nope'", "logits"]),
        (
            "digits_cnn_float.onnx",
            {"preprocess": DIGITS_NCHW, "postprocess": [{"op": "argmax", "axis": 3}]},
            ["argmax: axis 3 is out of range for shape [10]"],
        ),
        (
            "segmenter_dense.onnx",
            {"preprocess": [{"op": "resize", "width": 48, "height": 32}], "postprocess": [{"op": "topk", "axis": 0}]},
            ["expected shape [1, 3, ?, ?], got [1, 32, 48, 3]", "'nchw'"],
        ),
    ],
    ids=["wrong-layout", "wrong-size", "wrong-dtype", "missing-output", "axis-out-of-range", "dense-wrong-layout"],
)
def test_package_refuses_a_pipeline_that_does_not_fit_the_model(
    model: str, pipeline: dict[str, Any], needles: list[str], tmp_path: Path
) -> None:
    (tmp_path / "pipe.json").write_text(json.dumps(pipeline))
    r = run(
        "model", "package", MODELS / model, "--name", "m", "--version", "1.0.0",
        "--pipeline", tmp_path / "pipe.json", "-o", tmp_path,
    )  # fmt: skip
    one_line_error(r, str(tmp_path / "pipe.json"), *needles)
    assert not list(tmp_path.glob("*.efb"))


def test_verify_refuses_a_bundle_whose_pipeline_does_not_fit(tmp_path: Path) -> None:
    """A bundle written by hand (or by an older edgefleet) with a pipeline for another layout."""
    from edgefleet.bundle.archive import BundleReader, write_bundle
    from edgefleet.bundle.manifest import PipelineSpec
    from edgefleet.converters.package import package_model

    good, manifest = package_model(
        MODELS / "digits_cnn_float.onnx", "digits", "1.0.0", out=tmp_path, pipeline=PipelineSpec(preprocess=DIGITS_NCHW)
    )
    with BundleReader(good) as b:
        members = {ref.path: b.read(ref.path) for ref in manifest.members()}
    bad_spec = PipelineSpec.model_validate({"preprocess": [{"op": "layout", "target": "nhwc"}]})
    bad = tmp_path / "bad" / good.name
    bad.parent.mkdir()
    write_bundle(bad, manifest.model_copy(update={"pipeline": bad_spec}), members)
    clean_stderr(run("model", "verify", good))
    r = run("model", "verify", bad)
    one_line_error(r, "pipeline", "expected shape [?, 1, 8, 8], got [1, 8, 8, 1]")
