"""Pushing is a signing protocol: ``edgefleet model push BUNDLE --keys DIR`` uploads the bundle and lists it
in the image targets signed by the operator's release key (stock ngclient then downloads it with its
custom fields); operators pushing at once all land (409, fetch again, re-sign); the same bytes again sign
nothing; ``model sign`` lists a bundle pushed without keys; ``model withdraw`` signs targets without it
and the bundle stays; ``device enroll-token --keys`` pins the token to the keyring's own image root.
Everything runs the real CLI against a real ``edgefleet server run`` process (SQLite)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support import assert_one_line_error, run_cli
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from edgefleet.cli.fleet import _listing, _unlisting
from edgefleet.errors import ConfigError
from edgefleet.tufmeta import canonical_bytes, expiry_from
from edgefleet.tufmeta.pin import split_pin
from edgefleet.tufmeta.roles import bundle_target

sys.path.insert(0, str(Path(__file__).resolve().parent / "server"))
from _fleet import CLI, Server, enroll, make_bundle


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A server process with the operator's admin token in EDGEFLEET_TOKEN and its URL in EDGEFLEET_SERVER."""
    srv = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'edgefleet.db'}")
    r = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("EDGEFLEET_TOKEN", json.loads(r.stdout)["admin_token"])
    monkeypatch.setenv("EDGEFLEET_SERVER", srv.url)
    monkeypatch.delenv("EDGEFLEET_KEYS", raising=False)
    srv.start()
    yield srv
    logged = srv.stop()
    assert "Traceback" not in logged, logged[-3000:]


def _admin(srv: Server) -> httpx.Client:
    return httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {os.environ['EDGEFLEET_TOKEN']}"},
                        timeout=30)


def _keys(capsys: Any, tmp_path: Path, srv: Server) -> Path:
    keys = tmp_path / "keys"
    code, _, err = run_cli(capsys, "keys", "init", "--keys", keys, "--server", srv.url)
    assert code == 0, err
    return keys


def _targets_version(srv: Server) -> int:
    with _admin(srv) as c:
        return int(c.get("/tuf/image/keys").json()["targets_version"])


def _served_targets(srv: Server) -> Targets:
    with _admin(srv) as c:
        version = _targets_version(srv)
        md = Metadata[Targets].from_bytes(c.get(f"/tuf/image/{version}.targets.json").content)
    return md.signed


