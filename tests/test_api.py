"""The local inference API against real clients: tritonclient.http and raw HTTP (httpx)."""

from __future__ import annotations

import gzip
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from _server import running_api
from _support import digits_input

from edgefleet.agent import load_model

SERVED = {
    "digits-onnx": "digits_cnn_float.onnx",
    "digits-tflite": "digits_cnn_int8.tflite",
    "multi-onnx": "multi_io.onnx",
    "multi-tflite": "multi_io.tflite",
    "qio-onnx": "digits_qio.onnx",
}


@pytest.fixture(scope="module")
def api(models_dir: Path) -> Iterator[str]:
    with running_api({k: models_dir / v for k, v in SERVED.items()}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(api: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=api)
    yield c
    c.close()


def test_health_and_metadata_through_tritonclient(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "edgefleet" and "binary_tensor_data" in meta["extensions"]
    for name in SERVED:
        assert client.is_model_ready(name)
    m = client.get_model_metadata("digits-tflite")
    # metadata tells the truth: the model's own INT8, with the scale and zero point float data is
    # quantized with (the agent also takes FP32/FP16/FP64 for it)
    assert m["inputs"] == [
        {
            "name": "image",
            "datatype": "INT8",
            "shape": [-1, 8, 8, 1],
            "parameters": {"quantization_scale": pytest.approx(1 / 255), "quantization_zero_point": -128},
        }
    ]
    assert m["outputs"][0]["datatype"] == "INT8"
    m = client.get_model_metadata("qio-onnx")
    assert [(t["name"], t["datatype"]) for t in m["inputs"] + m["outputs"]] == [("pixels", "UINT8"), ("logits", "INT8")]
    config = client.get_model_config("digits-tflite")
    assert config["input"][0]["data_type"] == "TYPE_INT8"
    m = client.get_model_metadata("multi-onnx")
    assert {t["name"]: (t["datatype"], t["shape"]) for t in m["inputs"]} == {
        "features": ("FP32", [-1, -1]),
        "scale": ("INT64", []),
    }
    assert not client.is_model_ready("nope")
    index = client.get_model_repository_index()
    assert {m["name"] for m in index} == set(SERVED) and {m["state"] for m in index} == {"READY"}


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize(
    ("name", "layout", "inp"), [("digits-onnx", "nchw", "input"), ("digits-tflite", "nhwc", "image")]
)
def test_infer_digits_matches_load_model(
    client: triton.InferenceServerClient, models_dir: Path, holdout: Any, binary: bool, name: str, layout: str, inp: str
) -> None:
    x, _ = holdout
    batch = digits_input(x[:4], layout) if name == "digits-onnx" else digits_input(x[:1], layout)
    i = triton.InferInput(inp, list(batch.shape), "FP32")
    i.set_data_from_numpy(batch, binary_data=binary)
    out_name = "logits" if name == "digits-onnx" else "output_0"
    res = client.infer(name, [i], outputs=[triton.InferRequestedOutput(out_name, binary_data=binary)])
    want = load_model(models_dir / SERVED[name]).predict({inp: batch})[out_name]
    np.testing.assert_array_equal(res.as_numpy(out_name), want)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("name", ["multi-onnx", "multi-tflite"])
def test_infer_several_inputs_int64_scalar_and_outputs(
    client: triton.InferenceServerClient, models_dir: Path, binary: bool, name: str
) -> None:
    feats = np.arange(6, dtype=np.float32).reshape(2, 3)
    scale = np.array(3, dtype=np.int64)
    a = triton.InferInput("features", [2, 3], "FP32")
    a.set_data_from_numpy(feats, binary_data=binary)
    b = triton.InferInput("scale", [], "INT64")
    b.set_data_from_numpy(scale, binary_data=binary)
    res = client.infer(
        name,
        [a, b],
        outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in ("weighted", "total", "best")],
    )
    want = load_model(models_dir / SERVED[name]).predict({"features": feats, "scale": scale})
    for k, v in want.items():
        got = res.as_numpy(k)
        assert got.dtype == v.dtype
        np.testing.assert_array_equal(got, v)
    assert res.get_response()["model_name"] == name


def test_raw_json_infer_with_nested_data_and_id(api: str) -> None:
    body = {
        "id": "req-1",
        "inputs": [
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [[1, 2]]},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": 2},
        ],
    }
    r = httpx.post(f"http://{api}/v2/models/multi-onnx/infer", json=body)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "req-1"
    assert out["weighted"]["data"] == [2.5, 4.5] and out["weighted"]["shape"] == [1, 2]
    assert out["best"]["datatype"] == "INT64"


