"""The per-device director repository against a real server process (SQLite and PostgreSQL): the operator
publishes both roots with `edgefleet keys init --server`, pushes bundles and assigns one to a device;
python-tuf's stock ``ngclient.Updater``, acting as the device with its access token, refreshes its
director repository and finds the assigned target with its custom fields; a new assignment gives a higher
targets version naming the new version; a device gets 403 for another device's director metadata and
for an image target its director does not name; versions never go down across a server restart."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from _fleet import CLI, Server, SimDevice, enroll, make_bundle
from sqlalchemy import delete
from test_tuf_image import BearerFetcher
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater

from edgefleet.server.db import make_engine
from edgefleet.server.models import TufMetadata
from edgefleet.server.tuf import load_online_keys
from edgefleet.server.tuf.director import DirectorRepository
from edgefleet.server.tuf.routes import DIRECTOR_KEY
from edgefleet.tufmeta import canonical_bytes, expiry_from
from edgefleet.tufmeta.keyring import Keyring


@dataclass
class Fleet:
    srv: Server
    admin: httpx.Client  # the operator (admin token)
    keys: Path
    bundles: dict[str, Path]

    def device(self) -> SimDevice:
        r = self.admin.post("/api/v1/enrollment-tokens", json={"tags": []})
        assert r.status_code == 201, r.text
        d = enroll(httpx.Client(base_url=self.srv.url, timeout=30), r.json()["token"])
        d.authenticate()
        return d

    def assign(self, device: SimDevice, version: str) -> None:
        r = self.admin.put(f"/api/v1/devices/{device.id}/models/digits", json={"version": version})
        assert r.status_code == 200, r.text


@pytest.fixture
def live(clean_db: str, tmp_path: Path) -> Iterator[Fleet]:
    """A server process with both roots published by `edgefleet keys init --server` (a real CLI process),
    two bundles pushed and listed in image targets 2 (signed by the release key)."""
    srv = Server(tmp_path / "data", clean_db)
    init = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--db", clean_db, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    token = json.loads(init.stdout)["admin_token"]
    srv.start()
    admin = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    try:
        keys = tmp_path / "keys"
        r = subprocess.run([*CLI, "keys", "init", "--keys", str(keys), "--server", srv.url, "--json"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "EDGEFLEET_TOKEN": token})
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["director_root_file"] == str((keys / "director" / "1.root.json").resolve())
        bundles = {v: make_bundle(tmp_path / "b", "digits", v, 4096) for v in ("1.0.0", "1.1.0")}
        targets = Targets(version=2, expires=expiry_from(datetime.now(UTC), "targets"))
        for b in bundles.values():
            assert admin.post("/api/v1/models", content=b.read_bytes()).status_code == 201
            targets.targets[b.name] = TargetFile.from_data(b.name, b.read_bytes(), ["sha256"])
        r = admin.put("/tuf/image/targets", content=canonical_bytes(Keyring.load(keys).sign_targets(targets)))
        assert r.status_code == 200, r.text
        yield Fleet(srv, admin, keys, bundles)
    finally:
        admin.close()
        srv.stop()


def _director(live: Fleet, device: SimDevice, tmp: Path) -> Updater:
    """A fresh stock Updater over the device's director repository (its trusted metadata kept in ``tmp``
    between instances, as a device keeps it between runs)."""
    meta = tmp / "director" / device.id
    if not meta.exists():
        meta.mkdir(parents=True)
    fetcher = BearerFetcher(device.client, device.headers)
    return Updater(str(meta), f"{live.srv.url}/tuf/director/{device.id}/", str(tmp / "targets"),
                   f"{live.srv.url}/tuf/image/targets/", fetcher,
                   bootstrap=(live.keys / "director" / "1.root.json").read_bytes())


def _image(live: Fleet, device: SimDevice, tmp: Path) -> Updater:
    meta, targets = tmp / "image" / device.id, tmp / "targets" / device.id
    meta.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    return Updater(str(meta), f"{live.srv.url}/tuf/image/", str(targets), f"{live.srv.url}/tuf/image/targets/",
                   BearerFetcher(device.client, device.headers),
                   bootstrap=(live.keys / "image" / "1.root.json").read_bytes())


def _trusted(tmp: Path, device: SimDevice, role: str) -> int:
    """The version of ``role`` the device's updater trusts now (what ngclient persisted)."""
    return int(Metadata.from_file(str(tmp / "director" / device.id / f"{role}.json")).signed.version)


