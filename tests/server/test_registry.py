"""Registry: upload, list, show, delete, download with Range/ETag; every refusal a JSON 4xx naming a field."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from _fleet import make_bundle


def test_upload_list_show_download_round_trip(fleet, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, "digits", "1.0.0", size=5000)
    data = bundle.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    r = fleet.client.post("/api/v1/models", content=data, headers={**fleet.admin_h, "X-Content-SHA256": sha})
    assert r.status_code == 201, r.text
    assert r.json()["sha256"] == sha and r.json()["size"] == len(data)
    assert (fleet.settings.data_dir / "blobs" / "sha256" / sha[:2] / sha).read_bytes() == data
    assert list((fleet.settings.data_dir / "tmp").iterdir()) == []

    listed = fleet.client.get("/api/v1/models", headers=fleet.admin_h).json()
    assert [(v["name"], v["version"]) for v in listed] == [("digits", "1.0.0")]
    shown = fleet.client.get("/api/v1/models/digits/1.0.0", headers=fleet.admin_h).json()
    assert shown["manifest"]["model"]["path"] == "model.onnx"

    full = fleet.client.get(f"/api/v1/blobs/{sha}", headers=fleet.admin_h)
    assert full.status_code == 200 and full.content == data
    assert full.headers["etag"] == f'"{sha}"'
    assert "immutable" in full.headers["cache-control"]
    part = fleet.client.get("/api/v1/models/digits/1.0.0/bundle", headers={**fleet.admin_h, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    beyond = fleet.client.get(f"/api/v1/blobs/{sha}", headers={**fleet.admin_h, "Range": f"bytes={len(data) + 10}-"})
    assert beyond.status_code == 416
    same = fleet.client.get(f"/api/v1/blobs/{sha}", headers={**fleet.admin_h, "If-None-Match": f'"{sha}"'})
    assert same.status_code == 304


def test_duplicate_version_is_a_409_and_keeps_the_first(fleet, tmp_path: Path) -> None:
    assert fleet.upload(make_bundle(tmp_path / "a", "m", "1.0.0", 100)).status_code == 201
    r = fleet.upload(make_bundle(tmp_path / "b", "m", "1.0.0", 200))
    assert r.status_code == 409 and r.json()["field"] == "version"


def test_invalid_bundle_is_refused_with_the_field_and_leaves_nothing(fleet) -> None:
    r = fleet.client.post("/api/v1/models", content=b"not a tar" * 100, headers=fleet.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "body"
    assert "bundle" in r.json()["error"]
    assert list((fleet.settings.data_dir / "tmp").iterdir()) == []
    assert list((fleet.settings.data_dir / "blobs" / "sha256").iterdir()) == []


def test_wrong_declared_sha256_is_refused(fleet, tmp_path: Path) -> None:
    data = make_bundle(tmp_path).read_bytes()
    r = fleet.client.post("/api/v1/models", content=data, headers={**fleet.admin_h, "X-Content-SHA256": "0" * 64})
    assert r.status_code == 400 and r.json()["field"] == "x-content-sha256"


def test_upload_over_the_size_limit_is_a_413(fleet, tmp_path: Path) -> None:
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from edgefleet.server.app import create_app

    small = fleet.settings.model_copy(update={"max_upload_bytes": 1024})
    with TestClient(create_app(small, replace(fleet.state, settings=small))) as c:
        data = make_bundle(tmp_path, size=4096).read_bytes()
        r = c.post("/api/v1/models", content=data, headers=fleet.admin_h)
        assert r.status_code == 413, r.text
        chunks = c.post("/api/v1/models", content=iter([data[:2000], data[2000:]]), headers=fleet.admin_h)
        assert chunks.status_code == 413 and chunks.json()["field"] == "body"
    assert list((fleet.settings.data_dir / "tmp").iterdir()) == []


def test_delete_is_refused_while_a_device_is_assigned_the_version(fleet, tmp_path: Path) -> None:
    sha = fleet.upload(make_bundle(tmp_path)).json()["sha256"]
    d = fleet.device()
    assert (
        fleet.client.put(
            f"/api/v1/devices/{d.id}/models/digits", json={"version": "1.0.0"}, headers=fleet.admin_h
        ).status_code
        == 200
    )
    r = fleet.client.delete("/api/v1/models/digits/1.0.0", headers=fleet.admin_h)
    assert r.status_code == 409 and "in use" in r.json()["error"]
    assert fleet.client.delete(f"/api/v1/devices/{d.id}/models/digits", headers=fleet.admin_h).status_code == 204
    assert fleet.client.delete("/api/v1/models/digits/1.0.0", headers=fleet.admin_h).status_code == 204
    assert fleet.client.get(f"/api/v1/blobs/{sha}", headers=fleet.admin_h).status_code == 404
    actions = [e["action"] for e in fleet.client.get("/api/v1/audit", headers=fleet.admin_h).json()]
    assert actions[:4] == ["model.delete", "device.unassign", "device.assign", "device.enroll"]
    delete = fleet.client.get("/api/v1/audit", headers=fleet.admin_h).json()[0]
    assert delete["before"]["sha256"] == sha and delete["after"] is None and "admin" in delete["actor"]


def test_devices_download_only_the_bundles_assigned_to_them(fleet, tmp_path: Path) -> None:
    """Confidentiality: one extracted device key must not leak other models' bytes, whatever route."""
    sha = fleet.upload(make_bundle(tmp_path)).json()["sha256"]
    d, other = fleet.device(), fleet.device()
    put = fleet.client.put(f"/api/v1/devices/{d.id}/models/digits", json={"version": "1.0.0"}, headers=fleet.admin_h)
    assert put.status_code == 200
    r = fleet.client.get(f"/api/v1/blobs/{sha}", headers={**d.headers, "Range": "bytes=0-9"})
    assert r.status_code == 206 and len(r.content) == 10
    assert fleet.client.get("/api/v1/models/digits/1.0.0/bundle", headers=d.headers).status_code == 200
    for url in (f"/api/v1/blobs/{sha}", "/api/v1/models/digits/1.0.0/bundle"):
        refused = fleet.client.get(url, headers=other.headers)
        assert refused.status_code == 403 and refused.json()["field"] == "sha256", refused.text
    assert fleet.client.get(f"/api/v1/blobs/{sha}").status_code == 401


