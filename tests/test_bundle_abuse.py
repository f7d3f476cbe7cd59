"""Hostile bundles: junk after the tar, oversized extended headers, unbounded names echoed in errors,
versions the registry could not address, and a golden.npz that declares a huge array."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.lib import format as npf

from edgefleet.agent.selftest import load_golden
from edgefleet.bundle import BundleReader, GoldenRef, Manifest, file_ref, parse_manifest, read_npz, write_bundle
from edgefleet.bundle.archive import MAX_EXTENDED_HEADER, MAX_PADDING
from edgefleet.bundle.manifest import MAX_ECHO, MAX_VERSION_LENGTH, NAME_PATTERN, VERSION_PATTERN
from edgefleet.errors import BundleError

WHEN = datetime(2026, 11, 1, tzinfo=UTC)


def _bundle(folder: Path, version: str = "1.0.0") -> Path:
    model = b"\x08\x01" * 500
    m = Manifest(
        name="m", version=version, runtime="onnx", model=file_ref("model.onnx", model),
        inputs=[{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1, 2]}], created_at=WHEN,
    )
    folder.mkdir(parents=True, exist_ok=True)
    return write_bundle(folder / "b.efb", m, {"model.onnx": model})


def _end_of_members(path: Path) -> int:
    with tarfile.open(path, "r:") as t:
        list(t)
        return t.offset


def test_junk_after_the_end_of_the_tar_is_refused_naming_the_offset(tmp_path: Path) -> None:
    good = _bundle(tmp_path)
    data = good.read_bytes()
    end = _end_of_members(good)
    for what, body, at in (
        ("appended junk", data + b"EVIL" * 10, len(data)),
        ("junk in the record padding", data[: end + 1024] + b"X" + data[end + 1025 :], end + 1024),
        ("junk right after the last member", data[:end] + b"\x01" + bytes(1023), end),
    ):
        bad = tmp_path / "bad.efb"
        bad.write_bytes(body)
        with pytest.raises(BundleError, match=f"trailing data after the end of the archive at offset {at}$"):
            BundleReader(bad)
        assert what


def test_nul_padding_after_the_tar_is_fine_up_to_the_limit(tmp_path: Path) -> None:
    good = _bundle(tmp_path)
    padded = tmp_path / "padded.efb"
    padded.write_bytes(good.read_bytes() + bytes(10240))  # a bigger blocking factor
    assert BundleReader(padded).manifest.name == "m"
    bloated = tmp_path / "bloated.efb"
    bloated.write_bytes(good.read_bytes() + bytes(MAX_PADDING + 1))
    with pytest.raises(BundleError, match="bytes of padding after the end of the archive at offset"):
        BundleReader(bloated)


def test_an_oversized_gnu_long_name_header_is_refused_before_it_is_read(tmp_path: Path) -> None:
    out = tmp_path / "long.efb"
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("a" * (MAX_EXTENDED_HEADER + 10))
        t.addfile(info, io.BytesIO())
    with pytest.raises(BundleError, match=r"extended header at offset 0: .* more than 65536") as e:
        BundleReader(out)
    assert len(str(e.value)) < 400


def test_a_long_member_name_is_echoed_escaped_and_cut(tmp_path: Path) -> None:
    src = _bundle(tmp_path)
    out = tmp_path / "named.efb"
    name = "\x1b[31m" + "n" * 5000
    with tarfile.open(src, "r:") as t, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as w:
        for m in t:
            f = t.extractfile(m)
            w.addfile(m, f)
        w.addfile(tarfile.TarInfo(name), io.BytesIO())
    with pytest.raises(BundleError) as e:
        BundleReader(out)
    msg = str(e.value).replace(str(out), "B")
    assert "not listed in the manifest" in msg and "\x1b" not in msg and "\\x1b" in msg
    assert len(msg) < MAX_ECHO + 100, msg


def test_versions_and_names_are_bounded_exactly_as_the_registry_paths() -> None:
    longest = "1.0.0-" + "a" * (MAX_VERSION_LENGTH - 6)
    base: dict[str, Any] = json.loads(Manifest.model_validate_json(_bundle_manifest_json()).to_json())
    assert parse_manifest({**base, "version": longest}).version == longest
    assert re.match(VERSION_PATTERN, longest)
    with pytest.raises(BundleError, match=f"version: String should have at most {MAX_VERSION_LENGTH} characters"):
        parse_manifest({**base, "version": longest + "a"})
    assert not re.match(VERSION_PATTERN, longest + "a")
    assert re.match(NAME_PATTERN, "n" * 64) and not re.match(NAME_PATTERN, "n" * 65)
    with pytest.raises(BundleError, match="name"):
        parse_manifest({**base, "name": "n" * 65})


def _bundle_manifest_json() -> str:
    return Manifest(
        name="m", version="1.0.0", runtime="onnx", model=file_ref("model.onnx", b"x"),
        inputs=[{"name": "x", "dtype": "float32", "shape": [1]}],
        outputs=[{"name": "y", "dtype": "float32", "shape": [1]}], created_at=WHEN,
    ).model_dump_json()


@pytest.mark.parametrize(
    "edit",
    [
        {"schema_version": "s" * 100_000},
        {"version": "v" * 100_000},
        {"k" * 100_000: 1},
        {"pipeline": {"input": "i" * 100_000}},
        {"pipeline": {"preprocess": [{"op": "o" * 100_000}]}},
        {"inputs": [{"name": "x" * 200, "dtype": "float32", "shape": [1]}] * 2},
    ],
    ids=["schema_version", "version", "unknown key", "pipeline.input", "step op", "duplicate tensors"],
)
def test_manifest_errors_echo_a_bounded_part_of_hostile_values(edit: dict[str, Any]) -> None:
    base = json.loads(_bundle_manifest_json())
    with pytest.raises(BundleError) as e:
        parse_manifest(json.dumps({**base, **edit}))
    assert len(str(e.value)) < 600, str(e.value)[:1000]


def _npy(shape: tuple[int, ...], payload: bytes, descr: str = "<f4") -> bytes:
    h = io.BytesIO()
    npf.write_array_header_1_0(h, {"descr": descr, "fortran_order": False, "shape": shape})
    return h.getvalue() + payload


def _npz(members: dict[str, bytes], compress: bool = False) -> bytes:
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return z.getvalue()


def test_a_golden_npz_declaring_a_huge_shape_is_refused_naming_the_array() -> None:
    crafted = _npz({"input.x.npy": _npy((10**6, 10**6), bytes(16)), "output.y.npy": _npy((1,), bytes(4))})
    with pytest.raises(BundleError, match=r"array 'input.x': declares shape \(1000000, 1000000\) of float32"):
        load_golden(crafted)


def test_a_deflated_npz_bomb_is_bounded_by_the_total_limit() -> None:
    big = _npy((4 << 20,), bytes(4 << 20), "|u1")  # 4 MiB of zeros deflate to a few KiB
    crafted = _npz({"input.x.npy": big, "output.y.npy": big}, compress=True)
    assert len(crafted) < 64 << 10
    with pytest.raises(BundleError, match=r"array 'output\.y': the arrays take more than the 6291456 bytes"):
        read_npz(crafted, limit=6 << 20)


def test_object_arrays_and_non_npy_members_are_refused() -> None:
    with pytest.raises(BundleError, match=r"array 'input\.x': object arrays"):
        read_npz(_npz({"input.x.npy": _npy((1,), bytes(8), "|O")}))
    with pytest.raises(BundleError, match=r"array 'notes\.txt': not an \.npy member"):
        read_npz(_npz({"notes.txt": b"hi"}))
    arrays = read_npz(_npz({"input.x.npy": _npy((2,), np.ones(2, np.float32).tobytes())}))
    assert arrays["input.x"].tolist() == [1.0, 1.0]


def test_model_verify_of_a_bundle_with_a_crafted_golden_is_one_line_and_allocates_nothing(
    tmp_path: Path, models_dir: Path
) -> None:
    from edgefleet.converters.package import package_model

    path, manifest = package_model(models_dir / "digits_cnn_float.onnx", "digits", "1.0.0", out=tmp_path / "a")
    with BundleReader(path) as b:
        model = b.read_model()
    name = manifest.inputs[0].name
    crafted = _npz({f"input.{name}.npy": _npy((1, 10**7, 10**7), bytes(256)), "output.y.npy": _npy((1,), bytes(4))})
    golden = GoldenRef(**file_ref("golden.npz", crafted).model_dump(), count=1)
    bad = manifest.model_copy(update={"golden": golden})
    out = write_bundle(tmp_path / "bad.efb", bad, {manifest.model.path: model, "golden.npz": crafted})
    probe = (
        "import resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-c', 'from edgefleet.cli.main import main; main()', 'model', 'verify',"
        f" {str(out)!r}], capture_output=True, text=True)\n"
        "print(r.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stderr)"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    code, peak_kib, err = r.stdout.split("\n", 2)
    lines = [line for line in err.splitlines() if line.strip()]
    assert int(code) == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and f"array 'input.{name}': declares shape (1, 10000000, 10000000)" in lines[0]
    print(f"model verify of the crafted golden.npz: peak RSS {int(peak_kib) / 1024:.0f} MiB")
    assert int(peak_kib) < 512 * 1024