def test_gzip_request_body_is_accepted(api: str) -> None:
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 1], "datatype": "FP32", "data": [1]},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": [1]},
        ]
    }
    r = httpx.post(
        f"http://{api}/v2/models/multi-onnx/infer",
        content=gzip.compress(json.dumps(body).encode()),
        headers={"Content-Encoding": "gzip"},
    )
    assert r.status_code == 200, r.text


def test_versioned_paths_and_config(api: str) -> None:
    assert httpx.get(f"http://{api}/v2/models/multi-onnx/versions/1").status_code == 200
    assert httpx.get(f"http://{api}/v2/models/multi-onnx/versions/7").status_code == 404
    assert httpx.get(f"http://{api}/v2/models/multi-onnx/config").json()["input"][1]["data_type"] == "TYPE_INT64"


def test_metrics_count_inferences(api: str, client: triton.InferenceServerClient) -> None:
    a = triton.InferInput("features", [1, 1], "FP32")
    a.set_data_from_numpy(np.ones((1, 1), np.float32))
    b = triton.InferInput("scale", [], "INT64")
    b.set_data_from_numpy(np.array(1, np.int64))
    client.infer("multi-tflite", [a, b])
    text = httpx.get(f"http://{api}/metrics").text
    assert 'edgefleet_inference_seconds_count{model="multi-tflite"}' in text
    assert "edgefleet_models_loaded" in text


# --- bad requests: a 4xx with {"error": ...}, never a 5xx ----------------------------------------


def _multi(**override: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": [2]},
        ]
    }
    body.update(override)
    return body