def test_a_device_finds_its_assignment_in_its_director_and_a_new_assignment_is_a_higher_targets_version(
    live: Fleet, tmp_path: Path
) -> None:
    device = live.device()
    live.assign(device, "1.0.0")
    director = _director(live, device, tmp_path)
    director.refresh()
    info = director.get_targetinfo("digits-1.0.0.efb")
    bundle = live.bundles["1.0.0"]
    assert info is not None
    assert info.length == bundle.stat().st_size
    assert info.hashes["sha256"] == TargetFile.from_file(bundle.name, str(bundle), ["sha256"]).hashes["sha256"]
    assert info.custom == {"model": "digits", "role": "serve", "device": device.id}
    first = _trusted(tmp_path, device, Targets.type)

    live.assign(device, "1.1.0")
    director = _director(live, device, tmp_path)
    director.refresh()
    assert _trusted(tmp_path, device, Targets.type) > first
    assert director.get_targetinfo("digits-1.0.0.efb") is None
    new = director.get_targetinfo("digits-1.1.0.efb")
    assert new is not None and new.custom == {"model": "digits", "role": "serve", "device": device.id}

    # the image repository agrees, and the device may download what its director names
    image = _image(live, device, tmp_path)
    image.refresh()
    image_info = image.get_targetinfo("digits-1.1.0.efb")
    assert image_info is not None and image_info.hashes == new.hashes and image_info.length == new.length
    assert Path(image.download_target(image_info)).read_bytes() == live.bundles["1.1.0"].read_bytes()

    # reading again with nothing changed signs nothing new
    before = live.admin.get(f"/tuf/director/{device.id}/timestamp.json").json()["signed"]["version"]
    assert live.admin.get(f"/tuf/director/{device.id}/timestamp.json").json()["signed"]["version"] == before


def test_a_device_gets_403_for_another_devices_director_metadata_and_operators_read_any(live: Fleet) -> None:
    mine, other = live.device(), live.device()
    live.assign(other, "1.0.0")
    for path in ("timestamp.json", "1.root.json", "1.snapshot.json", "1.targets.json"):
        r = mine.client.get(f"/tuf/director/{other.id}/{path}", headers=mine.headers)
        assert r.status_code == 403, r.text
        assert r.json()["field"] == "device_id" and other.id in r.json()["error"]
        assert live.admin.get(f"/tuf/director/{other.id}/{path}").status_code == 200, path
    assert mine.client.get(f"/tuf/director/{mine.id}/timestamp.json", headers=mine.headers).status_code == 200
    r = mine.client.get(f"/tuf/director/{other.id}/timestamp.json")  # no token
    assert r.status_code == 401 and r.json()["field"] == "authorization"
    r = live.admin.get("/tuf/director/no-such-device/timestamp.json")
    assert r.status_code == 404 and "no-such-device" in r.json()["error"]


