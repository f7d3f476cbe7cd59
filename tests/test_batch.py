"""``edgefleet agent batch``: real processes over real files; killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import MODELS, wait_until

EDGEFLEET = shutil.which("edgefleet", path=str(Path(sys.executable).parent)) or "edgefleet"
ALLOWED_STDERR = {"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."}


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFLEET, *map(str, args)], capture_output=True, text=True, timeout=120)


def clean(r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stderr
    extra = [ln for ln in r.stderr.splitlines() if ln.strip() and ln.strip() not in ALLOWED_STDERR]
    assert not extra, r.stderr


def one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and ln.strip() not in ALLOWED_STDERR]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in out.read_bytes().splitlines()]


def by_input(out: Path) -> dict[tuple[Any, ...], dict[str, Any]]:
    """Every line by its input's identity; fails if one is written twice."""
    seen: dict[tuple[Any, ...], dict[str, Any]] = {}
    for obj in lines(out):
        i = obj["input"]
        key = (i["path"], i["index"], i["size"], i["mtime_ns"])
        assert key not in seen, f"written twice: {key}"
        seen[key] = obj
    return seen


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The float TFLite digits model with a pipeline for gray PNGs (pixels 0..16) and labels."""
    from edgefleet.bundle.manifest import PipelineSpec
    from edgefleet.converters.package import package_model

    spec = PipelineSpec.model_validate(
        {
            "preprocess": [
                {"op": "color", "target": "gray"},
                {"op": "scale", "factor": 1 / 16},
                {"op": "layout", "target": "nhwc"},
            ],
            "postprocess": [{"op": "topk", "k": 2}],
        }
    )
    path, _ = package_model(
        MODELS / "digits_cnn_float.tflite",
        "digits",
        "1.0.0",
        out=tmp_path_factory.mktemp("bundle"),
        labels=MODELS / "digits_labels.txt",
        pipeline=spec,
    )
    return path


def _inputs(folder: Path, repeat: int) -> Path:
    """Images, an .npz, JSON lines and a CSV of the digits holdout; ``repeat`` copies in the .npz."""
    import cv2

    with np.load(MODELS / "digits_holdout.npz") as z:
        x = z["x"]
    folder.mkdir()
    for i in range(40):
        cv2.imwrite(str(folder / f"img{i:03}.png"), x[i].astype(np.uint8))
    big = np.tile(x, (repeat, 1, 1))[:, None, :, :, None] / 16
    np.savez(folder / "samples.npz", image=big.astype(np.float32))
    (folder / "rows.jsonl").write_text(
        "".join(json.dumps({"image": (r[:, :, None] / 16).tolist()}) + "\n" for r in x[:100])
    )
    (folder / "rows.csv").write_text("".join(",".join(str(v / 16) for v in r.ravel()) + "\n" for r in x[:100]))
    return folder


def test_sigkilled_batch_resumes_and_writes_every_result_exactly_once(digits: Path, tmp_path: Path) -> None:
    inputs = _inputs(tmp_path / "in", repeat=40)  # 14,400 samples in the .npz, 240 in the other files
    clean_out = tmp_path / "clean.jsonl"
    r = run("agent", "batch", digits, inputs, "-o", clean_out, "--json")
    clean(r)
    want = by_input(clean_out)
    assert len(want) == 40 + 14_400 + 100 + 100
    assert not [k for k, v in want.items() if "error" in v]

    out = tmp_path / "out.jsonl"
    for kill_after in (500, 6_000):  # killed twice, at different points
        proc = subprocess.Popen(
            [EDGEFLEET, "agent", "batch", str(digits), str(inputs), "-o", str(out), "--sync-every", "50"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert wait_until(lambda n=kill_after: out.exists() and out.read_bytes().count(b"\n") >= n, timeout=60)
            assert proc.poll() is None, "finished before it could be killed: the workload is too small"
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert 0 < len(out.read_bytes().splitlines()) < len(want)
    r = run("agent", "batch", digits, inputs, "-o", out, "--json")
    clean(r)
    summary = json.loads(r.stdout)
    got = by_input(out)  # no input twice
    assert set(got) == set(want)
    assert {k: v["result"] for k, v in got.items()} == {k: v["result"] for k, v in want.items()}
    assert summary["skipped"] >= 6_000 and summary["written"] == len(want) - summary["skipped"]
    assert summary["throughput_per_s"] > 0

    r = run("agent", "batch", digits, inputs, "-o", out, "--json")  # all done: nothing more
    clean(r)
    assert json.loads(r.stdout)["written"] == 0 and len(by_input(out)) == len(want)


def test_a_torn_last_line_is_cut_and_its_sample_written_once(digits: Path, tmp_path: Path) -> None:
    inputs = _inputs(tmp_path / "in", repeat=1)
    clean_out, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    clean(run("agent", "batch", digits, inputs, "-o", clean_out))
    data = clean_out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(data[:77]) + data[77][:40])  # a crash in the middle of line 78
    r = run("agent", "batch", digits, inputs, "-o", out, "--json")
    clean(r)
    s = json.loads(r.stdout)
    assert s["torn_bytes"] == 40 and s["skipped"] == 77 and s["written"] == len(data) - 77
    want, got = by_input(clean_out), by_input(out)
    assert {k: v["result"] for k, v in got.items()} == {k: v["result"] for k, v in want.items()}


def test_every_line_names_input_model_version_and_equals_the_pipeline(digits: Path, tmp_path: Path) -> None:
    from edgefleet.agent import Pipeline, load_model

    folder = _inputs(tmp_path / "in", repeat=1)
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an input")
    (folder / "more.jsonl").write_text('{"image": [[1]]}\nnot json\n')
    out = tmp_path / "out.jsonl"
    r = run("agent", "batch", digits, folder, "-o", out, "--json")
    clean(r)
    assert json.loads(r.stdout)["skipped_files"] == [str(folder / "notes.txt")]
    got = by_input(out)
    assert {o["model"] for o in got.values()} == {"digits"} and {o["version"] for o in got.values()} == {"1.0.0"}
    errors = {(Path(k[0]).name, k[1]): v["error"] for k, v in got.items() if "error" in v}
    assert set(errors) == {("broken.png", None), ("more.jsonl", 0), ("more.jsonl", 1)}
    assert "not a decodable image" in errors[("broken.png", None)]
    assert "expected shape" in errors[("more.jsonl", 0)] and "not JSON" in errors[("more.jsonl", 1)]
    pipeline = Pipeline(load_model(digits))
    for name in ("img000.png", "img017.png"):
        f = folder / name
        key = (str(f.resolve()), None, f.stat().st_size, f.stat().st_mtime_ns)
        want = pipeline.run(f)
        want.pop("model")
        assert got[key]["result"] == want
    # the same sample as an image, a JSON line, a CSV row and an .npz entry gives the same classes
    classes = {
        Path(k[0]).name: [t["index"] for t in v["result"]["top_k"]]
        for k, v in got.items()
        if k[1] in (None, 0) and Path(k[0]).name in ("img000.png", "rows.jsonl", "rows.csv", "samples.npz")
    }
    assert len(set(map(tuple, classes.values()))) == 1, classes


def test_a_bare_model_runs_directly_on_samples_with_a_scalar_input(tmp_path: Path) -> None:
    from edgefleet.agent import load_model

    rng = np.random.default_rng(3)
    audio = rng.normal(0, 0.3, (5, 1, 256)).astype(np.float32)
    sr = np.int64([16000, 8000, 16000, 8000, 16000])
    np.savez(tmp_path / "a.npz", audio=audio, sr=sr)
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"audio": a[0].tolist(), "sr": int(s)}) + "\n" for a, s in zip(audio, sr, strict=True))
    )
    out = tmp_path / "out.jsonl"
    r = run("agent", "batch", MODELS / "vad_if.onnx", tmp_path / "a.npz", tmp_path / "a.jsonl", "-o", out, "--json")
    clean(r)
    model = load_model(MODELS / "vad_if.onnx")
    got = lines(out)
    assert len(got) == 10 and {o["model"] for o in got} == {"vad_if"} and {o["version"] for o in got} == {None}
    for o in got:
        i = o["input"]["index"]
        want = model.predict({"audio": audio[i], "sr": sr[i]})["speech_prob"]
        np.testing.assert_allclose(o["result"]["outputs"]["speech_prob"], want, rtol=1e-6)


def test_a_stateful_model_resumed_inside_a_file_replays_its_state(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "s.npz", frame=rng.random((12, 1, 64), dtype=np.float32), gain=rng.random(12, dtype=np.float32))
    np.savez(tmp_path / "t.npz", frame=rng.random((6, 1, 64), dtype=np.float32), gain=rng.random(6, dtype=np.float32))
    clean_out, out = tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    model = MODELS / "stream_state.tflite"
    clean(run("agent", "batch", model, tmp_path / "s.npz", tmp_path / "t.npz", "-o", clean_out))
    data = clean_out.read_bytes().splitlines(keepends=True)
    assert [o["result"]["outputs"]["frames"] for o in lines(clean_out)] == [*range(1, 13), *range(1, 7)]
    out.write_bytes(b"".join(data[:5]))  # crashed after 5 samples of s.npz
    clean(run("agent", "batch", model, tmp_path / "s.npz", tmp_path / "t.npz", "-o", out))
    want, got = by_input(clean_out), by_input(out)
    assert {k: v["result"] for k, v in got.items()} == {k: v["result"] for k, v in want.items()}


def test_bad_requests_are_one_line(digits: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", frame=np.zeros((2, 1, 64), np.float32), gain=np.zeros(2, np.float32))
    one_line_error(
        run("agent", "batch", MODELS / "stream_state.tflite", tmp_path / "s.npz", "-o", tmp_path / "o.jsonl",
            "--batch-size", "4"),
        "--batch-size 4", "keeps state",
    )  # fmt: skip
    one_line_error(
        run("agent", "batch", MODELS / "vad_if.onnx", tmp_path / "s.npz", "-o", tmp_path / "o.jsonl",
            "--batch-size", "4"),
        "--batch-size 4", "sr []",
    )  # fmt: skip
    one_line_error(run("agent", "batch", digits, tmp_path / "nope", "-o", tmp_path / "o.jsonl"), "nope", "no such")
    (tmp_path / "x.txt").write_text("")
    one_line_error(run("agent", "batch", digits, tmp_path / "x.txt", "-o", tmp_path / "o.jsonl"), "x.txt")
    other = tmp_path / "other.jsonl"
    clean(run("agent", "batch", MODELS / "stream_state.tflite", tmp_path / "s.npz", "-o", other))
    before = other.read_bytes()
    one_line_error(run("agent", "batch", digits, tmp_path / "s.npz", "-o", other), "stream_state", "digits 1.0.0")
    assert other.read_bytes() == before


def test_help_documents_what_identifies_a_done_input() -> None:
    r = run("agent", "batch", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "(path, index within the file, size, mtime_ns)" in text


def test_a_bundle_runs_its_model_directly_when_asked(digits: Path, tmp_path: Path) -> None:
    from edgefleet.agent import load_model

    with np.load(MODELS / "digits_holdout.npz") as z:
        x = (z["x"][:10, None, :, :, None] / 16).astype(np.float32)
    np.savez(tmp_path / "s.npz", image=x)
    out = tmp_path / "out.jsonl"
    clean(run("agent", "batch", digits, tmp_path / "s.npz", "-o", out, "--direct", "--batch-size", "4"))
    got = lines(out)
    model = load_model(digits)
    assert [o["input"]["index"] for o in got] == list(range(10))
    for o in got:
        assert set(o["result"]) == {"outputs"}  # no pipeline: raw outputs, no top-k
        want = model.predict({"image": x[o["input"]["index"]]})["output_0"]
        np.testing.assert_allclose(o["result"]["outputs"]["output_0"], want, rtol=1e-5, atol=1e-6)


def _peak_rss_kb(args: list[str], out: Path, after_lines: int) -> int:
    """VmHWM of a real ``agent batch`` once ``after_lines`` lines are out; then it is killed."""
    proc = subprocess.Popen([EDGEFLEET, *args, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: out.exists() and out.read_bytes().count(b"\n") >= after_lines, timeout=60)
        assert proc.poll() is None
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:")))
    finally:
        proc.kill()
        proc.wait()


def test_an_npz_larger_than_its_share_of_memory_is_read_a_sample_at_a_time(digits: Path, tmp_path: Path) -> None:
    """A 100 MB .npz is not loaded whole: the peak RSS is that of a 1 MB one, within 25 MB."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "small.npz", image=rng.random((4_000, 1, 8, 8, 1), dtype=np.float32))
    np.savez(tmp_path / "large.npz", image=rng.random((400_000, 1, 8, 8, 1), dtype=np.float32))  # 102 MB
    small = _peak_rss_kb(["agent", "batch", str(digits), str(tmp_path / "small.npz")], tmp_path / "s.jsonl", 2_000)
    large = _peak_rss_kb(["agent", "batch", str(digits), str(tmp_path / "large.npz")], tmp_path / "l.jsonl", 2_000)
    assert large - small < 25_000, (small, large)


