"""Hypothesis fuzzing of infer bodies: never a 5xx, and the agent keeps serving."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _server import running_api
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DTYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES", "NOPE", 3, None]
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
data = st.recursive(scalars, lambda c: st.lists(c, max_size=5), max_leaves=30)
shapes = st.one_of(st.lists(st.integers(-2, 6), max_size=5), st.just([2**40, 2**40]), st.text(max_size=3), st.none())
tensor = st.fixed_dictionaries(
    {"name": st.sampled_from(["features", "scale", "input", "image", "x", 1])},
    optional={
        "datatype": st.sampled_from(DTYPES),
        "shape": shapes,
        "data": data,
        "parameters": st.one_of(
            st.none(), st.fixed_dictionaries({"binary_data_size": st.one_of(st.integers(-3, 64), st.text(max_size=2))})
        ),
    },
)
bodies = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.one_of(st.lists(tensor, max_size=3), scalars),
        "outputs": st.one_of(
            st.lists(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["total", "logits", "z"])},
                    optional={
                        "parameters": st.dictionaries(st.sampled_from(["binary_data", "classification"]), scalars)
                    },
                ),
                max_size=3,
            ),
            scalars,
        ),
        "parameters": st.one_of(st.dictionaries(st.sampled_from(["binary_data_output", "x"]), scalars), scalars),
        "id": scalars,
    },
)


@pytest.fixture(scope="module")
def api(models_dir: Path) -> Iterator[str]:
    models = {
        "multi": models_dir / "multi_io.onnx",
        "multitf": models_dir / "multi_io.tflite",
        "digits": models_dir / "digits_cnn_int8.tflite",
    }
    with running_api(models) as (url, _):
        yield url


@pytest.fixture(scope="module")
def http(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://{api}", timeout=30) as c:
        yield c


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=bodies, model=st.sampled_from(["multi", "multitf", "digits", "nope"]))
def test_json_infer_bodies_never_get_a_5xx(http: httpx.Client, body: dict[str, Any], model: str) -> None:
    r = http.post(f"/v2/models/{model}/infer", content=json.dumps(body))
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert isinstance(r.json()["error"], str)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=bodies, blob=st.binary(max_size=64), cut=st.integers(-5, 400))
def test_binary_infer_bodies_never_get_a_5xx(http: httpx.Client, body: dict[str, Any], blob: bytes, cut: int) -> None:
    head = json.dumps(body).encode()
    r = http.post(
        "/v2/models/multi/infer",
        content=head + blob,
        headers={"Inference-Header-Content-Length": str(cut if cut != 0 else len(head))},
    )
    assert r.status_code < 500, r.text


def test_agent_still_serves_after_fuzzing(http: httpx.Client) -> None:
    assert http.get("/v2/health/ready").status_code == 200
    body = {
        "inputs": [
            {"name": "features", "shape": [1, 1], "datatype": "FP32", "data": [1]},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": [1]},
        ]
    }
    assert http.post("/v2/models/multi/infer", json=body).status_code == 200
