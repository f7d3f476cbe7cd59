"""Property tests: whatever bytes arrive, the manifest and bundle parsers raise only BundleError."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.bundle import BundleReader, parse_manifest
from edgefleet.errors import BundleError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_manifest_parser_never_crashes_on_bytes(data: bytes) -> None:
    try:
        parse_manifest(data)
    except BundleError:
        pass


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "schema_version",
                "name",
                "version",
                "runtime",
                "model",
                "inputs",
                "outputs",
                "pipeline",
                "created_at",
                "golden",
                "x",
            ]
        ),
        json_values,
        max_size=9,
    )
)
def test_manifest_parser_never_crashes_on_json(obj: dict[str, Any]) -> None:
    obj.setdefault("schema_version", 1)
    try:
        parse_manifest(json.dumps(obj))
    except BundleError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1, max_size=30),
            st.binary(max_size=64),
            st.sampled_from([tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.DIRTYPE]),
        ),
        max_size=4,
    ),
    st.integers(min_value=0, max_value=4096),
)
def test_bundle_reader_never_crashes(tmp_path: Path, members: list[tuple[str, bytes, bytes]], cut: int) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    path = tmp_path / "fuzz.efb"
    path.write_bytes(raw[: max(cut, 1)] if cut else raw)
    try:
        with BundleReader(path) as b:
            b.verify_hashes()
    except BundleError:
        pass


def _tiny_bundle() -> bytes:
    from datetime import UTC, datetime

    from edgefleet.bundle import Manifest, file_ref, write_bundle

    out = Path(tempfile.mkdtemp()) / "b.efb"
    m = Manifest(
        name="m", version="1.0.0", runtime="onnx", model=file_ref("model.onnx", b"m" * 700),
        inputs=[{"name": "x", "dtype": "float32", "shape": [1]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1]}], created_at=datetime(2026, 11, 1, tzinfo=UTC),
    )
    return write_bundle(out, m, {"model.onnx": b"m" * 700}).read_bytes()


_TINY = _tiny_bundle()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=2048), st.integers(min_value=0, max_value=4096))
def test_any_trailing_byte_that_is_not_nul_is_refused_and_nul_padding_is_not(tmp_path: Path, tail: bytes, pad: int) -> None:
    path = tmp_path / "t.efb"
    path.write_bytes(_TINY + bytes(pad) + tail)
    if tail.strip(b"\0"):
        at = len(_TINY) + pad + len(tail) - len(tail.lstrip(b"\0"))
        try:
            BundleReader(path).close()
        except BundleError as e:
            assert str(e).endswith(f"trailing data after the end of the archive at offset {at}"), str(e)
        else:
            raise AssertionError("trailing data was accepted")
    else:
        with BundleReader(path) as b:
            assert b.manifest.name == "m"
