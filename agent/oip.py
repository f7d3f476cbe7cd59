"""Open Inference Protocol (KServe v2) tensors: datatypes, JSON and binary encodings.

Pure functions over bytes and arrays; every malformed input raises :class:`RequestError` with a
message naming the tensor and the field, which the API turns into a 400.

JSON bodies go through :func:`parse_json` and :func:`dump_json`: orjson when it is installed (the
agent extra brings it), else the standard library. Parsing and printing numbers is most of a JSON
request's cost beyond HTTP (a 6.7 KB body of 321 floats: ~110 µs in ``json.loads`` and ~50 µs in
``json.dumps`` of its 64-float answer, 5-10x less with orjson; see bench/RESULTS.md).
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

from edgefleet.agent.tensors import TensorSpec
from edgefleet.errors import EdgefleetError

__all__ = [
    "DATATYPES",
    "RequestError",
    "datatype_of",
    "decode_binary",
    "decode_json",
    "dump_json",
    "encode_binary",
    "encode_json_data",
    "parse_json",
    "parse_shape",
    "tensor_metadata",
]

try:  # the fast codec, when installed
    import orjson as _orjson
except ImportError:  # pragma: no cover - the agent extra installs it
    _orjson = None  # type: ignore[assignment]


class RequestError(EdgefleetError):
    """A request the API must refuse; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_BY_DTYPE = {v: k for k, v in DATATYPES.items()}
MAX_RANK = 16


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP datatype name of a numpy dtype (text of any kind is ``BYTES``)."""
    if dtype.kind in "OUS":
        return "BYTES"
    try:
        return _BY_DTYPE[dtype]
    except KeyError as e:
        raise RequestError(f"dtype {dtype} has no Open Inference Protocol datatype", 500) from e


def api_datatype(spec: TensorSpec) -> str:
    """What the API advertises: quantized tensors speak float (the agent quantizes)."""
    return "FP32" if spec.quantization is not None else datatype_of(spec.dtype)


def tensor_metadata(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": api_datatype(spec), "shape": [-1 if d is None else d for d in spec.shape]}


def parse_json(data: bytes | bytearray | memoryview) -> Any:
    """A JSON body. Raises :class:`RequestError` (400) for invalid JSON (NaN and Infinity are not
    JSON) or JSON nested too deeply (orjson stops at 1024 levels, the standard library at Python's
    recursion limit)."""
    try:
        if _orjson is not None:
            return _orjson.loads(data)
        return json.loads(bytes(data), parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        if "depth limit" in str(e):  # orjson's words for nesting past its 1024 levels
            raise RequestError("request body is JSON nested too deeply") from None
        raise RequestError(f"request body is not valid JSON: {e}") from e
    except RecursionError:
        raise RequestError("request body is JSON nested too deeply") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def dump_json(obj: Any) -> bytes:
    """``obj`` (dicts, lists, str, int, float, bool, None) as compact UTF-8 JSON. A NaN or infinity (a
    model can output one) is ``null`` with orjson and ``NaN`` with the standard library: never an error."""
    if _orjson is not None:
        return _orjson.dumps(obj)
    return json.dumps(obj, separators=(",", ":")).encode()


def parse_shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        raise RequestError(f"{where}: shape must be a list of at most {MAX_RANK} non-negative integers")
    for d in value:
        if type(d) is not int or d < 0:
            raise RequestError(f"{where}: shape must be a list of non-negative integers, got {value!r}")
    return tuple(value)


def _check_kind(arr: np.ndarray[Any, Any], datatype: str, where: str) -> None:
    kind = arr.dtype.kind
    ok = {
        "BOOL": kind == "b",
        "BYTES": kind in "US" or (kind == "f" and arr.size == 0),
    }.get(datatype, kind in "iub" if datatype[0] in "IU" else kind in "iuf")
    if not ok and not (arr.size == 0 and kind == "f"):
        raise RequestError(f"{where}: data holds {arr.dtype.kind!r}-kind values, not {datatype}")


def decode_json(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray[Any, Any]:
    """``data`` (flat or nested JSON list) as an array of ``datatype`` and ``shape``."""
    if data is None:
        raise RequestError(f"{where}: needs 'data' or parameters.binary_data_size")
    target = DATATYPES[datatype]
    try:
        raw = np.asarray(data)
    except (ValueError, TypeError) as e:
        raise RequestError(f"{where}: data is not a regular (non-ragged) list: {e}") from e
    if raw.dtype == object:
        raise RequestError(f"{where}: data must hold numbers, booleans or strings of one kind")
    _check_kind(raw, datatype, where)
    count = math.prod(shape)
    if raw.size != count:
        raise RequestError(f"{where}: data has {raw.size} elements, shape {list(shape)} needs {count}")
    if target.kind in "iu" and raw.size and raw.dtype.kind in "iu":
        info = np.iinfo(target)
        lo, hi = int(raw.min()), int(raw.max())
        if lo < info.min or hi > info.max:
            raise RequestError(f"{where}: values {lo}..{hi} do not fit {datatype}")
    if datatype == "BYTES":
        return raw.astype(object).reshape(shape)
    if raw.dtype.kind != "f" or target.kind != "f" or target.itemsize >= raw.itemsize:
        return raw.astype(target).reshape(shape)  # exact, or integer rounding: nothing can overflow
    with np.errstate(over="ignore"):  # float64 -> float32/16: a finite value can become inf
        arr = raw.astype(target).reshape(shape)
    if not np.isfinite(arr).all() and np.isfinite(raw).all():
        raise RequestError(f"{where}: values overflow {datatype}")
    return arr


def decode_binary(raw: memoryview, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray[Any, Any]:
    """Binary tensor data (little-endian; BYTES as 4-byte length-prefixed elements)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        items: list[bytes] = []
        off, n = 0, len(raw)
        while off < n:
            if off + 4 > n:
                raise RequestError(f"{where}: truncated BYTES element length")
            (size,) = struct.unpack_from("<I", raw, off)
            off += 4
            if off + size > n:
                raise RequestError(f"{where}: BYTES element of {size} bytes runs past the tensor's data")
            items.append(bytes(raw[off : off + size]))
            off += size
        if len(items) != count:
            raise RequestError(f"{where}: {len(items)} BYTES elements, shape {list(shape)} needs {count}")
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    dt = DATATYPES[datatype].newbyteorder("<")
    if len(raw) != count * dt.itemsize:
        raise RequestError(
            f"{where}: binary_data_size is {len(raw)} bytes; "
            f"shape {list(shape)} of {datatype} needs {count * dt.itemsize}"
        )
    return np.frombuffer(raw, dtype=dt).reshape(shape)


def encode_json_data(arr: np.ndarray[Any, Any]) -> list[Any]:
    flat = arr.reshape(-1)
    if flat.dtype.kind in "OS":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.tolist()  # type: ignore[no-any-return]


def encode_binary(arr: np.ndarray[Any, Any]) -> bytes:
    if arr.dtype.kind in "OUS":
        parts = []
        for v in arr.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode()
            parts.append(struct.pack("<I", len(b)) + b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