def test_the_longest_version_a_bundle_may_carry_is_addressable(fleet, tmp_path: Path) -> None:
    from edgefleet.bundle.manifest import MAX_VERSION_LENGTH

    version = "1.0.0-" + "a" * (MAX_VERSION_LENGTH - 6)
    assert fleet.upload(make_bundle(tmp_path, "long", version)).status_code == 201
    assert fleet.client.get(f"/api/v1/models/long/{version}", headers=fleet.admin_h).status_code == 200
    assert fleet.client.get(f"/api/v1/models/long/{version}/bundle", headers=fleet.admin_h).status_code == 200
    assert fleet.client.delete(f"/api/v1/models/long/{version}", headers=fleet.admin_h).status_code == 204


def _hand_made(folder: Path, manifest: dict, members: dict[str, bytes], extra: bytes = b"") -> bytes:
    import io
    import json
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in {"manifest.json": json.dumps(manifest).encode(), **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue() + extra


def test_a_version_longer_than_the_paths_accept_is_refused_at_upload(fleet, tmp_path: Path) -> None:
    from edgefleet.bundle import BundleReader

    with BundleReader(make_bundle(tmp_path)) as b:
        manifest, model = b.manifest.model_dump(mode="json"), b.read_model()
    body = _hand_made(tmp_path, {**manifest, "version": "1.0.0-" + "a" * 200}, {"model.onnx": model})
    r = fleet.client.post("/api/v1/models", content=body, headers=fleet.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "body", r.text
    assert "version: String should have at most 128 characters" in r.json()["error"]


def test_junk_after_the_tar_and_hostile_member_names_are_refused_with_bounded_errors(fleet, tmp_path: Path) -> None:
    data = make_bundle(tmp_path).read_bytes()
    r = fleet.client.post("/api/v1/models", content=data + b"JUNK", headers=fleet.admin_h)
    assert r.status_code == 422 and f"trailing data after the end of the archive at offset {len(data)}" in r.text
    from edgefleet.bundle import BundleReader

    with BundleReader(make_bundle(tmp_path)) as b:
        manifest, model = b.manifest.model_dump(mode="json"), b.read_model()
    body = _hand_made(tmp_path, manifest, {"model.onnx": model, "\x1b]0;pwned\x07" + "x" * 20_000: b""})
    r = fleet.client.post("/api/v1/models", content=body, headers=fleet.admin_h)
    assert r.status_code == 422 and "not listed in the manifest" in r.json()["error"]
    assert len(r.json()["error"]) < 200 and "\x1b" not in r.json()["error"], r.json()["error"]


def test_upload_whose_declared_name_and_version_differ_from_the_bundle_is_refused(fleet, tmp_path: Path) -> None:
    data = make_bundle(tmp_path, "real", "1.0.0").read_bytes()
    h = {**fleet.admin_h, "X-Model-Name": "real", "X-Model-Version": "9.9.9"}
    r = fleet.client.post("/api/v1/models", content=data, headers=h)
    assert r.status_code == 422 and r.json()["field"] == "x-model-version", r.text
    assert list((fleet.settings.data_dir / "tmp").iterdir()) == []
    assert fleet.client.get("/api/v1/models", headers=fleet.admin_h).json() == []
    h["X-Model-Version"] = "1.0.0"
    assert fleet.client.post("/api/v1/models", content=data, headers=h).status_code == 201
    again = fleet.client.post("/api/v1/models", content=data, headers={**h, "X-Content-SHA256": hashlib.sha256(
        data).hexdigest()})
    assert again.status_code == 200 and again.json()["version"] == "1.0.0"


def test_malformed_and_unsatisfiable_ranges_are_json_416(fleet, tmp_path: Path) -> None:
    data = make_bundle(tmp_path).read_bytes()
    sha = fleet.upload(make_bundle(tmp_path)).json()["sha256"]
    for rng in ("bytes=abc", "bytes=5-1", f"bytes={len(data)}-", "pages=1-2"):
        r = fleet.client.get(f"/api/v1/blobs/{sha}", headers={**fleet.admin_h, "Range": rng})
        assert r.status_code == 416, (rng, r.text)
        assert r.json()["field"] == "range" and r.headers["content-range"] == f"bytes */{len(data)}"
    stale = fleet.client.get(f"/api/v1/blobs/{sha}", headers={**fleet.admin_h, "Range": "bytes=abc", "If-Range": '"x"'})
    assert stale.status_code == 200 and stale.content == data  # If-Range not matching: the whole file


def test_a_dry_run_checks_token_role_and_version_without_a_body(fleet, tmp_path: Path) -> None:
    data = make_bundle(tmp_path, "dry", "1.0.0").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    h = {"X-Model-Name": "dry", "X-Model-Version": "1.0.0", "X-Content-SHA256": sha}

    def dry(headers: dict[str, str]) -> Any:
        return fleet.client.post("/api/v1/models", params={"dry_run": "true"}, headers=headers)

    assert dry({**fleet.admin_h}).json()["field"] == "x-model-name"
    assert dry(h).status_code == 401
    assert dry({**h, **fleet.auth(fleet.api_token("viewer"))}).status_code == 403
    assert dry({**h, **fleet.admin_h}).status_code == 204
    assert fleet.client.get("/api/v1/models", headers=fleet.admin_h).json() == []  # nothing stored
    assert fleet.upload(make_bundle(tmp_path, "dry", "1.0.0")).status_code == 201
    assert dry({**h, **fleet.admin_h}).status_code == 200
    other = dry({**h, **fleet.admin_h, "X-Content-SHA256": "0" * 64})
    assert other.status_code == 409 and "already exists with different content" in other.json()["error"]


def test_a_delete_cut_off_before_its_commit_finds_its_blob_again_at_start(tmp_path: Path) -> None:
    """A crash between taking the blob out (trash) and the commit leaves the row: the start-up sweep
    puts the blob back; partial uploads go."""
    from edgefleet.server.blobs import BlobStore

    store = BlobStore(tmp_path)
    data = make_bundle(tmp_path / "b").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    store.path(sha).parent.mkdir(parents=True, exist_ok=True)
    store.path(sha).write_bytes(data)
    trashed = store.trash(sha)
    assert trashed is not None and not store.exists(sha)
    (store.tmp / "upload-partial.efb").write_bytes(b"half")
    assert BlobStore(tmp_path).sweep() == 2
    assert store.path(sha).read_bytes() == data and list(store.tmp.iterdir()) == []
    assert store.stored() == {sha}


def test_blobs_a_crash_left_without_a_row_are_collected_and_referenced_ones_kept(fleet, tmp_path: Path) -> None:
    from edgefleet.server.api.registry import collect_orphans

    kept = fleet.upload(make_bundle(tmp_path / "a", "kept", "1.0.0")).json()["sha256"]
    orphan = make_bundle(tmp_path / "b", "orphan", "1.0.0").read_bytes()  # placed, then the process died
    sha = hashlib.sha256(orphan).hexdigest()
    fleet.state.blobs.path(sha).parent.mkdir(exist_ok=True)
    fleet.state.blobs.path(sha).write_bytes(orphan)
    assert collect_orphans(fleet.state) == 1
    assert fleet.state.blobs.stored() == {kept}
    assert collect_orphans(fleet.state) == 0