def test_a_device_gets_403_for_an_image_target_its_director_does_not_name(live: Fleet, tmp_path: Path) -> None:
    device, other = live.device(), live.device()
    live.assign(device, "1.0.0")
    live.assign(other, "1.1.0")
    image = _image(live, device, tmp_path)
    image.refresh()  # the image repository lists both versions: a device may read the list ...
    info = image.get_targetinfo("digits-1.1.0.efb")
    assert info is not None
    with pytest.raises(DownloadHTTPError) as e:  # ... but not fetch the bytes of a version not assigned to it
        image.download_target(info)
    assert e.value.status_code == 403
    sha = info.hashes["sha256"]
    r = device.client.get(f"/tuf/image/targets/{sha}.digits-1.1.0.efb", headers=device.headers)
    assert r.status_code == 403 and r.json()["field"] == "filename"
    mine = image.get_targetinfo("digits-1.0.0.efb")
    assert mine is not None
    assert Path(image.download_target(mine)).read_bytes() == live.bundles["1.0.0"].read_bytes()
    assert live.admin.get(f"/tuf/image/targets/{sha}.digits-1.1.0.efb").status_code == 200  # operators: any

    # unassigned: the director lists nothing, and the bytes it named before are refused too
    assert live.admin.delete(f"/api/v1/devices/{device.id}/models/digits").status_code == 204
    director = _director(live, device, tmp_path)
    director.refresh()
    assert director.get_targetinfo("digits-1.0.0.efb") is None
    assert Metadata.from_file(str(tmp_path / "director" / device.id / "targets.json")).signed.targets == {}
    with pytest.raises(DownloadHTTPError) as e:
        image.download_target(mine, str(tmp_path / "again.efb"))
    assert e.value.status_code == 403


def test_director_versions_never_go_down_across_a_server_restart(live: Fleet, tmp_path: Path) -> None:
    device = live.device()
    live.assign(device, "1.0.0")
    _director(live, device, tmp_path).refresh()
    before = {role: _trusted(tmp_path, device, role) for role in ("targets", "snapshot", "timestamp")}

    live.srv.stop()
    live.srv.start()
    director = _director(live, device, tmp_path)
    director.refresh()  # the same assignments after the restart: the same (or newer) versions, never older
    assert all(_trusted(tmp_path, device, r) >= v for r, v in before.items())

    live.assign(device, "1.1.0")
    director = _director(live, device, tmp_path)
    director.refresh()  # ngclient itself refuses a lower version: a refresh that works proves it
    assert all(_trusted(tmp_path, device, r) > v for r, v in before.items())
    assert director.get_targetinfo("digits-1.1.0.efb") is not None
    ts = Metadata[Timestamp].from_bytes(
        live.admin.get(f"/tuf/director/{device.id}/timestamp.json").content).signed
    assert ts.version == _trusted(tmp_path, device, "timestamp")


