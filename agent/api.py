"""The local inference API: the Open Inference Protocol (KServe v2) as a plain ASGI app.

No web framework: routing is a split of the path, so a request costs little more than the
inference itself. Inference runs on a thread pool, never on the event loop. Every bad request gets
a 4xx with ``{"error": ...}``; nothing a client sends can take the agent down.

Endpoints: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``, ``/v2/models/{name}[/versions/{v}]``,
``.../ready``, ``.../config``, ``POST .../infer`` (JSON, or the binary tensor extension with
``Inference-Header-Content-Length``), and ``GET /metrics`` (Prometheus).

Extension (not part of the OIP; its endpoints are unchanged): ``POST /v2/models/{name}/predict`` runs
the bundle's pipeline on a raw body, an image (``image/jpeg``, ``image/png``, or
``application/octet-stream`` holding either: accepted on this route only) or JSON (``{"data": [...]}``,
a list, or an object of the model's inputs), and answers its result with an ``id`` for feedback. An
image's size is read from its header and refused past ``max_image_pixels`` before anything is decoded.
``POST /v2/models/{name}/feedback`` takes ``{"id": ..., "label": ...}``, the true class of an earlier
``/predict`` answer, into live accuracy (:mod:`edgefleet.agent.telemetry.feedback`: 404 for an unknown or
forgotten id, 409 for a second feedback on one id, 422 naming the field of a bad body).

With a token (``[api] token``, required beyond loopback) every request but ``GET /v2/health/live``
(for probes; it says only that the process runs) needs ``Authorization: Bearer <token>``, else a 401.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from edgefleet import __version__
from edgefleet.agent.http import OPEN_PATH, bearer_refusal
from edgefleet.agent.metrics import AgentMetrics
from edgefleet.agent.oip import (
    DATATYPES,
    RequestError,
    datatype_of,
    decode_binary,
    decode_json,
    dump_json,
    encode_binary,
    encode_json_data,
    parse_json,
    parse_shape,
)
from edgefleet.agent.predict import PREDICT_TYPES, has_pipeline, image_input, image_size, predict_json
from edgefleet.agent.registry import ModelRegistry, RecentPredictions, Served
from edgefleet.agent.telemetry.feedback import MAX_FEEDBACK_BYTES, Feedback, FeedbackError, with_predicted_class
from edgefleet.agent.telemetry.measure import TelemetryRegistry
from edgefleet.agent.tensors import TensorSpec
from edgefleet.errors import EdgefleetError

__all__ = ["InferenceApp"]

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON = [(b"content-type", b"application/json")]
_UNAUTHORIZED = [*_JSON, (b"www-authenticate", b'Bearer realm="edgefleet-agent"')]
HEADER_LENGTH = b"inference-header-content-length"
INLINE_SECONDS = 0.0005
INLINE_BYTES = 64 * 1024
DECODE_SLOTS = 2  # large request bodies decoded at once
EXTENSIONS = ["binary_tensor_data", "model_repository", "predict", "feedback"]  # predict, feedback: edgefleet's own


class _Disconnected(Exception):
    pass


class InferenceApp:
    """ASGI application serving a :class:`ModelRegistry`."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: AgentMetrics | None = None,
        max_body_bytes: int = 64 << 20,
        workers: int | None = None,
        max_json_bytes: int = 4 << 20,
        token: bytes | None = None,
        max_image_pixels: int = 8 << 20,
        recent_predictions: int = 1024,
        telemetry: TelemetryRegistry | None = None,
    ) -> None:
        self.registry = registry
        self._token = token
        self.max_image_pixels = max_image_pixels
        self.predictions = RecentPredictions(recent_predictions)
        # feedback on predictions lands in the accuracy window of the version that made each one
        self.telemetry = telemetry if telemetry is not None else TelemetryRegistry()
        self.feedback = Feedback(self.predictions, self.telemetry, self._labels_of)
        self.metrics = metrics or AgentMetrics()
        self.max_body_bytes = max_body_bytes
        self.max_json_bytes = max_json_bytes
        self._pool = ThreadPoolExecutor(
            max_workers=workers or min(8, (os.cpu_count() or 1) + 2), thread_name_prefix="infer"
        )
        self.in_flight = 0
        self.metrics.in_flight = lambda: self.in_flight
        # Parsed JSON takes 10-25x its size (a Python float per number): at most this many large
        # bodies are decoded at once, so many clients sending big JSON cannot multiply that.
        self._decode_slots = asyncio.Semaphore(DECODE_SLOTS)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        self.in_flight += 1
        try:
            if self._token is not None and scope["path"].rstrip("/") != OPEN_PATH:
                self._authorize(scope["headers"])
            status, headers, body = await self._route(scope, receive)
        except RequestError as e:
            status, headers, body = e.status, (_UNAUTHORIZED if e.status == 401 else _JSON), _error(str(e))
        except _Disconnected:
            return
        except Exception:  # a bug, not the client's fault: log it, answer, keep serving
            log.exception("unexpected error serving %s %s", scope.get("method"), scope.get("path"))
            status, headers, body = 500, _JSON, _error("internal error; see the agent's log")
        finally:
            self.in_flight -= 1
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _authorize(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Raises RequestError 401 unless the request carries ``Authorization: Bearer <token>``. The HTTP
        server checks this before reading a body; the app checks again for any other server."""
        assert self._token is not None
        refusal = bearer_refusal(headers, self._token)
        if refusal is not None:
            raise RequestError(refusal, 401)

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        path: str = scope["path"].rstrip("/") or "/"
        method: str = scope["method"]
        parts = path.split("/")[1:]
        if parts[:1] == ["metrics"] and len(parts) == 1:
            _only(method, "GET")
            return 200, [(b"content-type", self.metrics.content_type.encode())], self.metrics.render()
        if parts[:1] != ["v2"]:
            raise RequestError(f"no such endpoint: {path}", 404)
        if len(parts) == 1:
            _only(method, "GET")
            return _ok({"name": "edgefleet", "version": __version__, "extensions": EXTENSIONS})
        if parts[1] == "health" and len(parts) == 3:
            _only(method, "GET")
            if parts[2] == "live":
                return _ok({"live": True})
            if parts[2] == "ready":
                ready = self.registry.ready
                return (200 if ready else 503), _JSON, dump_json({"ready": ready})
            raise RequestError(f"no such endpoint: {path}", 404)
        if parts[1:] == ["repository", "index"]:  # the model repository extension's listing
            _only(method, "POST")
            return _ok([{"name": s.name, "version": s.version, "state": "READY"} for s in self.registry.all()])
        if parts[1] != "models" or len(parts) < 3:
            raise RequestError(f"no such endpoint: {path}", 404)
        served = self.registry.get(parts[2])
        rest = parts[3:]
        if len(rest) >= 2 and rest[0] == "versions":
            if served is not None and rest[1] != served.version:
                raise RequestError(f"model {parts[2]!r} has no version {rest[1]!r}; it serves {served.version!r}", 404)
            rest = rest[2:]
        if served is None:
            if rest == ["ready"]:
                raise RequestError(f"model {parts[2]!r} is not loaded", 404)
            known = sorted(s.name for s in self.registry.all())
            raise RequestError(f"unknown model {parts[2]!r}; this agent serves {known}", 404)
        if not rest:
            _only(method, "GET")
            return _ok(_model_metadata(served))
        if rest == ["ready"]:
            _only(method, "GET")
            return _ok({"name": served.name, "ready": True})
        if rest == ["config"]:
            _only(method, "GET")
            return _ok(_model_config(served))
        if rest == ["infer"]:
            _only(method, "POST")
            return await self._infer(served, scope, receive)
        if rest == ["predict"]:
            _only(method, "POST")
            return await self._predict(served, scope, receive)
        if rest == ["feedback"]:
            _only(method, "POST")
            return await self._feedback(served, scope, receive)
        raise RequestError(f"no such endpoint: {path}", 404)

    def _labels_of(self, name: str, version: str) -> list[str] | None:
        s = self.registry.get(name)
        return s.model.labels if s is not None and s.version == version else None

    async def _feedback(
        self, served: Served, scope: Scope, receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The feedback extension: ground truth for an earlier prediction of this model (by its id, whatever
        version made it). Cheap (a lookup and a ring write): runs on the loop. Raises RequestError."""
        body = await self._read_body(dict(scope["headers"]), receive)
        if len(body) > MAX_FEEDBACK_BYTES:
            raise RequestError(f"feedback of {len(body)} bytes is over the {MAX_FEEDBACK_BYTES}-byte limit", 413)
        try:
            return _ok(self.feedback.give(parse_json(body), model=served.name))
        except FeedbackError as e:
            raise RequestError(str(e), e.status) from e

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive) -> bytes:
        """The whole body. The HTTP server has already bounded it by its kind (JSON or binary) and
        decoded any gzip/deflate; this re-checks the size for other ASGI servers. Raises RequestError."""
        limit = self.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"request body of {int(declared)} bytes is over the {limit}-byte limit", 413)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise _Disconnected
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise RequestError(f"request body is over the {limit}-byte limit", 413)
            chunks.append(chunk)
            if not msg.get("more_body"):
                break
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            raise RequestError(f"unsupported Content-Encoding {encoding.decode(errors='replace')!r}", 415)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _predict(
        self, served: Served, scope: Scope, receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The ``predict`` extension: the bundle's pipeline on an image or JSON body. Raises RequestError."""
        if not has_pipeline(served):
            why = "it is a bare model file" if served.model.manifest is None else "its bundle declares no steps"
            raise RequestError(
                f"model {served.name!r} has no pipeline ({why}); send tensors to /v2/models/{served.name}/infer", 404
            )
        headers = dict(scope["headers"])
        media = headers.get(b"content-type", b"application/json").split(b";", 1)[0].strip().lower().decode("latin-1")
        if media not in PREDICT_TYPES:
            raise RequestError(
                f"Content-Type {media[:60]!r} is not accepted here; send {', '.join(PREDICT_TYPES)}", 415
            )
        body = await self._read_body(headers, receive)
        if media != "application/json":
            kind, width, height = image_size(body, media)
            if width * height > self.max_image_pixels:
                raise RequestError(
                    f"image of {width}x{height} = {width * height} pixels is over the {self.max_image_pixels}-pixel "
                    "limit (api.max_image_pixels)",
                    413,
                )
            decode = functools.partial(image_input, body, kind)
        else:
            if len(body) > self.max_json_bytes:
                raise RequestError(f"JSON of {len(body)} bytes is over the {self.max_json_bytes}-byte JSON limit", 413)
            decode = functools.partial(predict_json, body, served)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            # decoding an image (or big JSON) and the pipeline's steps are CPU work on arrays of up to
            # max_image_pixels: on the pool, and only DECODE_SLOTS at once
            async with self._decode_slots:
                data, raw = await loop.run_in_executor(self._pool, decode)
                result = await loop.run_in_executor(self._pool, served.pipeline.run, data, raw)
        except RequestError:
            self.metrics.error(served.name, "bad_input")
            raise
        except EdgefleetError as e:
            self.metrics.error(served.name, "bad_input")
            raise RequestError(str(e)) from e
        except Exception as e:  # numpy/OpenCV refusing the data in their own words
            self.metrics.error(served.name, "runtime")
            raise RequestError(f"model {served.name!r}'s pipeline failed on this input: {_first_line(e)}") from e
        self.metrics.inference(served.name, time.perf_counter() - started)
        result.pop("model", None)
        pid = uuid.uuid4().hex
        self.predictions.add(pid, served.name, served.version, with_predicted_class(result))
        return _ok({"id": pid, "model_name": served.name, "model_version": served.version, **result})

    async def _infer(
        self, served: Served, scope: Scope, receive: Receive
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        headers = dict(scope["headers"])
        if headers.get(b"content-type", b"").lower().startswith(b"image/"):
            raise RequestError(f"infer takes OIP tensors; post images to /v2/models/{served.name}/predict", 415)
        body = await self._read_body(headers, receive)
        header_len = headers.get(HEADER_LENGTH)
        if header_len is not None:
            if not header_len.isdigit() or int(header_len) > len(body):
                raise RequestError(
                    f"Inference-Header-Content-Length {header_len.decode(errors='replace')!r} is not a length "
                    f"within the {len(body)}-byte body"
                )
            n = int(header_len)
            head, binary = body[:n], memoryview(body)[n:]
        else:
            head, binary = body, memoryview(b"")
        if len(head) > self.max_json_bytes:
            raise RequestError(f"JSON of {len(head)} bytes is over the {self.max_json_bytes}-byte JSON limit", 413)
        if len(head) > INLINE_BYTES or len(binary) > INLINE_BYTES:
            # parsing megabytes of JSON (and making arrays of it) takes long enough to stall the loop
            async with self._decode_slots:
                req, (feeds, outputs, binary_out) = await asyncio.get_running_loop().run_in_executor(
                    self._pool, _decode, head, served, binary
                )
        else:
            req, (feeds, outputs, binary_out) = _decode(head, served, binary)
        model = served.model
        started = time.perf_counter()
        try:
            # A hop to the thread pool costs tens of microseconds, more than a small model's whole
            # inference: small requests to models whose measured cost is under INLINE_SECONDS run on
            # the event loop. A large request always goes to the pool, so it cannot stall the loop
            # (and with it the other requests and the systemd watchdog).
            small = sum(a.nbytes for a in feeds.values()) <= INLINE_BYTES
            cost = model.cost  # the runtime call's own time (no lock or pool waits); None until measured
            if small and (cost if cost is not None else 1.0) < INLINE_SECONDS:
                result = model.predict(feeds, outputs)
            else:
                result = await asyncio.get_running_loop().run_in_executor(self._pool, model.predict, feeds, outputs)
        except EdgefleetError as e:
            self.metrics.error(served.name, "bad_input")
            raise RequestError(str(e)) from e
        except Exception as e:  # the runtime refused the input in its own words (e.g. ORT's shape errors)
            self.metrics.error(served.name, "runtime")
            raise RequestError(f"model {served.name!r} failed on this input: {_first_line(e)}") from e
        elapsed = time.perf_counter() - started
        self.metrics.inference(served.name, elapsed)
        response: dict[str, Any] = {"model_name": served.name, "model_version": served.version, "outputs": []}
        if isinstance(req.get("id"), str):
            response["id"] = req["id"]
        blobs: list[bytes] = []
        for name, arr in result.items():
            out: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
            if binary_out.get(name):
                blob = encode_binary(arr)
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = encode_json_data(arr)
            response["outputs"].append(out)
        head_out = dump_json(response)
        if not blobs:
            return 200, _JSON, head_out
        out_headers = [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH, str(len(head_out)).encode())]
        return 200, out_headers, head_out + b"".join(blobs)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _decode(
    head: bytes, served: Served, binary: memoryview
) -> tuple[Any, tuple[dict[str, np.ndarray[Any, Any]], list[str] | None, dict[str, bool]]]:
    """The request's JSON and the feeds it describes. Raises RequestError (400)."""
    req = parse_json(head)
    return req, _parse_request(req, served, binary)


def _parse_request(
    req: Any, served: Served, binary: memoryview
) -> tuple[dict[str, np.ndarray[Any, Any]], list[str] | None, dict[str, bool]]:
    if not isinstance(req, dict):
        raise RequestError("request body must be a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list")
    specs = {s.name: s for s in served.model.inputs}
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    offset = 0
    for i, inp in enumerate(inputs):
        if not isinstance(inp, dict):
            raise RequestError(f"inputs[{i}] must be an object")
        name = inp.get("name")
        if not isinstance(name, str):
            raise RequestError(f"inputs[{i}].name must be a string")
        where = f"input {name!r}"
        spec = specs.get(name)
        if spec is None:
            raise RequestError(f"unknown input {name!r}; model {served.name!r} takes {list(specs)}")
        if name in feeds:
            raise RequestError(f"{where} appears twice")
        datatype = inp.get("datatype")
        if datatype not in DATATYPES:
            raise RequestError(f"{where}: datatype must be one of {list(DATATYPES)}, got {datatype!r}")
        native = datatype_of(spec.dtype)
        if datatype != native and not (spec.quantization is not None and datatype in FLOAT_DATATYPES):
            raise RequestError(f"{where}: datatype {datatype} does not match the model's {native}; {accepts(spec)}")
        shape = parse_shape(inp.get("shape"), where)
        params = inp.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(f"{where}: parameters must be an object")
        size = params.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise RequestError(f"{where}: parameters.binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise RequestError(
                    f"{where}: binary data truncated: needs bytes {offset}..{offset + size}, the body has {len(binary)}"
                )
            feeds[name] = decode_binary(binary[offset : offset + size], datatype, shape, where)
            offset += size
        else:
            feeds[name] = decode_json(inp.get("data"), datatype, shape, where)
    if offset != len(binary):
        raise RequestError(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    req_params = req.get("parameters") or {}
    if not isinstance(req_params, dict):
        raise RequestError("parameters must be an object")
    default_binary = bool(req_params.get("binary_data_output", False))
    requested = req.get("outputs")
    out_names = [s.name for s in served.model.outputs]
    binary_out = dict.fromkeys(out_names, default_binary)
    if requested is None:
        return feeds, None, binary_out
    if not isinstance(requested, list):
        raise RequestError("'outputs' must be a list")
    names: list[str] = []
    for j, o in enumerate(requested):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise RequestError(f"outputs[{j}] must be an object with a string 'name'")
        if o["name"] not in binary_out:
            raise RequestError(f"unknown output {o['name']!r}; model {served.name!r} gives {out_names}")
        p = o.get("parameters") or {}
        if not isinstance(p, dict):
            raise RequestError(f"outputs[{j}].parameters must be an object")
        if p.get("classification"):
            raise RequestError(f"outputs[{j}]: the classification extension is not supported; use a pipeline")
        binary_out[o["name"]] = bool(p.get("binary_data", default_binary))
        names.append(o["name"])
    return feeds, names or None, binary_out


FLOAT_DATATYPES = ("FP32", "FP16", "FP64")


def accepts(spec: TensorSpec) -> str:
    """The datatypes an input takes, in words: its own, and float for a quantized tensor."""
    native = datatype_of(spec.dtype)
    if spec.quantization is None:
        return f"it accepts {native}"
    return f"it accepts {native}, or {'/'.join(FLOAT_DATATYPES)} (quantized with the tensor's scale and zero point)"


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    """A tensor's OIP metadata: the model's own datatype. A quantized tensor also states its scale and
    zero point (``parameters``), which is how float data is quantized on the way in and outputs are
    dequantized on the way out when the request gave float data."""
    meta: dict[str, Any] = {
        "name": spec.name,
        "datatype": datatype_of(spec.dtype),
        "shape": [-1 if d is None else d for d in spec.shape],
    }
    q = spec.quantization
    if q is not None:
        meta["parameters"] = {"quantization_scale": q.scale, "quantization_zero_point": q.zero_point}
    return meta


def _model_metadata(s: Served) -> dict[str, Any]:
    return {
        "name": s.name,
        "versions": [s.version],
        "platform": "onnxruntime_onnx" if s.model.backend.name == "onnxruntime" else "tensorflow_lite",
        "inputs": [tensor_metadata(t) for t in s.model.inputs],
        "outputs": [tensor_metadata(t) for t in s.model.outputs],
    }


def _model_config(s: Served) -> dict[str, Any]:
    meta = _model_metadata(s)
    return {
        "name": s.name,
        "platform": meta["platform"],
        "max_batch_size": 0,
        "input": [
            {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in meta["inputs"]
        ],
        "output": [
            {"name": t["name"], "data_type": "TYPE_" + t["datatype"], "dims": t["shape"]} for t in meta["outputs"]
        ],
    }


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise RequestError(f"method {method} not allowed here; use {allowed}", 405)


def _ok(obj: Any) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return 200, _JSON, dump_json(obj)


def _error(message: str) -> bytes:
    return dump_json({"error": message})
