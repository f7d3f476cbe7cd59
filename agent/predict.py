"""The ``predict`` extension's request bodies (``POST /v2/models/{name}/predict``): an image, whose size
is read from its header before anything is decoded, or JSON for the bundle's pipeline."""

from __future__ import annotations

import struct
from typing import Any

from edgefleet.agent import oip
from edgefleet.agent.oip import RequestError
from edgefleet.agent.registry import Served

__all__ = ["PREDICT_TYPES", "has_pipeline", "image_input", "image_size", "predict_json"]

PREDICT_TYPES = ("application/json", "image/jpeg", "image/png", "application/octet-stream")
_PNG = b"\x89PNG\r\n\x1a\n"
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG frame headers (not DHT, JPG, DAC)


def image_size(data: bytes, media: str = "application/octet-stream") -> tuple[str, int, int]:
    """(``"png"`` or ``"jpeg"``, width, height) read from the header alone: PNG's IHDR chunk, or JPEG's
    first frame header (SOFn), found by walking the marker segments before the first scan.

    Raises RequestError (400) for a body that is not a PNG or JPEG, or is not the one its ``media``
    type names, or whose header is cut short or gives no size."""
    kind = "png" if data[:8] == _PNG else "jpeg" if data[:3] == b"\xff\xd8\xff" else None
    if kind is None or (media != "application/octet-stream" and media != f"image/{kind}"):
        said = "a PNG or JPEG image" if media == "application/octet-stream" else f"a {media} image"
        raise RequestError(f"body is not {said} ({len(data)} bytes starting {data[:8]!r})")
    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise RequestError("body is not a valid PNG: no IHDR chunk")
        width, height = struct.unpack(">II", data[16:24])
    else:
        width = height = 0
        i, n = 2, len(data)
        while i + 4 <= n:
            if data[i] != 0xFF:
                raise RequestError(f"body is not a valid JPEG: no marker at byte {i}")
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
                i += 2
                continue
            if marker in (0xDA, 0xD9):  # a scan (or the end) before any frame header
                break
            length = int.from_bytes(data[i + 2 : i + 4], "big")
            if length < 2:
                raise RequestError(f"body is not a valid JPEG: segment length {length} at byte {i}")
            if marker in _SOF:
                if i + 9 <= n:
                    height, width = struct.unpack(">HH", data[i + 5 : i + 9])
                break
            i += 2 + length
        if not height:  # height 0 means "given by a DNL marker after the scan": refused too
            raise RequestError("body is not a valid JPEG: no frame header (SOF) with a size before the image data")
    if not width or not height:
        raise RequestError(f"image has no pixels ({width}x{height})")
    return kind, width, height


def image_input(body: bytes, kind: str) -> tuple[Any, None]:
    """An image body (its size already checked) decoded as the pipeline takes it: HWC BGR uint8."""
    from edgefleet.agent.pipeline import decode_image  # pipelines (and OpenCV) load with the first predict

    return decode_image(body, f"body ({kind})"), None


def has_pipeline(served: Served) -> bool:
    m = served.model.manifest
    if m is None:
        return False
    p = m.pipeline
    return bool(p.preprocess or p.postprocess or p.raw_outputs)


def predict_json(body: bytes, served: Served) -> tuple[Any, Any]:
    """A /predict JSON body as the pipeline's data and its raw_outputs choice: ``{"data": [...]}``
    (optionally with ``"raw_outputs"``), an object of the model's inputs, or a bare list.
    Raises RequestError (400)."""
    req = oip.parse_json(body)
    names = [s.name for s in served.model.inputs]
    if isinstance(req, list):
        return req, None
    if isinstance(req, dict) and "data" in req:
        extra = sorted(set(req) - {"data", "raw_outputs"})
        if extra:
            raise RequestError(f"unknown field(s) {extra}; a predict body has 'data' and optionally 'raw_outputs'")
        raw = req.get("raw_outputs")
        if raw is not None and not isinstance(raw, bool) and not _strings(raw):
            raise RequestError("raw_outputs must be true, false or a list of output names")
        return req["data"], raw
    if isinstance(req, dict) and req and set(req) <= set(names):
        return req, None
    raise RequestError(
        f'body must be {{"data": [...]}}, a list, or an object of the model\'s inputs {names}; got '
        + (f"an object with {sorted(req)[:8]}" if isinstance(req, dict) else type(req).__name__)
    )


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)