@pytest.mark.parametrize(
    ("path", "content", "headers", "status", "message"),
    [
        ("/v2/models/multi-onnx/infer", b"{not json", {}, 400, "not valid JSON"),
        ("/v2/models/multi-onnx/infer", b"[]", {}, 400, "must be a JSON object"),
        ("/v2/models/nope/infer", json.dumps(_multi()).encode(), {}, 404, "unknown model 'nope'"),
        (
            "/v2/models/multi-onnx/infer",
            json.dumps(
                _multi(
                    inputs=[
                        {"name": "features", "shape": [2, 2], "datatype": "FP32", "data": [1.0, 2.0]},
                        {"name": "scale", "shape": [], "datatype": "INT64", "data": [1]},
                    ]
                )
            ).encode(),
            {},
            400,
            "input 'features': data has 2 elements, shape [2, 2] needs 4",
        ),
        (
            "/v2/models/digits-onnx/infer",
            json.dumps(
                {"inputs": [{"name": "input", "shape": [1, 1, 8, 9], "datatype": "FP32", "data": [0.0] * 72}]}
            ).encode(),
            {},
            400,
            "input 'input': expected shape [?, 1, 8, 8], got [1, 1, 8, 9]",
        ),
        (
            "/v2/models/multi-onnx/infer",
            json.dumps(
                _multi(
                    inputs=[
                        {"name": "features", "shape": [1, 2], "datatype": "FP64", "data": [1.0, 2.0]},
                        {"name": "scale", "shape": [], "datatype": "INT64", "data": [1]},
                    ]
                )
            ).encode(),
            {},
            400,
            "input 'features': datatype FP64 does not match the model's FP32; it accepts FP32",
        ),
        (
            "/v2/models/multi-onnx/infer",
            json.dumps(
                _multi(
                    inputs=[
                        {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]},
                        {"name": "scale", "shape": [], "datatype": "INT64", "data": [1.5]},
                    ]
                )
            ).encode(),
            {},
            400,
            "input 'scale': data holds 'f'-kind values, not INT64",
        ),
        (
            "/v2/models/multi-onnx/infer",
            json.dumps(_multi(inputs=[{"name": "feature", "shape": [1], "datatype": "FP32", "data": [1.0]}])).encode(),
            {},
            400,
            "unknown input 'feature'",
        ),
        (
            "/v2/models/multi-onnx/infer",
            json.dumps(_multi(inputs=[_multi()["inputs"][0]])).encode(),
            {},
            400,
            "missing input(s) ['scale']",
        ),
        (
            "/v2/models/multi-onnx/infer",
            json.dumps(_multi(outputs=[{"name": "nope"}])).encode(),
            {},
            400,
            "unknown output 'nope'",
        ),
        ("/v2/models/multi-onnx/infer", b"x" * (2 << 20), {}, 413, "over the 1048576-byte JSON limit"),
        ("/v2/models/multi-onnx/infer", b"{}", {"Content-Encoding": "br"}, 415, "unsupported Content-Encoding"),
        (
            "/v2/models/multi-onnx/infer",
            b"{}",
            {"Inference-Header-Content-Length": "999"},
            400,
            "Inference-Header-Content-Length '999'",
        ),
        ("/v2/nothing", b"", {}, 404, "no such endpoint"),
    ],
)
def test_bad_requests_get_a_4xx_json_error(
    api: str, path: str, content: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    r = httpx.post(f"http://{api}{path}", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def _binary_request(header: dict[str, Any], blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


def test_truncated_binary_payload_is_a_400(api: str) -> None:
    feats = np.ones((1, 2), np.float32).tobytes()
    header = {
        "inputs": [
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": len(feats)}},
            {"name": "scale", "shape": [], "datatype": "INT64", "parameters": {"binary_data_size": 8}},
        ]
    }
    body, headers = _binary_request(header, feats + struct.pack("<q", 2)[:5])
    r = httpx.post(f"http://{api}/v2/models/multi-onnx/infer", content=body, headers=headers)
    assert r.status_code == 400
    assert "input 'scale': binary data truncated" in r.json()["error"]


def test_binary_size_that_does_not_fit_the_shape_is_a_400(api: str) -> None:
    header = {
        "inputs": [
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "parameters": {"binary_data_size": 4}},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": [1]},
        ]
    }
    body, headers = _binary_request(header, b"\0" * 4)
    r = httpx.post(f"http://{api}/v2/models/multi-onnx/infer", content=body, headers=headers)
    assert r.status_code == 400 and "needs 8" in r.json()["error"]


def test_wrong_method_is_a_405(api: str) -> None:
    r = httpx.get(f"http://{api}/v2/models/multi-onnx/infer")
    assert r.status_code == 405 and "use POST" in r.json()["error"]


def test_swapping_a_model_drops_no_request(models_dir: Path, holdout: Any) -> None:
    """Clients keep inferring while the model is swapped between two versions many times."""
    import threading

    from edgefleet.agent.runtime import load_model as load

    x, _ = holdout
    batch = digits_input(x[:1], "nchw")
    body = {
        "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": batch.reshape(-1).tolist()}]
    }
    versions = [load(models_dir / "digits_cnn_float.onnx"), load(models_dir / "digits_cnn_int8.onnx")]
    with running_api({"digits": models_dir / "digits_cnn_float.onnx"}) as (url, app):
        statuses: list[int] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=f"http://{url}") as c:
                while not stop.is_set():
                    statuses.append(c.post("/v2/models/digits/infer", json=body).status_code)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(40):
            app.registry.put("digits", versions[i % 2], version=str(i + 2))
            while len(statuses) < 5 * (i + 1):  # let some requests through on each version
                stop.wait(0.001)
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}


