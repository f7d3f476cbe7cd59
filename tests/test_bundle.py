"""Bundles: package -> inspect -> verify -> load -> predict, and every way a bundle can be bad."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import digits_input

from edgefleet.agent import BundleError, Pipeline, load_model
from edgefleet.agent.selftest import verify_bundle
from edgefleet.bundle import BundleReader, parse_manifest, read_manifest, unpack_bundle
from edgefleet.bundle.manifest import PipelineSpec
from edgefleet.converters.package import package_model

WHEN = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
PIPE = PipelineSpec.model_validate(
    {
        "preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nhwc"}],
        "postprocess": [{"op": "softmax"}, {"op": "topk", "k": 3}],
    }
)


@pytest.fixture
def bundle(tmp_path: Path, models_dir: Path, holdout: Any) -> Path:
    x, _ = holdout
    xs = digits_input(x, "nhwc")
    path, _ = package_model(
        models_dir / "digits_cnn_int8.tflite",
        "digits",
        "1.2.0",
        out=tmp_path / "out",
        labels=models_dir / "digits_labels.txt",
        golden={"image": xs[:8]},
        baseline={"image": xs},
        pipeline=PIPE,
        created_at=WHEN,
    )
    return path


def test_round_trip_package_inspect_verify_load_predict(bundle: Path, holdout: Any) -> None:
    x, y = holdout
    assert bundle.name == "digits-1.2.0.efb"
    m = read_manifest(bundle)
    assert (m.name, m.version, m.runtime) == ("digits", "1.2.0", "tflite")
    assert m.inputs[0].quantization is not None and m.golden is not None and m.golden.count == 8
    report = verify_bundle(str(bundle))
    assert report["ok"] and report["golden"]["passed"], report
    assert report["pipeline"] == {"checked": "8x8 image, 1 channel(s), uint8"}  # run on a synthetic input
    model = load_model(bundle)
    assert model.name == "digits" and model.labels is not None and model.labels[3] == "three"
    pipe = Pipeline(model)
    results = [pipe.run(img) for img in x[:50]]
    assert np.mean([r["top_k"][0]["index"] == t for r, t in zip(results, y, strict=False)]) > 0.9
    assert results[1]["top_k"][0]["label"] == model.labels[y[1]]
    json.dumps(results[0])  # JSON-ready


def test_bundle_members_are_sorted_with_fixed_owner_and_mtime(bundle: Path) -> None:
    with tarfile.open(bundle) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names[0] == "manifest.json"
    assert names[1:] == sorted(names[1:]) == ["baseline.json", "golden.npz", "labels.txt", "model.tflite"]
    assert {(i.uid, i.gid, i.uname, i.gname, i.mtime) for i in infos} == {(0, 0, "", "", int(WHEN.timestamp()))}


def test_same_inputs_give_the_same_bytes(tmp_path: Path, models_dir: Path, holdout: Any) -> None:
    x, _ = holdout
    xs = digits_input(x[:4], "nchw")
    outs = []
    for d in ("a", "b"):
        p, _ = package_model(
            models_dir / "digits_cnn_float.onnx",
            "digits",
            "1.0.0",
            out=tmp_path / d,
            labels=models_dir / "digits_labels.txt",
            golden={"input": xs},
            baseline={"input": xs},
            created_at=WHEN,
        )
        outs.append(p.read_bytes())
    assert outs[0] == outs[1]


def test_created_at_defaults_to_source_date_epoch(tmp_path: Path, models_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    _, m = package_model(models_dir / "multi_io.onnx", "multi", "0.1.0", out=tmp_path)
    assert m.created_at == datetime.fromtimestamp(1700000000, tz=UTC)


def test_multi_input_bundle_with_scalar_golden(tmp_path: Path, models_dir: Path) -> None:
    feats = np.arange(12, dtype=np.float32).reshape(4, 1, 3)  # 4 samples of [1, 3]
    scale = np.array([1, 2, 3, 4], dtype=np.int64)  # 4 scalar samples
    for fname in ("multi_io.onnx", "multi_io.tflite"):
        path, m = package_model(
            models_dir / fname, "multi", "2.0.0-rc.1", out=tmp_path / fname, golden={"features": feats, "scale": scale}
        )
        assert m.golden is not None and m.golden.count == 4
        assert verify_bundle(str(path))["ok"]


def test_unpack_writes_every_member_and_the_manifest(bundle: Path, tmp_path: Path) -> None:
    dest = tmp_path / "unpacked"
    m = unpack_bundle(bundle, dest)
    assert sorted(p.name for p in dest.iterdir()) == sorted(["manifest.json", *(r.path for r in m.members())])
    assert hashlib.sha256((dest / "model.tflite").read_bytes()).hexdigest() == m.model.sha256
    assert load_model(dest / "model.tflite").inputs[0].dtype == np.int8


# --- bad bundles are refused with a clear error and leave nothing behind ---------------------------


def _rewrite(src: Path, dst: Path, edit: Any) -> Path:
    """Copy a bundle member by member, letting ``edit(name, data)`` return new (name, data) or None."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for info in tin.getmembers():
            f = tin.extractfile(info)
            assert f is not None
            res = edit(info.name, f.read())
            if res is None:
                continue
            name, data = res
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tout.addfile(ti, io.BytesIO(data))
    return dst


