"""The agent's HTTP/1.1 server at the protocol level: raw sockets and curl."""

from __future__ import annotations

import gzip
import json
import shutil
import socket
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _server import running_api, serving

BODY = json.dumps(
    {
        "inputs": [
            {"name": "features", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]},
            {"name": "scale", "shape": [], "datatype": "INT64", "data": [2]},
        ]
    }
).encode()


@pytest.fixture(scope="module")
def api(models_dir: Path) -> Iterator[str]:
    with running_api({"multi": models_dir / "multi_io.onnx"}, max_body_bytes=64 * 1024) as (url, _):
        yield url


def raw(api: str, payload: bytes) -> bytes:
    """Send raw bytes; read the answer until the server closes the connection."""
    host, port = api.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(payload)
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def request(path: str, body: bytes, extra: bytes = b"", close: bool = True) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n".encode() + extra
    return head + (b"Connection: close\r\n" if close else b"") + b"\r\n" + body


def test_keep_alive_serves_many_requests_on_one_connection(api: str) -> None:
    payload = request("/v2/models/multi/infer", BODY, close=False) * 20 + request("/v2/models/multi/infer", BODY)
    answer = raw(api, payload)
    assert answer.count(b"HTTP/1.1 200") == 21


def test_chunked_request_body(api: str) -> None:
    half = len(BODY) // 2
    chunked = (
        f"{half:x}\r\n".encode()
        + BODY[:half]
        + b"\r\n"
        + f"{len(BODY) - half:x}\r\n".encode()
        + BODY[half:]
        + b"\r\n0\r\n\r\n"
    )
    head = b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    answer = raw(api, head + chunked)
    assert answer.startswith(b"HTTP/1.1 200") and b'"weighted"' in answer


def test_malformed_http_is_a_400(api: str) -> None:
    answer = raw(api, b"NONSENSE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"bad HTTP request" in answer


def test_declared_oversized_body_is_refused_before_it_is_read(api: str) -> None:
    head = b"POST /v2/models/multi/infer HTTP/1.1\r\nHost: localhost\r\nContent-Length: 999999999\r\n\r\n"
    answer = raw(api, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"over the 65536-byte JSON limit" in answer


def test_huge_header_is_refused(api: str) -> None:
    answer = raw(api, b"GET /v2 HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431"), answer[:100]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_expect_100_continue(api: str, tmp_path: Path) -> None:
    body = json.loads(BODY)
    body["padding"] = "x" * 4000
    f = tmp_path / "body.json"
    f.write_text(json.dumps(body))
    r = subprocess.run(
        [
            "curl",
            "-s",
            "-S",
            "-v",
            "--max-time",
            "5",
            "-H",
            "Expect: 100-continue",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{f}",
            f"http://{api}/v2/models/multi/infer",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "Expect: 100-continue" in r.stderr and "HTTP/1.1 100" in r.stderr
    assert json.loads(r.stdout)["model_name"] == "multi"


def test_percent_encoded_paths_are_decoded(models_dir: Path, tmp_path: Path) -> None:
    import shutil as sh

    spaced = tmp_path / "my model.onnx"
    sh.copy(models_dir / "multi_io.onnx", spaced)
    with running_api({"my model": spaced}) as (url, _):
        answer = raw(url, b"GET /v2/models/my%20model/ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize(
    ("encoding", "payload", "status"),
    [
        ("gzip", gzip.compress(BODY), b"200"),
        ("deflate", zlib.compress(BODY), b"200"),
        ("gzip", gzip.compress(BODY)[:-9], b"400"),  # cut off: not one complete stream
        ("gzip", gzip.compress(BODY) + b"junk", b"400"),  # trailing bytes after the stream
        ("gzip", b"not gzip at all", b"400"),
        ("deflate", zlib.compress(b" " * 200_000), b"413"),  # decodes past the 64 KiB limit
    ],
)
def test_compressed_bodies_are_decoded_whole_or_refused_with_json(
    api: str, encoding: str, payload: bytes, status: bytes
) -> None:
    extra = f"Content-Encoding: {encoding}\r\nContent-Type: application/json\r\n".encode()
    answer = raw(api, request("/v2/models/multi/infer", payload, extra))
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:300]
    json.loads(answer.partition(b"\r\n\r\n")[2])


def test_a_gzip_body_of_several_mib_is_decoded_whole(models_dir: Path) -> None:
    payload = gzip.compress(b" " * 3_000_000 + BODY)  # decoded a MiB at a time
    extra = b"Content-Encoding: gzip\r\nContent-Type: application/json\r\n"
    with running_api({"multi": models_dir / "multi_io.onnx"}, max_body_bytes=4 << 20) as (url, _):
        answer = raw(url, request("/v2/models/multi/infer", payload, extra))
    assert answer.startswith(b"HTTP/1.1 200") and b'"weighted"' in answer, answer[:300]


# --- the ASGI bridge: a response's head is held until its body (one write), so a failure in between
# still gets a clean JSON 500 ------------------------------------------------------------------------




def _app(fail_after_start: bool = False, body: bool = True) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        if fail_after_start:
            raise RuntimeError("a bug between the head and the body")
        if body:
            await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_response_head_and_body_arrive_together_on_keep_alive() -> None:
    with serving(_app()) as url:
        get = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
        answer = raw(url, get * 3 + b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.count(b"HTTP/1.1 200") == 4 and answer.count(b"\r\n\r\nok") == 4


def test_app_failing_after_its_response_start_gets_a_json_500() -> None:
    with serving(_app(fail_after_start=True)) as url:
        answer = raw(url, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500") and "error" in json.loads(body)


def test_app_sending_a_start_and_no_body_message_ends_the_response() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})

    with serving(app) as url:
        answer = raw(url, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 204")


# --- the API's JSON codec (edgefleet.agent.oip): orjson when installed, else the standard library ---


@pytest.fixture(params=["orjson", "stdlib"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    from edgefleet.agent import oip

    if request.param == "stdlib":
        monkeypatch.setattr(oip, "_orjson", None)
    elif oip._orjson is None:
        pytest.skip("orjson is not installed")
    return str(request.param)


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"inputs": [', "not valid JSON"),
        (b'{"x": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 5000 + b"]" * 5000, "JSON"),
    ],
)
def test_bad_json_bodies_are_one_request_error_with_either_codec(codec: str, body: bytes, says: str) -> None:
    from edgefleet.agent.oip import RequestError, parse_json

    with pytest.raises(RequestError, match=says) as e:
        parse_json(body)
    assert e.value.status == 400


def test_json_codecs_agree_on_an_inference_request_and_answer(codec: str) -> None:
    from edgefleet.agent.oip import dump_json, parse_json

    req = json.loads(BODY)
    assert parse_json(BODY) == req
    answer = {"model_name": "m", "outputs": [{"name": "y", "data": [0.1, -2.5e-07, 3, True, None, "é"]}]}
    assert json.loads(dump_json(answer)) == answer