def test_two_replicas_answering_many_devices_at_once_sign_one_targets_per_change_and_no_errors(
    live: Fleet, tmp_path: Path
) -> None:
    devices = [live.device() for _ in range(3)]
    for d in devices:
        live.assign(d, "1.0.0")
    replica = Server(live.srv.data, live.srv.db)  # the same data folder (online keys) and database
    replica.start()
    try:
        for d in devices:
            live.assign(d, "1.1.0")  # signed by the assignment itself, then forgotten below
        engine = make_engine(live.srv.db)
        with engine.begin() as c:  # as for assignments made before the director root: nothing signed yet,
            c.execute(delete(TufMetadata).where(TufMetadata.repo.in_([f"director/{d.id}" for d in devices])))
        engine.dispose()  # so every first read below finds the targets missing and races to sign them
        go = threading.Barrier(12)
        seen: list[tuple[str, int, int]] = []

        def read(device: SimDevice, url: str) -> None:
            with httpx.Client(base_url=url, timeout=30, headers=device.headers) as c:
                go.wait()
                r = c.get(f"/tuf/director/{device.id}/timestamp.json")
                seen.append((device.id, r.status_code, r.json()["signed"]["version"] if r.status_code == 200 else 0))

        workers = [threading.Thread(target=read, args=(devices[i % 3], (live.srv.url, replica.url)[i % 2]))
                   for i in range(12)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert len(seen) == 12 and all(status == 200 for _, status, _ in seen), seen
        for d in devices:
            assert {v for who, _, v in seen if who == d.id} == {1}, seen  # one timestamp per device, not one per read
            r = live.admin.get(f"/tuf/director/{d.id}/1.targets.json")
            assert list(Metadata.from_bytes(r.content).signed.targets) == ["digits-1.1.0.efb"]
            assert live.admin.get(f"/tuf/director/{d.id}/2.targets.json").status_code == 404
            assert d.client.get(f"/api/v1/devices/{d.id}/desired", headers=d.headers).headers["etag"] == '"ts-1"'
    finally:
        logged = replica.stop()
    assert "Traceback" not in logged, logged[-3000:]


def test_director_roles_are_resigned_before_they_expire_and_a_root_without_the_director_key_is_refused(
    fleet: Any, tmp_path: Path
) -> None:
    ring = Keyring.create(tmp_path / "keys", 1, 1)
    ring.online = fleet.client.get("/tuf/image/keys", headers=fleet.admin_h).json()["keys"]
    wrong = ring.build_director_root(datetime.now(UTC))
    wrong.roles["targets"].keyids = list(wrong.roles["snapshot"].keyids)  # the snapshot key would sign targets
    r = fleet.client.put("/tuf/director/root", content=canonical_bytes(ring.sign_root(wrong, ring.roles["root"])),
                         headers=fleet.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "signed.roles.targets", r.text
    root = ring.sign_root(ring.build_director_root(datetime.now(UTC)), ring.roles["root"])
    r = fleet.client.put("/tuf/director/root", content=canonical_bytes(root), headers=fleet.admin_h)
    assert r.status_code == 200 and r.json() == {"version": 1}, r.text
    r = fleet.client.put("/tuf/director/root", content=canonical_bytes(root), headers=fleet.admin_h)
    assert r.status_code == 409 and r.json()["field"] == "signed.version"

    now = [datetime.now(UTC)]
    setattr(fleet.client.app.state, DIRECTOR_KEY, DirectorRepository(
        fleet.state.sessions, load_online_keys(fleet.settings.data_dir), clock=lambda: now[0]))
    device = fleet.device()
    bundle = make_bundle(tmp_path / "b", "digits", "2.0.0")
    assert fleet.upload(bundle).status_code == 201
    assert fleet.client.put(f"/api/v1/devices/{device.id}/models/digits", json={"version": "2.0.0"},
                            headers=fleet.admin_h).status_code == 200

    def versions() -> tuple[int, int, int]:
        r = fleet.client.get(f"/tuf/director/{device.id}/timestamp.json", headers=device.headers)
        assert r.status_code == 200, r.text
        ts = Metadata.from_bytes(r.content).signed
        assert isinstance(ts, Timestamp) and ts.expires > now[0]
        sn = Metadata.from_bytes(fleet.client.get(
            f"/tuf/director/{device.id}/{ts.snapshot_meta.version}.snapshot.json", headers=device.headers).content)
        return sn.signed.meta["targets.json"].version, ts.snapshot_meta.version, ts.version

    assert versions() == (1, 1, 1)
    assert versions() == (1, 1, 1)
    now[0] += timedelta(hours=13)  # past half the timestamp's day
    assert versions() == (1, 1, 2)
    now[0] += timedelta(days=1, hours=12)  # past half the targets' and snapshot's three days
    assert versions() == (2, 2, 3)


def test_keys_init_on_a_keyring_from_before_the_director_publishes_only_the_director_root(
    live: Fleet, clean_db: str
) -> None:
    token = live.admin.headers["authorization"].split()[1]
    env = {**os.environ, "EDGEFLEET_TOKEN": token}
    cmd = [*CLI, "keys", "init", "--keys", str(live.keys), "--server", live.srv.url]
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already published" in again.stderr

    # a server and keyring from before the director: no director root on either side
    engine = make_engine(clean_db)
    with engine.begin() as c:
        c.execute(delete(TufMetadata).where(TufMetadata.repo == "director"))
    engine.dispose()
    shutil.rmtree(live.keys / "director")
    image_before = live.admin.get("/tuf/image/keys").json()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert "director root file" in r.stdout
    new_root = Metadata.from_file(str(live.keys / "director" / "1.root.json")).signed
    assert new_root.roles["root"].keyids == Keyring.load(live.keys).roles["root"]  # the same offline root keys
    assert live.admin.get("/tuf/director/no-such/1.root.json").status_code == 200
    after = live.admin.get("/tuf/image/keys").json()
    assert after["director_root_version"] == 1
    assert (after["root_version"], after["targets_version"]) == (image_before["root_version"],
                                                                 image_before["targets_version"])
