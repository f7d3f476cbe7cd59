"""Sources end to end: a real video file through the camera source, a watched folder to a JSONL file,
stdin lines to stdout, with a real digits bundle and its pipeline."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from _support import CollectSink, digits_bundle, wait_until
from hypothesis import given
from hypothesis import strategies as st

from edgefleet.agent import Pipeline, load_model
from edgefleet.agent.flow import Flow, FlowConfig
from edgefleet.agent.sources import CameraSource, PayloadError, StdinSource, StdinSourceConfig, parse_payload_bytes
from edgefleet.bundle.manifest import PipelineSpec
from edgefleet.errors import ConfigError

_POST = [{"op": "softmax"}, {"op": "topk", "k": 3}]
# Decoded images are BGR: to gray first. Pixel values 0..16 as in the digits data set.
BGR_SPEC = PipelineSpec.model_validate(
    {
        "preprocess": [
            {"op": "color", "source": "bgr", "target": "gray"},
            {"op": "scale", "factor": 1 / 16},
            {"op": "layout", "target": "nhwc"},
        ],
        "postprocess": _POST,
    }
)
# Video frames: 64x64 BGR, pixel values 0..255.
VIDEO_SPEC = PipelineSpec.model_validate(
    {
        "preprocess": [
            {"op": "color", "source": "bgr", "target": "gray"},
            {"op": "resize", "width": 8, "height": 8, "interpolation": "area"},
            {"op": "scale", "factor": 1 / 255},
            {"op": "layout", "target": "nhwc"},
        ],
        "postprocess": _POST,
    }
)


@pytest.fixture(scope="module")
def digits_model(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The float TFLite digits model as a real bundle (scale 1/16, nhwc, softmax, top-3, labels)."""
    return load_model(digits_bundle(tmp_path_factory.mktemp("bundle")))


def top1(result: dict[str, Any]) -> int:
    return int(result["top_k"][0]["index"])


# -- camera -------------------------------------------------------------------------------------

N_FRAMES = 40


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, holdout: tuple[Any, Any]) -> tuple[Path, np.ndarray[Any, Any]]:
    """A real MJPG .avi at 100 fps: digits scaled to 0..255 and up to 64x64 BGR; and their labels."""
    x, y = holdout
    path = tmp_path_factory.mktemp("video") / "digits.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 100.0, (64, 64))
    assert writer.isOpened()
    for img in x[:N_FRAMES]:
        gray = np.clip(img.astype(np.float32) * (255 / 16), 0, 255).astype(np.uint8)
        big = cv2.resize(gray, (64, 64), interpolation=cv2.INTER_NEAREST)
        writer.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path, y[:N_FRAMES]


def camera_flow(video_path: Path, run: Callable[[], Any], **source: Any) -> tuple[Flow, CollectSink]:
    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {"type": "camera", "device": str(video_path), **source},
            "sinks": [{"type": "stdout"}],
        }
    )
    sink = CollectSink()
    return Flow(cfg, run, sinks=[sink]), sink


def test_camera_file_every_frame_predicts_the_digit_shown(digits_model: Any, video: Any) -> None:
    path, labels = video
    pipe = Pipeline(digits_model, spec=VIDEO_SPEC)
    flow, sink = camera_flow(path, lambda: pipe, realtime=False)
    assert flow.config.queue_size == 1  # a camera's default: the freshest frame
    flow.start()
    try:
        assert flow.join(timeout=20)
        results = sink.take(N_FRAMES)
    finally:
        flow.stop()
    frames = [r["meta"]["frame"] for r in results]
    assert frames == list(range(N_FRAMES))  # every frame, in order
    hits = sum(top1(r) == labels[r["meta"]["frame"]] for r in results)
    assert hits >= 0.8 * N_FRAMES, f"{hits}/{N_FRAMES} frames recognised"
    assert results[0]["top_k"][0]["label"] is not None and results[0]["meta"]["source"] == "camera"
    c = flow.counters()
    assert c["source"]["received"] == N_FRAMES and c["source"]["dropped_stale"] == 0
    assert c["processed"] == N_FRAMES and c["errors"] == 0