def _onnx(path: Path, in_type: int, out_type: int, op: str, shape: list[Any]) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", in_type, shape)],
        [helper.make_tensor_value_info("y", out_type, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("binary", [False, True])
def test_bytes_fp16_and_bool_tensors_through_tritonclient(tmp_path: Path, binary: bool) -> None:
    from onnx import TensorProto

    models = {
        "text": _onnx(tmp_path / "text.onnx", TensorProto.STRING, TensorProto.STRING, "Identity", [None]),
        "half": _onnx(tmp_path / "half.onnx", TensorProto.FLOAT16, TensorProto.FLOAT16, "Relu", ["n", 3]),
        "flag": _onnx(tmp_path / "flag.onnx", TensorProto.BOOL, TensorProto.BOOL, "Not", [2]),
    }
    cases = [
        ("text", "BYTES", np.array([b"a", "é".encode()], dtype=object), np.array([b"a", "é".encode()], dtype=object)),
        ("half", "FP16", np.array([[-1, 2, 3]], np.float16), np.array([[0, 2, 3]], np.float16)),
        ("flag", "BOOL", np.array([True, False]), np.array([False, True])),
    ]
    with running_api(models) as (url, _):
        client = triton.InferenceServerClient(url=url)
        for name, datatype, x, want in cases:
            i = triton.InferInput("x", list(x.shape), datatype)
            i.set_data_from_numpy(x, binary_data=binary)
            got = client.infer(name, [i], outputs=[triton.InferRequestedOutput("y", binary_data=binary)]).as_numpy("y")
            if datatype == "BYTES":
                got = np.array([v if isinstance(v, bytes) else str(v).encode() for v in got], dtype=object)
            np.testing.assert_array_equal(got, want)
        client.close()


@pytest.mark.parametrize(
    ("name", "inp", "layout", "native", "np_type"),
    [("digits-tflite", "image", "nhwc", "INT8", np.int8), ("qio-onnx", "pixels", "nchw", "UINT8", np.uint8)],
)
def test_quantized_input_takes_its_own_integer_datatype_or_float(
    client: triton.InferenceServerClient,
    models_dir: Path,
    holdout: Any,
    name: str,
    inp: str,
    layout: str,
    native: str,
    np_type: Any,
) -> None:
    """The datatype the metadata names works as it says (integer in, integer out, equal to the raw
    model); float is the convenience form (quantized with the tensor's scale, float out)."""
    x, _ = holdout
    model = load_model(models_dir / SERVED[name])
    spec = model.inputs[0]
    assert spec.quantization is not None
    floats = digits_input(x[:1], layout)
    ints = np.clip(np.round(floats / spec.quantization.scale) + spec.quantization.zero_point, -128, 255).astype(np_type)
    out = model.outputs[0].name
    for data, datatype in ((ints, native), (floats, "FP32"), (floats.astype(np.float16), "FP16")):
        i = triton.InferInput(inp, list(data.shape), datatype)
        i.set_data_from_numpy(data, binary_data=True)
        res = client.infer(name, [i], outputs=[triton.InferRequestedOutput(out, binary_data=True)])
        want = model.predict({inp: data})[out]
        got = res.as_numpy(out)
        assert got.dtype == want.dtype and (got.dtype.kind == "f") == (datatype != native)
        np.testing.assert_array_equal(got, want)
    assert res.get_response()["outputs"][0]["datatype"] == "FP32"


def test_wrong_datatype_for_a_quantized_input_lists_every_accepted_datatype(api: str) -> None:
    body = {"inputs": [{"name": "image", "shape": [1, 8, 8, 1], "datatype": "INT32", "data": [0] * 64}]}
    r = httpx.post(f"http://{api}/v2/models/digits-tflite/infer", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == (
        "input 'image': datatype INT32 does not match the model's INT8; it accepts INT8, or FP32/FP16/FP64 "
        "(quantized with the tensor's scale and zero point)"
    )
    body["inputs"][0]["datatype"] = "UINT8"  # another integer type is another scale: refused too
    r = httpx.post(f"http://{api}/v2/models/digits-tflite/infer", json=body)
    assert r.status_code == 400 and "it accepts INT8, or FP32/FP16/FP64" in r.json()["error"]