def test_a_file_changed_since_is_run_again_and_out_inside_an_input_folder_is_not_read(
    digits: Path, tmp_path: Path
) -> None:
    folder = _inputs(tmp_path / "in", repeat=1)
    out = folder / "results.jsonl"  # inside the folder it reads
    clean(run("agent", "batch", digits, folder, "-o", out))
    first = by_input(out)
    assert not [k for k in first if k[0] == str(out.resolve())]
    st = (folder / "rows.jsonl").stat()
    os.utime(folder / "rows.jsonl", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    r = run("agent", "batch", digits, folder, "-o", out, "--json")
    clean(r)
    s = json.loads(r.stdout)
    assert s["written"] == 100 and s["skipped"] == len(first) - 100  # only the changed file, all of it
    again = [o for o in lines(out) if o["input"]["path"].endswith("rows.jsonl")]
    assert len(again) == 200 and len({o["input"]["mtime_ns"] for o in again}) == 2
    assert [o["result"] for o in again[:100]] == [o["result"] for o in again[100:]]


def test_one_run_at_a_time_per_out_and_a_file_given_twice_runs_once(digits: Path, tmp_path: Path) -> None:
    folder = _inputs(tmp_path / "in", repeat=40)
    out = tmp_path / "out.jsonl"
    first = subprocess.Popen(
        [EDGEFLEET, "agent", "batch", str(digits), str(folder), "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: out.exists() and out.stat().st_size > 0, timeout=60)
        assert first.poll() is None
        one_line_error(run("agent", "batch", digits, folder, "-o", out), str(out), "another")
    finally:
        first.kill()
        first.wait()
    twice = tmp_path / "twice.jsonl"
    clean(run("agent", "batch", digits, folder / "rows.csv", folder / "rows.csv", folder, "-o", twice))
    got = by_input(twice)  # fails on a line written twice
    assert len(got) == 40 + 14_400 + 100 + 100
