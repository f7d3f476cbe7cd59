"""The TUF image repository on the fleet server, against the real server (SQLite and PostgreSQL): an
operator publishes root 1 from an offline keyring, pushes a bundle the old way, signs targets listing it
with the release key, and python-tuf's stock ``ngclient.Updater`` downloads the bundle. Refusals: online
keys only, versions that are not the next, targets the registry does not hold, roots signed by too few
old keys; online roles are re-signed before they expire; hostile metadata uploads keep the server's
RSS bounded (read from /proc)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from _fleet import CLI, MIB, PeakRSS, Server, make_bundle
from _support import wait_until
from sqlalchemy import delete
from tuf.api.exceptions import DownloadHTTPError, UnsignedMetadataError
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from edgefleet.server.db import make_engine
from edgefleet.server.models import TufMetadata
from edgefleet.server.tuf import ImageRepository, load_online_keys
from edgefleet.server.tuf.routes import REPO_KEY
from edgefleet.tufmeta import canonical_bytes, expiry_from, fingerprint
from edgefleet.tufmeta.keyring import Keyring


class BearerFetcher(FetcherInterface):
    """A TUF fetcher (the one-method interface ngclient documents) over an httpx client that sends the
    operator's token: a real socket for the server process, the in-process app for a TestClient."""

    def __init__(self, client: httpx.Client, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = headers or {}
        self.urls: list[str] = []

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.urls.append(url)
        r = self.client.send(self.client.build_request("GET", url, headers=self.headers), stream=True)
        if r.status_code != 200:
            r.read()
            r.close()
            raise DownloadHTTPError(f"{url}: HTTP {r.status_code}", r.status_code)

        def chunks() -> Iterator[bytes]:
            try:
                yield from r.iter_bytes(64 * 1024)
            finally:
                r.close()

        return chunks()


def _updater(
    tmp: Path, root_file: Path, base: str, client: httpx.Client, headers: dict[str, str] | None = None
) -> tuple[Updater, BearerFetcher]:
    meta, targets = tmp / "meta", tmp / "targets"
    meta.mkdir(parents=True, exist_ok=True)
    targets.mkdir(parents=True, exist_ok=True)
    fetcher = BearerFetcher(client, headers)
    updater = Updater(str(meta), f"{base}/tuf/image/", str(targets), f"{base}/tuf/image/targets/", fetcher,
                      bootstrap=root_file.read_bytes())  # the trust anchor: the operator's own root file
    return updater, fetcher


def _now() -> datetime:
    return datetime.now(UTC)


def _forget_metadata(db_url: str) -> None:
    """The conftest empties the tables it knows; this one is new."""
    engine = make_engine(db_url)
    with engine.begin() as c:
        c.execute(delete(TufMetadata))
    engine.dispose()


def _publish(client: Any, headers: dict[str, str], keys: Path, root_keys: int = 1, threshold: int = 1) -> Keyring:
    """What `edgefleet keys init --server` does, through the keyring's Python API (the CLI is tested on a
    real process below)."""
    ring = Keyring.create(keys, root_keys, threshold)
    info = client.get("/tuf/image/keys", headers=headers).json()
    ring.online = info["keys"]
    ring.save()
    root = ring.sign_root(ring.build_root(_now()), ring.roles["root"])
    r = client.put("/tuf/image/root", content=canonical_bytes(root), headers=headers)
    assert r.status_code == 200, r.text
    ring.save_root(root)
    t1 = ring.sign_targets(Targets(version=1, expires=expiry_from(_now(), "targets")))
    r = client.put("/tuf/image/targets", content=canonical_bytes(t1), headers=headers)
    assert r.status_code == 200, r.text
    return ring


def _targets(version: int, *bundles: Path) -> Targets:
    t = Targets(version=version, expires=expiry_from(_now(), "targets"))
    for b in bundles:
        t.targets[b.name] = TargetFile.from_data(b.name, b.read_bytes(), ["sha256"])
    return t


@pytest.fixture
def image(fleet: Any) -> Any:
    _forget_metadata(fleet.settings.database_url())
    return fleet


def _root_file(ring: Keyring) -> Path:
    md = ring.latest_root()
    assert md is not None
    return ring.root_file(md.signed.version)


# ------------------------------------------------------------------------------------ the whole path


def test_operator_publishes_root_pushes_a_bundle_and_stock_ngclient_downloads_it_from_the_server_process(
    clean_db: str, tmp_path: Path
) -> None:
    _forget_metadata(clean_db)
    srv = Server(tmp_path / "data", clean_db)
    init = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--db", clean_db, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    admin = json.loads(init.stdout)["admin_token"]
    srv.start()
    try:
        env = {**os.environ, "EDGEFLEET_TOKEN": admin}
        keys = tmp_path / "keys"
        r = subprocess.run([*CLI, "keys", "init", "--keys", str(keys), "--root-keys", "3", "--root-threshold", "2",
                            "--server", srv.url, "--json"], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        shown = json.loads(r.stdout)
        root_file = keys / "image" / "1.root.json"
        assert shown["fingerprint"] == hashlib.sha256(root_file.read_bytes()).hexdigest() == fingerprint(
            root_file.read_bytes())

        bundle = make_bundle(tmp_path / "b", "digits", "1.2.0", 50_000)
        push = [sys.executable, "-c", "import typer; from edgefleet.cli.fleet import push; typer.run(push)"]
        r = subprocess.run([*push, str(bundle), "--server", srv.url], capture_output=True, text=True, timeout=60,
                           env=env)
        assert r.returncode == 0, r.stderr

        ring = Keyring.load(keys)
        with httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30) as c:
            signed = ring.sign_targets(_targets(2, bundle))
            r = c.put("/tuf/image/targets", content=canonical_bytes(signed))
            assert r.status_code == 200, r.text
            assert r.json() == {"version": 2}

            updater, fetcher = _updater(tmp_path / "client", root_file, srv.url, c)
            updater.refresh()
            info = updater.get_targetinfo("digits-1.2.0.efb")
            assert info is not None and info.length == bundle.stat().st_size
            path = updater.download_target(info)
        assert Path(path).read_bytes() == bundle.read_bytes()
        sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
        assert f"{srv.url}/tuf/image/targets/{sha}.digits-1.2.0.efb" in fetcher.urls
        assert any(u.endswith("/tuf/image/2.snapshot.json") for u in fetcher.urls)  # consistent snapshots
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ refusals


def test_targets_signed_by_the_servers_online_keys_only_are_refused_by_the_server_and_by_ngclient(
    image: Any, tmp_path: Path
) -> None:
    ring = _publish(image.client, image.admin_h, tmp_path / "keys")
    bundle = make_bundle(tmp_path / "b", "digits", "6.6.6")
    assert image.upload(bundle).status_code == 201
    # the attacker holds the whole data folder: every online key the server has
    online = load_online_keys(image.settings.data_dir)
    forged = Metadata(_targets(2, bundle))
    for signer in (online.snapshot, online.timestamp, online.director_targets):
        forged.sign(signer, append=True)
    r = image.client.put("/tuf/image/targets", content=canonical_bytes(forged), headers=image.admin_h)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "signatures" and "release" in r.json()["error"]

    # ... and writes it straight into the database, with a snapshot and timestamp its keys sign
    repo = ImageRepository(image.state.sessions, online)
    with image.state.sessions.begin() as s:
        repo._add(s, "targets", forged, "attacker")
        sn = repo._sign_snapshot(s, 2, 2, _now())
        repo._sign_timestamp(s, sn, 2, _now())
    updater, _ = _updater(tmp_path / "client", _root_file(ring), "http://testserver", image.client, image.admin_h)
    with pytest.raises(UnsignedMetadataError):
        updater.refresh()


def test_targets_whose_version_is_not_the_next_are_a_409(image: Any, tmp_path: Path) -> None:
    ring = _publish(image.client, image.admin_h, tmp_path / "keys")
    for version in (1, 3):  # a replay of the current one, and a skip
        signed = ring.sign_targets(_targets(version))
        r = image.client.put("/tuf/image/targets", content=canonical_bytes(signed), headers=image.admin_h)
        assert r.status_code == 409 and r.json()["field"] == "signed.version", r.text
        assert "expected 2" in r.json()["error"]
    r = image.client.put("/tuf/image/targets", content=canonical_bytes(ring.sign_targets(_targets(2))),
                         headers=image.admin_h)
    assert r.status_code == 200 and r.json() == {"version": 2}


def test_targets_naming_a_bundle_the_registry_does_not_hold_are_a_422_naming_the_target(
    image: Any, tmp_path: Path
) -> None:
    ring = _publish(image.client, image.admin_h, tmp_path / "keys")
    pushed = make_bundle(tmp_path / "b", "digits", "1.0.0")
    never = make_bundle(tmp_path / "n", "digits", "9.9.9")
    assert image.upload(pushed).status_code == 201

    t = _targets(2, never)
    r = image.client.put("/tuf/image/targets", content=canonical_bytes(ring.sign_targets(t)), headers=image.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "signed.targets.digits-9.9.9.efb", r.text

    t = _targets(2, pushed)
    t.targets[pushed.name].length += 1
    r = image.client.put("/tuf/image/targets", content=canonical_bytes(ring.sign_targets(t)), headers=image.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "signed.targets.digits-1.0.0.efb.length", r.text

    t = _targets(2, pushed)
    t.targets["other-1.0.0.efb"] = t.targets.pop(pushed.name)  # same bytes, another name
    r = image.client.put("/tuf/image/targets", content=canonical_bytes(ring.sign_targets(t)), headers=image.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "signed.targets.other-1.0.0.efb", r.text
    assert image.client.get("/tuf/image/2.targets.json", headers=image.admin_h).status_code == 404


def test_a_root_rotation_signed_by_too_few_old_root_keys_is_refused(image: Any, tmp_path: Path) -> None:
    ring = _publish(image.client, image.admin_h, tmp_path / "keys", root_keys=3, threshold=2)
    old_root = ring.latest_root()
    assert old_root is not None
    old_ids = list(ring.roles["root"])
    new_ids = [ring.new_key("root") for _ in range(3)]
    ring.roles["root"] = new_ids
    root2 = ring.build_root(_now(), old_root.signed)

    one_old = ring.sign_root(copy.deepcopy(root2), old_ids[:1] + new_ids)
    r = image.client.put("/tuf/image/root", content=canonical_bytes(one_old), headers=image.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "signatures", r.text
    assert "current root" in r.json()["error"]

    no_new = ring.sign_root(copy.deepcopy(root2), old_ids)
    r = image.client.put("/tuf/image/root", content=canonical_bytes(no_new), headers=image.admin_h)
    assert r.status_code == 422 and "its own root keys" in r.json()["error"], r.text

    skipped = copy.deepcopy(root2)
    skipped.version = 3
    r = image.client.put("/tuf/image/root", content=canonical_bytes(ring.sign_root(skipped, old_ids + new_ids)),
                         headers=image.admin_h)
    assert r.status_code == 409 and r.json()["field"] == "signed.version", r.text

    good = ring.sign_root(copy.deepcopy(root2), old_ids[:2] + new_ids[:2])
    r = image.client.put("/tuf/image/root", content=canonical_bytes(good), headers=image.admin_h)
    assert r.status_code == 200 and r.json() == {"version": 2}, r.text
    # a client that trusts root 1 follows the chain to root 2
    updater, fetcher = _updater(tmp_path / "client", ring.root_file(1), "http://testserver", image.client, image.admin_h)
    updater.refresh()
    assert any(u.endswith("/tuf/image/2.root.json") for u in fetcher.urls)


def test_a_root_naming_other_online_keys_than_the_servers_is_refused(image: Any, tmp_path: Path) -> None:
    ring = Keyring.create(tmp_path / "keys", 1, 1)
    fake = Keyring.create(tmp_path / "fake", 1, 1)  # keys the server does not hold
    ring.online = {r: {"keyid": k, **fake.keys[k]} for r, k in (("snapshot", fake.roles["root"][0]),
                                                                 ("timestamp", fake.roles["targets"][0]))}
    root = ring.sign_root(ring.build_root(_now()), ring.roles["root"])
    r = image.client.put("/tuf/image/root", content=canonical_bytes(root), headers=image.admin_h)
    assert r.status_code == 422 and r.json()["field"] == "signed.roles.snapshot", r.text


def test_bad_uploads_and_reads_are_json_4xx_naming_the_field(image: Any, tmp_path: Path) -> None:
    h = image.admin_h
    assert image.client.get("/tuf/image/timestamp.json", headers=h).status_code == 404
    ring = Keyring.create(tmp_path / "keys", 1, 1)
    targets = ring.sign_targets(_targets(1))
    r = image.client.put("/tuf/image/targets", content=canonical_bytes(targets), headers=h)
    assert r.status_code == 409 and r.json()["field"] == "root", r.text  # no root yet
    hostile = (b"[" * 200_000, b'{"signed": {"_type": "root", "version": 1e999}, "signatures": []}',
               b'{"signed": {"_type": "root", "version": "1"}, "signatures": [{"keyid": 1}]}')
    for body in (b"", b"not json", b"[]", b'{"signed": {}, "signatures": []}', canonical_bytes(targets), *hostile):
        r = image.client.put("/tuf/image/root", content=body, headers=h)
        assert r.status_code == 422, (body, r.text)
        assert r.json()["field"] in ("body", "signed._type"), r.text
    assert image.client.put("/tuf/image/root", content=b"{}").status_code == 401
    viewer = image.api_token("viewer")
    r = image.client.put("/tuf/image/root", content=b"{}", headers=image.auth(viewer))
    assert r.status_code == 403 and r.json()["field"] == "authorization"
    for path in ("/tuf/image/0.root.json", "/tuf/image/x.root.json", "/tuf/image/1.mirror.json",
                 "/tuf/image/99999999999.root.json"):
        r = image.client.get(path, headers=h)
        assert r.status_code in (404, 422) and "error" in r.json(), (path, r.text)
    assert image.client.get("/tuf/image/1.root.json").status_code == 401
    assert image.client.get("/tuf/image/targets/nothex.digits-1.0.0.efb", headers=h).status_code == 404


def test_target_files_are_served_with_range_and_only_under_their_registry_name(image: Any, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", "digits", "2.0.0", 9000)
    assert image.upload(bundle).status_code == 201
    sha = hashlib.sha256(bundle.read_bytes()).hexdigest()
    r = image.client.get(f"/tuf/image/targets/{sha}.digits-2.0.0.efb", headers={**image.admin_h,
                                                                              "Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == bundle.read_bytes()[10:20]
    r = image.client.get(f"/tuf/image/targets/{sha}.digits-2.0.1.efb", headers=image.admin_h)
    assert r.status_code == 404 and r.json()["field"] == "filename"


# ------------------------------------------------------------------------------------ online re-signing


def test_online_roles_are_resigned_once_half_their_lifetime_is_gone(image: Any, tmp_path: Path) -> None:
    now = [_now()]
    repo = ImageRepository(image.state.sessions, load_online_keys(image.settings.data_dir),
                           {"timestamp": timedelta(minutes=10), "snapshot": timedelta(minutes=30)}, lambda: now[0])
    setattr(image.client.app.state, REPO_KEY, repo)
    ring = _publish(image.client, image.admin_h, tmp_path / "keys")

    def timestamp() -> Metadata[Any]:
        r = image.client.get("/tuf/image/timestamp.json", headers=image.admin_h)
        assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
        return Metadata.from_bytes(r.content)

    first = timestamp()
    assert first.signed.version == 1 and timestamp().signed.version == 1  # fresh: served as stored
    now[0] += timedelta(minutes=6)  # past half the timestamp's lifetime, not the snapshot's
    second = timestamp()
    assert second.signed.version == 2 and second.signed.expires > first.signed.expires
    assert second.signed.snapshot_meta.version == 1
    now[0] += timedelta(minutes=10)  # past half the snapshot's
    third = timestamp()
    assert third.signed.version == 3 and third.signed.snapshot_meta.version == 2
    r = image.client.get("/tuf/image/2.snapshot.json", headers=image.admin_h)
    assert r.status_code == 200
    assert Metadata.from_bytes(r.content).signed.meta["targets.json"].version == 1

    # the stock client accepts the re-signed chain (its own clock: the metadata is valid for minutes)
    updater, _ = _updater(tmp_path / "client", _root_file(ring), "http://testserver", image.client, image.admin_h)
    updater.refresh()


# ------------------------------------------------------------------------------------ hostile uploads


def _big_targets(ring: Keyring, limit: int) -> bytes:
    """Correctly signed targets just under ``limit`` bytes listing bundles the registry never had: the
    worst case for the server (parse, canonicalise, verify the signature, then check the registry)."""
    n = limit // 190
    while True:
        t = Targets(version=2, expires=expiry_from(_now(), "targets"))
        for i in range(n):
            t.targets[f"m{i}-1.0.0.efb"] = TargetFile(1000 + i, {"sha256": hashlib.sha256(str(i).encode()).hexdigest()},
                                                      f"m{i}-1.0.0.efb")
        body = canonical_bytes(ring.sign_targets(t))
        if len(body) < limit:
            return body
        n = n * 9 // 10


def _push_in_parallel(srv: Server, h: dict[str, str], body: bytes, clients: int = 4) -> tuple[list[int], float]:
    """``clients`` threads PUT ``body`` as targets until 40 answers came back (a few seconds at most):
    (the statuses, the server's peak RSS growth in MiB)."""
    stop = threading.Event()
    seen: list[int] = []

    def push() -> None:
        with httpx.Client(base_url=srv.url, timeout=30, headers=h) as hc:
            while not stop.is_set():
                seen.append(hc.put("/tuf/image/targets", content=body).status_code)

    with PeakRSS(srv.pid) as peak:
        workers = [threading.Thread(target=push) for _ in range(clients)]
        for w in workers:
            w.start()
        wait_until(lambda: len(seen) >= 40, timeout=3.0)
        stop.set()
        for w in workers:
            w.join(60)
    return seen, peak.peak - peak.before


def test_hostile_metadata_uploads_keep_the_servers_memory_bounded(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'data' / 'edgefleet.db'}"
    srv = Server(tmp_path / "data", db)
    init = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--json"], capture_output=True, text=True,
                          timeout=60)
    assert init.returncode == 0, init.stderr
    h = {"Authorization": f"Bearer {json.loads(init.stdout)['admin_token']}"}
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            ring = _publish(c, h, tmp_path / "keys")
            bodies = {"big signed targets": (_big_targets(ring, MIB), 422),
                      "deep nesting": (b"[" * (MIB - 1024), 422),
                      "over the limit": (b" " * (MIB + 1), 413)}
            figures: dict[str, float] = {}
            for what, (body, status) in bodies.items():
                seen, figures[what] = _push_in_parallel(srv, h, body)
                assert seen and set(seen) <= {status, 503}, (what, sorted(set(seen)))
                assert c.get("/healthz").status_code == 200
            print("RSS growth, MiB:", {k: round(v, 1) for k, v in figures.items()})
            # parsing JSON takes up to ~25x its size; the body budget (2 MiB at once) bounds how much
            assert max(figures.values()) <= 25 * 2 + 64, figures
            assert c.get("/tuf/image/1.targets.json", headers=h).status_code == 200
            assert c.get("/tuf/image/2.targets.json", headers=h).status_code == 404
    finally:
        logged = srv.stop()
    assert "Traceback" not in logged, logged[-3000:]


def test_two_operators_uploading_the_same_next_version_at_once_one_lands_and_the_other_gets_409(
    clean_db: str, tmp_path: Path
) -> None:
    _forget_metadata(clean_db)
    srv = Server(tmp_path / "data", clean_db)
    init = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--db", clean_db, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    h = {"Authorization": f"Bearer {json.loads(init.stdout)['admin_token']}"}
    srv.start()
    try:
        with httpx.Client(base_url=srv.url, timeout=30, headers=h) as c:
            ring = _publish(c, h, tmp_path / "keys")
            bundles = [make_bundle(tmp_path / f"b{i}", "digits", f"3.0.{i}") for i in range(4)]
            for b in bundles:
                assert c.post("/api/v1/models", content=b.read_bytes()).status_code == 201
            bodies = [canonical_bytes(ring.sign_targets(_targets(2, b))) for b in bundles]
            go = threading.Barrier(len(bodies))
            statuses: list[int] = []

            def put(body: bytes) -> None:
                with httpx.Client(base_url=srv.url, timeout=30, headers=h) as hc:
                    go.wait()
                    statuses.append(hc.put("/tuf/image/targets", content=body).status_code)

            workers = [threading.Thread(target=put, args=(b,)) for b in bodies]
            for w in workers:
                w.start()
            for w in workers:
                w.join(60)
            assert sorted(statuses) == [200, 409, 409, 409], statuses
            ts = Metadata.from_bytes(c.get("/tuf/image/timestamp.json").content)
            assert ts.signed.version == 2 and ts.signed.snapshot_meta.version == 2  # one new pair, not four
            sn = Metadata.from_bytes(c.get("/tuf/image/2.snapshot.json").content)
            assert sn.signed.meta["targets.json"].version == 2
            assert c.get("/tuf/image/3.snapshot.json").status_code == 404
    finally:
        logged = srv.stop()
    assert "Traceback" not in logged, logged[-3000:]
