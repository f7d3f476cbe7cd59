"""The check-in ETag is the device's director timestamp version (SQLite and PostgreSQL): an assignment
change signs the director metadata in its own transaction and the device's next check-in is a 200 whose
ETag ``"ts-N"`` names exactly the timestamp stock ngclient then trusts; nothing else (re-reads, tags, the
same version again) moves it, and the 304 path is unchanged. The director's re-signing past half a
lifetime moves it too. Without a director root, or without online keys, the ETag is the desired state's
hash as before TUF, until the first director read signs. Against a real server process: concurrent
assignments and director reads on one device end with the ETag naming the newest timestamp, no errors."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from _fleet import CLI, Server, enroll, make_bundle, publish_roots
from sqlalchemy import delete
from test_tuf_image import BearerFetcher
from tuf.api.metadata import Metadata, Timestamp
from tuf.ngclient import Updater

from edgefleet.server.db import make_engine
from edgefleet.server.models import TufMetadata
from edgefleet.server.tuf import load_online_keys
from edgefleet.server.tuf.director import DirectorRepository
from edgefleet.server.tuf.routes import DIRECTOR_KEY, REPO_KEY
from edgefleet.tufmeta import canonical_bytes
from edgefleet.tufmeta.keyring import Keyring


def _roots(fleet: Any) -> Keyring:
    """The operator's keyring, with the image and director roots published (what `edgefleet keys init
    --server` does; the fleet's own keyring, which its first enrollment token would publish anyway)."""
    fleet.keyring = publish_roots(fleet.client, fleet.admin_h, fleet.settings.data_dir.parent / "fleet-keyring")
    ring: Keyring = fleet.keyring
    return ring


def _push(fleet: Any, tmp: Path, *versions: str) -> None:
    for v in versions:
        r = fleet.upload(make_bundle(tmp / "b", "digits", v))
        assert r.status_code == 201, r.text


def _assign(fleet: Any, device_id: str, version: str) -> None:
    r = fleet.client.put(f"/api/v1/devices/{device_id}/models/digits", json={"version": version},
                         headers=fleet.admin_h)
    assert r.status_code == 200, r.text


def _check_in(fleet: Any, device: Any, etag: str | None = None) -> httpx.Response:
    headers = {**device.headers, **({"If-None-Match": etag} if etag else {})}
    r: httpx.Response = fleet.client.get(f"/api/v1/devices/{device.id}/desired", headers=headers)
    assert r.status_code in (200, 304), r.text
    return r


def _director(fleet: Any, device: Any, ring: Keyring, tmp: Path) -> Updater:
    """Stock ngclient over the device's director repository, as the device (its token), keeping its
    trusted metadata in ``tmp`` between instances as a device keeps it between runs."""
    meta = tmp / "director"
    meta.mkdir(parents=True, exist_ok=True)
    root = ring.latest_director_root()
    assert root is not None
    return Updater(str(meta), f"http://testserver/tuf/director/{device.id}/", str(tmp / "targets"),
                   "http://testserver/tuf/image/targets/", BearerFetcher(fleet.client, device.headers),
                   bootstrap=canonical_bytes(root))


def _trusted_timestamp(tmp: Path) -> int:
    return int(Metadata.from_file(str(tmp / "director" / "timestamp.json")).signed.version)


def test_the_etag_changes_exactly_when_an_assignment_changes_and_names_the_timestamp_the_device_fetches(
    fleet: Any, tmp_path: Path
) -> None:
    ring = _roots(fleet)
    _push(fleet, tmp_path, "1.0.0", "1.1.0")
    device = fleet.device()
    _assign(fleet, device.id, "1.0.0")

    first = _check_in(fleet, device)
    assert first.status_code == 200
    version = first.json()["director_timestamp_version"]
    assert isinstance(version, int) and first.headers["etag"] == f'"ts-{version}"'
    assert [m["version"] for m in first.json()["models"]] == ["1.0.0"]
    updater = _director(fleet, device, ring, tmp_path)
    updater.refresh()
    assert _trusted_timestamp(tmp_path) == version  # the ETag names exactly what the device then trusts
    info = updater.get_targetinfo("digits-1.0.0.efb")
    assert info is not None and info.custom == {"model": "digits", "role": "serve", "device": device.id}

    # nothing that is not an assignment change moves it: 304, the ETag sent back unchanged
    etag = first.headers["etag"]
    fleet.client.get(f"/tuf/director/{device.id}/timestamp.json", headers=device.headers)
    assert fleet.client.put(f"/api/v1/devices/{device.id}/tags", json={"tags": ["lab"]},
                            headers=fleet.admin_h).status_code == 200
    _assign(fleet, device.id, "1.0.0")  # the same version again: the same targets, nothing signed
    again = _check_in(fleet, device, etag)
    assert again.status_code == 304 and again.headers["etag"] == etag and again.content == b""

    _assign(fleet, device.id, "1.1.0")
    changed = _check_in(fleet, device, etag)
    assert changed.status_code == 200 and changed.headers["etag"] == f'"ts-{version + 1}"'
    assert changed.json()["director_timestamp_version"] == version + 1
    assert [m["version"] for m in changed.json()["models"]] == ["1.1.0"]
    updater = _director(fleet, device, ring, tmp_path)
    updater.refresh()
    assert _trusted_timestamp(tmp_path) == version + 1
    assert updater.get_targetinfo("digits-1.0.0.efb") is None and updater.get_targetinfo("digits-1.1.0.efb")
    assert _check_in(fleet, device, changed.headers["etag"]).status_code == 304

    assert fleet.client.delete(f"/api/v1/devices/{device.id}/models/digits", headers=fleet.admin_h).status_code == 204
    gone = _check_in(fleet, device, changed.headers["etag"])
    assert gone.status_code == 200 and gone.headers["etag"] == f'"ts-{version + 2}"' and gone.json()["models"] == []
    updater = _director(fleet, device, ring, tmp_path)
    updater.refresh()
    assert _trusted_timestamp(tmp_path) == version + 2
    assert Metadata.from_file(str(tmp_path / "director" / "targets.json")).signed.targets == {}
    shown = fleet.client.get(f"/api/v1/devices/{device.id}", headers=fleet.admin_h).json()
    assert shown["desired"]["director_timestamp_version"] == version + 2


def test_re_signing_past_half_the_timestamps_lifetime_moves_the_etag_to_the_new_version(
    fleet: Any, tmp_path: Path
) -> None:
    _roots(fleet)
    now = [datetime.now(UTC)]
    setattr(fleet.client.app.state, DIRECTOR_KEY, DirectorRepository(
        fleet.state.sessions, load_online_keys(fleet.settings.data_dir), clock=lambda: now[0]))
    _push(fleet, tmp_path, "1.0.0")
    device = fleet.device()
    _assign(fleet, device.id, "1.0.0")
    before = _check_in(fleet, device)
    version = before.json()["director_timestamp_version"]

    now[0] += timedelta(hours=13)  # past half the director timestamp's day
    r = fleet.client.get(f"/tuf/director/{device.id}/timestamp.json", headers=device.headers)
    assert Metadata[Timestamp].from_bytes(r.content).signed.version == version + 1
    after = _check_in(fleet, device, before.headers["etag"])
    assert after.status_code == 200 and after.headers["etag"] == f'"ts-{version + 1}"'
    assert after.json()["models"] == before.json()["models"]


def test_without_a_director_root_the_etag_is_the_hash_until_the_first_director_read_signs(
    fleet: Any, tmp_path: Path
) -> None:
    ring = _roots(fleet)
    _push(fleet, tmp_path, "1.0.0", "1.1.0")
    device = fleet.device()
    engine = make_engine(fleet.settings.database_url())
    with engine.begin() as c:  # a server from before the director: no director root, nothing signed
        c.execute(delete(TufMetadata).where(TufMetadata.repo.like("director%")))
    engine.dispose()

    _assign(fleet, device.id, "1.0.0")
    hashed = _check_in(fleet, device)
    etag = hashed.headers["etag"].strip('"')
    assert len(etag) == 32 and not etag.startswith("ts-") and hashed.json()["director_timestamp_version"] is None
    assert _check_in(fleet, device, hashed.headers["etag"]).status_code == 304
    _assign(fleet, device.id, "1.1.0")
    moved = _check_in(fleet, device, hashed.headers["etag"])
    assert moved.status_code == 200 and moved.headers["etag"] != hashed.headers["etag"]
    assert moved.json()["director_timestamp_version"] is None

    # the operator publishes the director root: the device's first director read signs, and moves the ETag
    root = ring.latest_director_root()
    assert root is not None
    r = fleet.client.put("/tuf/director/root", content=canonical_bytes(root), headers=fleet.admin_h)
    assert r.status_code == 200, r.text
    r = fleet.client.get(f"/tuf/director/{device.id}/timestamp.json", headers=device.headers)
    assert r.status_code == 200, r.text
    signed = Metadata[Timestamp].from_bytes(r.content).signed.version
    now = _check_in(fleet, device, moved.headers["etag"])
    assert now.status_code == 200 and now.headers["etag"] == f'"ts-{signed}"'
    assert now.json()["director_timestamp_version"] == signed


def test_a_server_without_online_keys_assigns_with_the_hash_etag(fleet: Any, tmp_path: Path) -> None:
    _push(fleet, tmp_path, "1.0.0")
    device = fleet.device()
    first = _check_in(fleet, device)
    for name in ("snapshot", "timestamp", "director-targets"):  # initialised before TUF
        (fleet.settings.data_dir / "tuf" / f"{name}.key").unlink()
    for key in (REPO_KEY, DIRECTOR_KEY):
        setattr(fleet.client.app.state, key, None)
    _assign(fleet, device.id, "1.0.0")
    r = _check_in(fleet, device, first.headers["etag"])
    assert r.status_code == 200 and not r.headers["etag"].startswith('"ts-')
    assert r.json()["director_timestamp_version"] is None and [m["version"] for m in r.json()["models"]] == ["1.0.0"]
    assert _check_in(fleet, device, r.headers["etag"]).status_code == 304


def test_concurrent_assignments_and_director_reads_end_with_the_etag_naming_the_newest_timestamp(
    clean_db: str, tmp_path: Path
) -> None:
    srv = Server(tmp_path / "data", clean_db)
    init = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--db", clean_db, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["admin_token"]
    srv.start()
    admin = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    try:
        r = subprocess.run([*CLI, "keys", "init", "--keys", str(tmp_path / "keys"), "--server", srv.url],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "EDGEFLEET_TOKEN": token})
        assert r.returncode == 0, r.stderr
        for v in ("1.0.0", "1.1.0"):
            assert admin.post("/api/v1/models", content=make_bundle(tmp_path / "b", "digits", v).read_bytes()
                              ).status_code == 201
        r = admin.post("/api/v1/enrollment-tokens", json={})
        device = enroll(httpx.Client(base_url=srv.url, timeout=60), r.json()["token"])
        device.authenticate()
        go = threading.Barrier(4)
        statuses: list[int] = []

        def assigning(versions: list[str]) -> None:
            with httpx.Client(base_url=srv.url, headers=admin.headers, timeout=60) as c:
                go.wait()
                for v in versions:
                    statuses.append(c.put(f"/api/v1/devices/{device.id}/models/digits", json={"version": v}).status_code)

        def reading() -> None:
            with httpx.Client(base_url=srv.url, headers=device.headers, timeout=60) as c:
                go.wait()
                for _ in range(6):
                    statuses.append(c.get(f"/tuf/director/{device.id}/timestamp.json").status_code)
                    statuses.append(c.get(f"/api/v1/devices/{device.id}/desired").status_code)

        workers = [threading.Thread(target=assigning, args=(["1.0.0", "1.1.0"] * 3,)),
                   threading.Thread(target=assigning, args=(["1.1.0", "1.0.0"] * 3,)),
                   threading.Thread(target=reading), threading.Thread(target=reading)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        assert len(statuses) == 36 and set(statuses) == {200}, statuses

        final = admin.get(f"/api/v1/devices/{device.id}").json()["desired"]["models"][0]["version"]
        ts = Metadata[Timestamp].from_bytes(admin.get(f"/tuf/director/{device.id}/timestamp.json").content).signed
        desired = device.client.get(f"/api/v1/devices/{device.id}/desired", headers=device.headers)
        assert desired.headers["etag"] == f'"ts-{ts.version}"'
        snapshot = Metadata.from_bytes(admin.get(f"/tuf/director/{device.id}/{ts.snapshot_meta.version}.snapshot.json"
                                                 ).content).signed
        targets = Metadata.from_bytes(admin.get(
            f"/tuf/director/{device.id}/{snapshot.meta['targets.json'].version}.targets.json").content).signed
        assert list(targets.targets) == [f"digits-{final}.efb"]
    finally:
        admin.close()
        logged = srv.stop()
    assert "Traceback" not in logged, logged[-3000:]