def _assert_nothing_left(bundle: Path, tmp_path: Path, match: str) -> None:
    before = set(tmp_path.rglob("*"))
    dest = tmp_path / "dest"
    with pytest.raises(BundleError, match=match):
        unpack_bundle(bundle, dest)
    assert not dest.exists()
    assert set(tmp_path.rglob("*")) == before, "unpack left files behind"


def test_tampered_model_is_refused(bundle: Path, tmp_path: Path) -> None:
    def flip(name: str, data: bytes) -> tuple[str, bytes]:
        if name == "model.tflite":
            data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
        return name, data

    bad = _rewrite(bundle, tmp_path / "tampered.efb", flip)
    _assert_nothing_left(bad, tmp_path, r"member 'model.tflite': sha256 does not match")
    with pytest.raises(BundleError, match="sha256 does not match"):
        load_model(bad)
    with pytest.raises(BundleError, match="sha256 does not match"):
        verify_bundle(str(bad))


def test_tampered_manifest_field_is_named(bundle: Path, tmp_path: Path) -> None:
    def edit(name: str, data: bytes) -> tuple[str, bytes]:
        if name == "manifest.json":
            obj = json.loads(data)
            obj["version"] = "one"
            data = json.dumps(obj).encode()
        return name, data

    bad = _rewrite(bundle, tmp_path / "bad-manifest.efb", edit)
    _assert_nothing_left(bad, tmp_path, r"manifest.json: version: .*semantic version")


@pytest.mark.parametrize("where", ["manifest header", "manifest data", "model data", "model last byte"])
def test_truncated_bundle_is_refused(bundle: Path, tmp_path: Path, where: str) -> None:
    data = bundle.read_bytes()
    with tarfile.open(bundle) as tar:
        man, model = tar.getmember("manifest.json"), tar.getmember("model.tflite")
    cut = {
        "manifest header": 100,
        "manifest data": man.offset_data + man.size // 2,
        "model data": model.offset_data + model.size // 2,
        "model last byte": model.offset_data + model.size - 1,
    }[where]
    bad = tmp_path / "truncated.efb"
    bad.write_bytes(data[:cut])
    _assert_nothing_left(bad, tmp_path, r"truncated|not a valid bundle|missing")
    with pytest.raises(BundleError):
        load_model(bad)


def test_not_a_bundle_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "junk.efb"
    bad.write_bytes(b"this is not a tar archive" * 40)
    _assert_nothing_left(bad, tmp_path, r"not a valid bundle")


def _add_member(bundle: Path, dst: Path, info: tarfile.TarInfo, data: bytes = b"") -> Path:
    _rewrite(bundle, dst, lambda n, d: (n, d))
    with tarfile.open(dst, "a", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data) if data else None)
    return dst


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("../evil.txt", tarfile.REGTYPE),
        ("/etc/evil.txt", tarfile.REGTYPE),
        ("sub/../../evil.txt", tarfile.REGTYPE),
        ("link", tarfile.SYMTYPE),
        ("hard", tarfile.LNKTYPE),
        ("folder", tarfile.DIRTYPE),
        ("fifo", tarfile.FIFOTYPE),
    ],
)
def test_path_traversal_links_and_special_members_are_refused(
    bundle: Path, tmp_path: Path, name: str, kind: bytes
) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    data = b"pwned" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = "/etc/passwd"
    bad = _add_member(bundle, tmp_path / "evil.efb", info, data)
    _assert_nothing_left(bad, tmp_path, r"escapes the bundle folder|only regular files")
    assert not (tmp_path.parent / "evil.txt").exists()


def test_unlisted_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    info = tarfile.TarInfo("extra.bin")
    info.size = 3
    bad = _add_member(bundle, tmp_path / "extra.efb", info, b"abc")
    _assert_nothing_left(bad, tmp_path, r"member 'extra.bin': not listed in the manifest")


def test_member_larger_than_the_manifest_says_is_refused(bundle: Path, tmp_path: Path) -> None:
    bad = _rewrite(bundle, tmp_path / "big.efb", lambda n, d: (n, d + b"\0" * 4096 if n == "labels.txt" else d))
    _assert_nothing_left(bad, tmp_path, r"member 'labels.txt': \d+ bytes, the manifest says \d+")