def test_camera_fps_cap_keeps_every_other_frame_of_a_100_fps_file(digits_model: Any, video: Any) -> None:
    path, _ = video
    pipe = Pipeline(digits_model, spec=VIDEO_SPEC)
    flow, sink = camera_flow(path, lambda: pipe, realtime=False, fps=50)
    flow.start()
    try:
        assert flow.join(timeout=20)
    finally:
        flow.stop()
    frames = sorted(r["meta"]["frame"] for r in sink.take(N_FRAMES // 2))
    assert frames == list(range(0, N_FRAMES, 2))
    assert flow.counters()["source"]["skipped_fps"] == N_FRAMES // 2


def test_camera_slower_inference_drops_stale_frames_instead_of_queueing(digits_model: Any, video: Any) -> None:
    path, _ = video
    pipe = Pipeline(digits_model, spec=VIDEO_SPEC)

    class SlowPipeline:
        """Holds the first frame until the whole file has been read: inference far behind the camera."""

        def run(self, data: Any, raw_outputs: Any = None) -> dict[str, Any]:
            assert isinstance(flow.source, CameraSource)
            flow.source.eof.wait(20)
            return pipe.run(data)

    slow = SlowPipeline()
    flow, sink = camera_flow(path, lambda: slow, realtime=True)
    flow.start()
    try:
        assert flow.join(timeout=20)
    finally:
        flow.stop()
    src = flow.counters()["source"]
    assert src["received"] == N_FRAMES
    assert src["dropped_stale"] > 0
    assert src["emitted"] + src["dropped_stale"] == N_FRAMES  # each frame either handed on or dropped, once
    assert flow.counters()["processed"] == src["emitted"] == sink.results.qsize()


def test_camera_loop_starts_the_file_again_and_stops_cleanly(digits_model: Any, video: Any) -> None:
    path, _ = video
    pipe = Pipeline(digits_model, spec=VIDEO_SPEC)
    flow, sink = camera_flow(path, lambda: pipe, realtime=False, loop=True)
    flow.start()
    try:
        results = sink.take(N_FRAMES + 5)
    finally:
        flow.stop()
    assert results[-1]["meta"]["frame"] == N_FRAMES + 4
    assert flow.source.ended.is_set()


def test_camera_missing_file_is_a_config_error_naming_the_device(tmp_path: Path) -> None:
    cfg = FlowConfig.model_validate(
        {
            "model": "m",
            "source": {"type": "camera", "device": str(tmp_path / "nope.avi")},
            "sinks": [{"type": "stdout"}],
        }
    )
    flow = Flow(cfg, lambda: None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ConfigError, match="device: no such video file"):
        flow.start()


# -- folder -------------------------------------------------------------------------------------


def test_folder_images_npy_and_json_to_jsonl_moved_to_done_and_failed(
    digits_model: Any, holdout: tuple[Any, Any], tmp_path: Path
) -> None:
    x, y = holdout
    inbox, out = tmp_path / "inbox", tmp_path / "out" / "results.jsonl"
    inbox.mkdir()
    bgr = [np.repeat(img.astype(np.uint8)[..., None], 3, axis=2) for img in x[:8]]
    for i in range(3):
        assert cv2.imwrite(str(inbox / f"{i}.png"), x[i].astype(np.uint8))
    np.save(inbox / "3.npy", bgr[3])
    np.save(inbox / "4.npy", bgr[4])
    (inbox / "5.json").write_text(json.dumps({"data": bgr[5].tolist()}))
    (inbox / "6.json").write_text(json.dumps({"inputs": {"image": bgr[6].tolist()}}))
    (inbox / "corrupt.png").write_bytes(b"\x89PNG not really")
    np.save(inbox / "wrong_shape.npy", np.zeros(5, dtype=np.uint8))  # readable, but the pipeline fails
    (inbox / "notes.txt").write_text("ignored")
    (inbox / ".partial.npy").write_bytes(b"hidden: being written")

    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {"type": "folder", "path": str(inbox), "poll_interval": 0.05},
            "sinks": [{"type": "jsonl", "path": str(out), "fsync_every": 4}],
            "queue_size": 1,  # the folder waits for the model: nothing dropped
        }
    )
    pipe = Pipeline(digits_model, spec=BGR_SPEC)
    flow = Flow(cfg, lambda: pipe)
    flow.start()
    try:
        assert wait_until(lambda: len(list((inbox / "done").iterdir())) + len(list((inbox / "failed").iterdir())) == 9)
    finally:
        flow.stop()

    assert sorted(p.name for p in (inbox / "done").iterdir()) == [
        "0.png",
        "1.png",
        "2.png",
        "3.npy",
        "4.npy",
        "5.json",
        "6.json",
    ]
    assert sorted(p.name for p in (inbox / "failed").iterdir()) == ["corrupt.png", "wrong_shape.npy"]
    assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == [".partial.npy", "notes.txt"]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 7
    direct = Pipeline(digits_model)  # the bundle's own pipeline, on the raw arrays
    for r in lines:
        i = int(Path(r["meta"]["file"]).stem)
        assert top1(r) == top1(direct.run(x[i])), r["meta"]["file"]  # lossless files: the same answer
        assert r["meta"]["source"] == "folder" and r["meta"]["latency_ms"] >= 0
    assert sum(top1(r) == y[int(Path(r["meta"]["file"]).stem)] for r in lines) >= 5
    c = flow.counters()
    assert c["source"]["received"] == 9  # never twice
    assert c["source"]["errors"] == 1 and "corrupt.png" in (flow.source.last_error or "")  # type: ignore[attr-defined]
    assert c["errors"] == 1 and "step color" in (flow.last_error or "")
    assert c["processed"] == 7 and c["dropped_queue_full"] == 0
    assert c["sinks"]["jsonl"]["sent"] == 7