class _Fetcher(FetcherInterface):
    """ngclient's one-method fetcher over httpx, sending the operator's token."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        r = self.client.get(url)
        if r.status_code != 200:
            raise DownloadHTTPError(f"{url}: HTTP {r.status_code}", r.status_code)
        return iter([r.content])


def _ngclient(tmp: Path, srv: Server, keys: Path, client: httpx.Client) -> Updater:
    meta, out = tmp / "meta", tmp / "out"
    meta.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return Updater(str(meta), f"{srv.url}/tuf/image/", str(out), f"{srv.url}/tuf/image/targets/", _Fetcher(client),
                   bootstrap=(keys / "image" / "1.root.json").read_bytes())


class _Proxy:
    """A loopback HTTP proxy to ``upstream`` that forwards everything. ``gate=N``: the first N ``PUT
    /tuf/image/targets`` wait until all N have arrived, then go on together (N operators who read the
    same targets version collide for sure). ``drop_answer``: the first such PUT is forwarded but its
    answer is never sent (the connection is closed). ``puts`` records each targets PUT's status."""

    def __init__(self, upstream: str, gate: int = 0, drop_answer: bool = False) -> None:
        proxy = self
        self.puts: list[int] = []
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(gate, timeout=60) if gate else None
        self.gated = 0
        self.dropped = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in (
                    "authorization", "content-type", "x-content-sha256", "x-model-name", "x-model-version")}
                targets_put = self.command == "PUT" and self.path == "/tuf/image/targets"
                wait = drop = False
                if targets_put:
                    with proxy.lock:
                        if proxy.barrier is not None and proxy.gated < proxy.barrier.parties:
                            proxy.gated += 1
                            wait = True
                        if drop_answer and proxy.dropped == 0:
                            proxy.dropped = 1
                            drop = True
                if wait:
                    assert proxy.barrier is not None
                    proxy.barrier.wait()
                r = httpx.request(self.command, upstream + self.path, content=body, headers=headers, timeout=60)
                if targets_put:
                    with proxy.lock:
                        proxy.puts.append(r.status_code)
                if drop:
                    self.close_connection = True
                    return
                self.send_response(r.status_code)
                for name in ("content-type", "retry-after", "etag"):
                    if name in r.headers:
                        self.send_header(name, r.headers[name])
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_PUT = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def test_push_with_keys_lists_the_bundle_signed_and_stock_ngclient_downloads_it_and_a_second_push_signs_nothing(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = _keys(capsys, tmp_path, server)
    bundle = make_bundle(tmp_path / "b", "digits", "1.0.0")
    code, out, err = run_cli(capsys, "model", "push", bundle, "--keys", keys, "--json")
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed["signed"] is True and pushed["targets_version"] == 2 and pushed["targets_changed"] is True
    assert pushed["unchanged"] is False

    with _admin(server) as c:
        updater = _ngclient(tmp_path / "device", server, keys, c)
        updater.refresh()
        info = updater.get_targetinfo("digits-1.0.0.efb")
        assert info is not None
        assert info.custom == {"model": "digits", "version": "1.0.0"}
        assert info.length == bundle.stat().st_size
        assert info.hashes == {"sha256": hashlib.sha256(bundle.read_bytes()).hexdigest()}
        assert Path(updater.download_target(info)).read_bytes() == bundle.read_bytes()

    code, out, err = run_cli(capsys, "model", "push", bundle, "--keys", keys, "--json")
    assert code == 0, err
    again = json.loads(out)
    assert (again["unchanged"], again["signed"], again["targets_changed"], again["targets_version"]) == (
        True, True, False, 2)
    assert _targets_version(server) == 2  # nothing signed: no targets 3
    code, out, err = run_cli(capsys, "model", "push", bundle, "--keys", keys)
    assert code == 0, err
    assert "already in image targets 2 with these hashes: nothing signed" in out


def test_push_without_keys_uploads_only_says_so_and_model_sign_lists_it_from_the_registry(
    capsys: Any, tmp_path: Path, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = _keys(capsys, tmp_path, server)
    bundle = make_bundle(tmp_path / "b", "digits", "2.0.0")
    code, out, err = run_cli(capsys, "model", "push", bundle)
    assert code == 0, err
    assert "pushed digits 2.0.0" in out
    assert "not signed: devices will not install digits 2.0.0" in out and "model sign digits 2.0.0 --keys" in out
    code, out, err = run_cli(capsys, "model", "push", bundle, "--json")
    assert code == 0, err
    assert json.loads(out)["signed"] is False and json.loads(out)["targets_version"] is None
    assert _targets_version(server) == 1

    other = make_bundle(tmp_path / "other", "digits", "2.0.0", size=4096)  # not the registry's bytes
    code, _, err = run_cli(capsys, "model", "sign", "digits", "2.0.0", "--keys", keys, "--bundle", other)
    assert_one_line_error(code, err, "--bundle", "not the registry's digits 2.0.0", "nothing signed")
    code, _, err = run_cli(capsys, "model", "sign", "digits", "9.9.9", "--keys", keys)
    assert_one_line_error(code, err, "404", "version")
    assert _targets_version(server) == 1

    monkeypatch.setenv("EDGEFLEET_KEYS", str(keys))  # the keyring from the environment
    code, out, err = run_cli(capsys, "model", "sign", "digits", "2.0.0", "--bundle", bundle, "--json")
    assert code == 0, err
    signed = json.loads(out)
    assert signed["signed"] is True and signed["targets_version"] == 2 and signed["targets_changed"] is True
    assert signed["sha256"] == hashlib.sha256(bundle.read_bytes()).hexdigest()
    entry = _served_targets(server).targets["digits-2.0.0.efb"]
    assert entry == bundle_target("digits", "2.0.0", bundle.stat().st_size, signed["sha256"])
    code, out, err = run_cli(capsys, "model", "sign", "digits", "2.0.0")
    assert code == 0, err
    assert "nothing signed" in out and _targets_version(server) == 2


def test_push_with_a_keyring_that_cannot_sign_fails_in_one_line_before_anything_is_uploaded(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    bundle = make_bundle(tmp_path / "b", "digits", "3.0.0")
    unpublished = tmp_path / "unpublished"
    assert run_cli(capsys, "keys", "init", "--keys", unpublished)[0] == 0
    code, _, err = run_cli(capsys, "model", "push", bundle, "--keys", unpublished)
    assert_one_line_error(code, err, "published no image root", "keys init")
    keys = _keys(capsys, tmp_path, server)
    release = json.loads((keys / "keys.json").read_text())["roles"]["targets"][0]
    os.chmod(keys / "private" / f"{release}.key", 0o644)
    code, _, err = run_cli(capsys, "model", "push", bundle, "--keys", keys)
    assert_one_line_error(code, err, f"{release}.key", "readable by others")
    code, _, err = run_cli(capsys, "model", "withdraw", "digits", "3.0.0", "--keys", tmp_path / "nowhere")
    assert_one_line_error(code, err, "no keyring")
    with _admin(server) as c:
        assert c.get("/api/v1/models").json() == []  # nothing was uploaded
    assert _targets_version(server) == 1


def test_a_push_whose_targets_answer_is_lost_lands_once(capsys: Any, tmp_path: Path, server: Server) -> None:
    keys = _keys(capsys, tmp_path, server)
    bundle = make_bundle(tmp_path / "b", "digits", "4.0.0")
    proxy = _Proxy(server.url, drop_answer=True)
    try:
        code, out, err = run_cli(capsys, "model", "push", bundle, "--keys", keys, "--server", proxy.url, "--json")
    finally:
        proxy.close()
    assert code == 0, err
    assert proxy.puts == [200]  # the server took it; the CLI never heard, fetched again and found it there
    pushed = json.loads(out)
    assert pushed["targets_version"] == 2 and pushed["targets_changed"] is True
    assert _targets_version(server) == 2 and "digits-4.0.0.efb" in _served_targets(server).targets


def test_three_operators_pushing_at_once_all_land_after_409s(capsys: Any, tmp_path: Path, server: Server) -> None:
    keys = _keys(capsys, tmp_path, server)
    bundles = [make_bundle(tmp_path / f"b{i}", "digits", f"5.0.{i}") for i in range(3)]
    proxy = _Proxy(server.url, gate=3)  # all three read targets 1 and PUT targets 2 at the same moment
    env = {**os.environ}
    try:
        procs = []
        for i, b in enumerate(bundles):
            own = tmp_path / f"operator{i}"
            shutil.copytree(keys, own)  # each operator has a copy of the keyring
            procs.append(subprocess.Popen(
                [*CLI, "model", "push", str(b), "--keys", str(own), "--server", proxy.url, "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        results = [(p.wait(120), *p.communicate()) for p in procs]
    finally:
        proxy.close()
    for code, _, err in results:
        assert code == 0, err
    versions = sorted(json.loads(out)["targets_version"] for _, out, _ in results)
    assert versions == [2, 3, 4]
    assert proxy.puts.count(200) == 3 and proxy.puts.count(409) >= 2, proxy.puts
    assert set(proxy.puts) <= {200, 409}
    listed = _served_targets(server)
    assert listed.version == 4 and sorted(listed.targets) == [b.name for b in bundles]


def test_withdraw_signs_targets_without_the_version_and_the_bundle_stays_in_the_registry(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = _keys(capsys, tmp_path, server)
    old, new = (make_bundle(tmp_path / "b", "digits", v) for v in ("6.0.0", "6.1.0"))
    for b in (old, new):
        assert run_cli(capsys, "model", "push", b, "--keys", keys)[0] == 0
    assert _targets_version(server) == 3
    code, out, err = run_cli(capsys, "model", "withdraw", "digits", "6.0.0", "--keys", keys, "--json")
    assert code == 0, err
    assert json.loads(out) == {"name": "digits", "version": "6.0.0", "withdrawn": True, "targets_version": 4}
    listed = _served_targets(server)
    assert sorted(listed.targets) == ["digits-6.1.0.efb"]
    with _admin(server) as c:
        assert c.get("/api/v1/models/digits/6.0.0").status_code == 200  # the bundle stays
        updater = _ngclient(tmp_path / "device", server, keys, c)
        updater.refresh()
        assert updater.get_targetinfo("digits-6.0.0.efb") is None  # a TUF client no longer finds it
    code, out, err = run_cli(capsys, "model", "withdraw", "digits", "6.0.0", "--keys", keys)
    assert code == 0, err
    assert "not listed in image targets 4: nothing to withdraw" in out and _targets_version(server) == 4
    code, out, err = run_cli(capsys, "model", "sign", "digits", "6.0.0", "--keys", keys, "--json")
    assert code == 0, err  # listed again by a fresh signature
    assert json.loads(out)["targets_version"] == 5 and "digits-6.0.0.efb" in _served_targets(server).targets


def test_deleting_a_registry_version_the_image_targets_still_list_is_a_409(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = _keys(capsys, tmp_path, server)
    assert run_cli(capsys, "model", "push", make_bundle(tmp_path / "b", "digits", "7.0.0"), "--keys", keys)[0] == 0
    with _admin(server) as c:
        r = c.delete("/api/v1/models/digits/7.0.0")
        assert r.status_code == 409 and "withdraw" in r.json()["error"], r.text
        assert run_cli(capsys, "model", "withdraw", "digits", "7.0.0", "--keys", keys)[0] == 0
        assert c.delete("/api/v1/models/digits/7.0.0").status_code == 204


def test_the_targets_edits_refuse_other_bytes_under_a_signed_name_and_do_nothing_when_already_so() -> None:
    now = datetime.now(UTC)
    entry = bundle_target("digits", "1.0.0", 10, "a" * 64)
    targets = Targets(version=3, expires=expiry_from(now, "targets"))
    assert _listing(entry)(targets) is True and targets.targets["digits-1.0.0.efb"] == entry
    assert _listing(entry)(targets) is False  # already there with these hashes
    with pytest.raises(ConfigError, match=r"signed\.targets\.digits-1\.0\.0\.efb: .* already list it with sha256 a+ "
                                          r"\(10 bytes\), not b+ .*withdraw"):
        _listing(bundle_target("digits", "1.0.0", 10, "b" * 64))(targets)
    assert _unlisting("digits-1.0.0.efb")(targets) is True and targets.targets == {}
    assert _unlisting("digits-1.0.0.efb")(targets) is False


def test_enroll_token_with_keys_pins_the_keyrings_own_image_root_and_without_says_what_the_device_needs(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = _keys(capsys, tmp_path, server)
    code, out, err = run_cli(capsys, "device", "enroll-token", "--keys", keys, "--json")
    assert code == 0, err
    made = json.loads(out)
    bare, pin = split_pin(made["token"])
    root_file = keys / "image" / "1.root.json"
    assert pin is not None and pin.version == 1
    assert pin.fingerprint == hashlib.sha256(root_file.read_bytes()).hexdigest() == made["image_root_fingerprint"]
    assert made["pinned"] is True
    with httpx.Client(base_url=server.url, timeout=30) as anon:
        device = enroll(anon, bare)  # the server's own token is the part before the pin
        device.authenticate()

    code, out, err = run_cli(capsys, "device", "enroll-token")
    assert code == 0, err
    lines = out.splitlines()
    assert "." not in lines[1].strip() and "agent enroll --image-root FILE" in out
    code, out, err = run_cli(capsys, "device", "enroll-token", "--json")
    assert code == 0, err
    assert json.loads(out)["pinned"] is False

    with _admin(server) as c:
        before = len(c.get("/api/v1/enrollment-tokens").json())
        unpublished = tmp_path / "unpublished"
        assert run_cli(capsys, "keys", "init", "--keys", unpublished)[0] == 0
        code, _, err = run_cli(capsys, "device", "enroll-token", "--keys", unpublished)
        assert_one_line_error(code, err, "--keys", "published no image root")
        assert len(c.get("/api/v1/enrollment-tokens").json()) == before  # no token made for nothing


def test_signed_targets_the_cli_publishes_are_canonical_and_signed_by_the_release_key_only(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = _keys(capsys, tmp_path, server)
    assert run_cli(capsys, "model", "push", make_bundle(tmp_path / "b", "digits", "8.0.0"), "--keys", keys)[0] == 0
    with _admin(server) as c:
        raw = c.get("/tuf/image/2.targets.json").content
    md = Metadata[Targets].from_bytes(raw)
    assert canonical_bytes(md) == raw
    release = json.loads((keys / "keys.json").read_text())["roles"]["targets"]
    assert list(md.signatures) == release
    assert md.signed.expires > datetime.now(UTC)