def test_missing_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    bad = _rewrite(bundle, tmp_path / "missing.efb", lambda n, d: None if n == "golden.npz" else (n, d))
    _assert_nothing_left(bad, tmp_path, r"\['golden.npz'\]: listed in the manifest but missing")


def test_duplicate_member_is_refused(bundle: Path, tmp_path: Path) -> None:
    info = tarfile.TarInfo("labels.txt")
    info.size = 3
    bad = _add_member(bundle, tmp_path / "dup.efb", info, b"abc")
    _assert_nothing_left(bad, tmp_path, r"member 'labels.txt': appears twice")


def test_unpack_refuses_an_existing_target(bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "exists").mkdir()
    with pytest.raises(BundleError, match="already exists"):
        unpack_bundle(bundle, tmp_path / "exists")


def test_wrong_golden_outputs_fail_verification(bundle: Path, tmp_path: Path) -> None:
    """A bundle whose golden outputs do not match the model fails verify (re-signed hashes)."""
    with BundleReader(bundle) as b:
        manifest = b.manifest
        members = {r.path: b.read(r.path) for r in manifest.members()}
    with np.load(io.BytesIO(members["golden.npz"])) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output.output_0"] = arrays["output.output_0"] + 5.0
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    members["golden.npz"] = buf.getvalue()
    from edgefleet.bundle import file_ref, write_bundle

    ref = file_ref("golden.npz", members["golden.npz"])
    assert manifest.golden is not None
    golden = manifest.golden.model_copy(update={"sha256": ref.sha256, "size": ref.size})
    bad_manifest = manifest.model_copy(update={"golden": golden})
    bad = write_bundle(tmp_path / "wrong-golden.efb", bad_manifest, members)
    report = verify_bundle(str(bad))
    assert not report["ok"] and not report["golden"]["passed"]
    assert "output 'output_0' differs" in report["golden"]["failures"][0]


# --- manifest validation names the field ----------------------------------------------------------


def _manifest(bundle: Path) -> dict[str, Any]:
    return read_manifest(bundle).model_dump(mode="json")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(name="Bad Name"), r"name: String should match pattern"),
        (lambda m: m.update(version="1.2"), r"version: version must be a semantic version"),
        (lambda m: m.update(runtime="tensorrt"), r"runtime: Input should be 'onnx' or 'tflite'"),
        (lambda m: m["model"].update(sha256="xyz"), r"model.sha256: String should match pattern"),
        (lambda m: m["model"].update(path="../model.tflite"), r"model.path: String should match pattern"),
        (lambda m: m["inputs"][0].update(dtype="float128"), r"inputs.0.dtype: Input should be"),
        (lambda m: m.update(created_at="2026-11-01T12:00:00"), r"created_at: created_at must carry a time zone"),
        (lambda m: m.update(surprise=1), r"surprise: Extra inputs are not permitted"),
        (lambda m: m["pipeline"]["preprocess"].append({"op": "rotate"}), r"pipeline.preprocess.2: Input tag 'rotate'"),
        (lambda m: m.update(schema_version=2), r"schema_version: this agent reads schema version 1, got 2"),
        (lambda m: m["pipeline"].update(input="nope"), r"pipeline.input: 'nope' is not one of the inputs"),
    ],
)
def test_manifest_errors_name_the_field(bundle: Path, edit: Any, match: str) -> None:
    m = _manifest(bundle)
    edit(m)
    with pytest.raises(BundleError, match=match):
        parse_manifest(json.dumps(m))


def test_manifest_that_is_not_json_or_an_object_is_refused() -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_manifest(b"{nope")
    with pytest.raises(BundleError, match="must be a JSON object"):
        parse_manifest(b"[1, 2]")


def test_package_runs_the_pipeline_on_a_synthetic_input_and_refuses_a_misfit(tmp_path: Path, models_dir: Path) -> None:
    """NCHW steps for the NHWC TFLite model: refused before anything is written, naming both shapes."""
    nchw = PipelineSpec.model_validate(
        {"preprocess": [{"op": "scale", "factor": 1 / 16}, {"op": "layout", "target": "nchw"}]}
    )
    with pytest.raises(BundleError, match=r"expected shape \[\?, 8, 8, 1\], got \[1, 1, 8, 8\].*target 'nhwc'"):
        package_model(models_dir / "digits_cnn_int8.tflite", "digits", "1.0.0", out=tmp_path, pipeline=nchw)
    assert not list(tmp_path.iterdir())


def test_a_bundle_without_pipeline_steps_is_not_run_on_a_synthetic_input(tmp_path: Path, models_dir: Path) -> None:
    path, _ = package_model(models_dir / "multi_io.onnx", "multi", "1.0.0", out=tmp_path)
    report = verify_bundle(str(path))
    assert report["ok"] and report["pipeline"] == {"checked": None}