def test_folder_delete_mode_removes_handled_files(digits_model: Any, holdout: tuple[Any, Any], tmp_path: Path) -> None:
    x, _ = holdout
    inbox = tmp_path / "in"
    inbox.mkdir()
    np.save(inbox / "a.npy", np.repeat(x[0].astype(np.uint8)[..., None], 3, axis=2))
    cfg = FlowConfig.model_validate(
        {
            "model": "digits",
            "source": {"type": "folder", "path": str(inbox), "poll_interval": 0.05, "after": "delete"},
            "sinks": [{"type": "stdout"}],
        }
    )
    pipe = Pipeline(digits_model, spec=BGR_SPEC)
    sink = CollectSink()
    flow = Flow(cfg, lambda: pipe, sinks=[sink])
    flow.start()
    try:
        sink.take(1)
        assert wait_until(lambda: not (inbox / "a.npy").exists())
    finally:
        flow.stop()
    assert not (inbox / "done").exists() and list(inbox.iterdir()) == []


# -- stdin --------------------------------------------------------------------------------------


def test_stdin_json_lines_to_stdout_with_malformed_lines_counted(
    digits_model: Any, holdout: tuple[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    x, _ = holdout
    bgr = [np.repeat(img.astype(np.uint8)[..., None], 3, axis=2) for img in x[:3]]
    ok, png = cv2.imencode(".png", x[1].astype(np.uint8))
    assert ok
    lines = [
        json.dumps({"id": "a", "data": bgr[0].tolist()}),
        "",
        json.dumps({"id": "b", "image_b64": base64.b64encode(png.tobytes()).decode()}),
        "this is not json",
        json.dumps({"id": "c", "inputs": {"image": bgr[2].tolist()}}),
        json.dumps({"data": "abc"}),
    ]
    src = StdinSource(StdinSourceConfig(type="stdin"), stream=io.StringIO("\n".join(lines) + "\n"))
    cfg = FlowConfig.model_validate({"model": "digits", "source": {"type": "stdin"}, "sinks": [{"type": "stdout"}]})
    pipe = Pipeline(digits_model, spec=BGR_SPEC)
    flow = Flow(cfg, lambda: pipe, source=src)
    flow.start()
    try:
        assert flow.join(timeout=10)
    finally:
        flow.stop()
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["meta"]["id"] for r in out] == ["a", "b", "c"]
    direct = Pipeline(digits_model)
    assert [top1(r) for r in out] == [top1(direct.run(img)) for img in x[:3]]
    assert [r["meta"]["line"] for r in out] == [1, 3, 5]
    c = flow.counters()
    assert c["source"] == {"received": 5, "errors": 2}
    assert src.last_error is not None and "line 6" in src.last_error and "data" in src.last_error
    assert c["sinks"]["stdout"]["sent"] == 3


# -- payloads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b"{", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"dat": [1]}', "unknown field(s) ['dat']"),
        (b'{"data": [1], "image_b64": "AA=="}', "exactly one of"),
        (b'{"data": [[1, 2], [3]]}', "payload.data: not a rectangular array"),
        (b'{"data": ["a"]}', "payload.data: expected numbers"),
        (b'{"inputs": {"x": null}}', "payload.inputs.x"),
        (b'{"inputs": []}', "payload.inputs"),
        (b'{"image_b64": "%%%"}', "payload.image_b64: not valid base64"),
        (b'{"id": 1.5, "data": [1]}', "payload.id"),
    ],
)
def test_malformed_payload_error_names_the_field(payload: bytes, field: str) -> None:
    with pytest.raises(PayloadError) as e:
        parse_payload_bytes(payload)
    assert field in str(e.value)


@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_payload_error(raw: bytes) -> None:
    try:
        data, meta = parse_payload_bytes(raw)
    except PayloadError:
        return
    assert isinstance(data, np.ndarray | bytes | dict) and isinstance(meta, dict)


@given(st.recursive(st.integers(-5, 5) | st.floats(allow_nan=False, width=32), lambda c: st.lists(c, max_size=3)))
def test_any_nested_numbers_parse_or_raise_payload_error(value: Any) -> None:
    try:
        data, _ = parse_payload_bytes(json.dumps({"data": value}))
    except PayloadError:
        return
    assert isinstance(data, np.ndarray) and data.dtype.kind in "biuf"
