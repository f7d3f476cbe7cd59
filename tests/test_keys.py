"""``edgefleet keys init|show|rotate``: the operator's offline keys are private files whatever the umask;
a rotation's new root is signed by a threshold of the old AND the new root keys, and the server and a
TUF client accept it. Refusals are one line naming the option or file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support import assert_one_line_error, run_cli
from tuf.api.metadata import Metadata, Root, Targets

from edgefleet.tufmeta import canonical_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent / "server"))
from _fleet import CLI, Server, enroll
from test_tuf_image import BearerFetcher
from tuf.ngclient import Updater


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_keys_init_under_umask_000_writes_private_files_0600_in_folders_0700(
    capsys: Any, tmp_path: Path, loose_umask: None
) -> None:
    keys = tmp_path / "keys"
    code, out, err = run_cli(capsys, "keys", "init", "--keys", keys, "--root-keys", "3", "--root-threshold", "2",
                             "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert len(shown["roles"]["root"]["keyids"]) == 3 and shown["roles"]["root"]["threshold"] == 2
    assert len(shown["roles"]["targets"]["keyids"]) == 1
    assert shown["fingerprint"] is None  # nothing published without --server
    assert _mode(keys) == 0o700 and _mode(keys / "private") == 0o700
    private = sorted((keys / "private").iterdir())
    assert len(private) == 4 and all(_mode(p) == 0o600 for p in private)
    assert _mode(keys / "keys.json") == 0o600
    assert "PRIVATE" not in (keys / "keys.json").read_text()  # public halves only

    code, out, err = run_cli(capsys, "keys", "show", "--keys", keys)
    assert code == 0, err
    assert "root: threshold 2 of 3" in out and "not published yet" in out


def test_keys_refusals_are_one_line_naming_the_option(capsys: Any, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "keys", "init", "--keys", tmp_path / "a", "--root-keys", "2", "--root-threshold", "3")
    assert_one_line_error(code, err, "--root-threshold")
    assert not (tmp_path / "a").exists()
    code, _, err = run_cli(capsys, "keys", "show", "--keys", tmp_path / "none")
    assert_one_line_error(code, err, "no keyring", "keys init")
    assert run_cli(capsys, "keys", "init", "--keys", tmp_path / "k")[0] == 0
    code, _, err = run_cli(capsys, "keys", "init", "--keys", tmp_path / "k")
    assert_one_line_error(code, err, "already exists")
    code, _, err = run_cli(capsys, "keys", "rotate", "--keys", tmp_path / "k", "--role", "timestamp")
    assert_one_line_error(code, err, "--role", "server's")
    code, _, err = run_cli(capsys, "keys", "rotate", "--keys", tmp_path / "k", "--role", "root")
    assert_one_line_error(code, err, "no image root published")
    os.chmod(next((tmp_path / "k" / "private").iterdir()), 0o644)
    code, _, err = run_cli(capsys, "keys", "init", "--keys", tmp_path / "k", "--server", "http://127.0.0.1:9")
    assert code == 1 and len(err.strip().splitlines()) == 1, err  # token missing, or the key file refused


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    srv = Server(tmp_path / "data", f"sqlite:///{tmp_path / 'data' / 'edgefleet.db'}")
    r = subprocess.run([*CLI, "server", "init", "--data", str(srv.data), "--json"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    monkeypatch.setenv("EDGEFLEET_TOKEN", json.loads(r.stdout)["admin_token"])
    srv.start()
    yield srv
    srv.stop()


def _served(srv: Server, path: str) -> Metadata[Any]:
    r = httpx.get(f"{srv.url}/tuf/image/{path}", headers={"Authorization": f"Bearer {os.environ['EDGEFLEET_TOKEN']}"})
    assert r.status_code == 200, r.text
    return Metadata.from_bytes(r.content)


def test_rotate_root_signs_with_old_and_new_keys_and_rotate_targets_resigns_the_targets(
    capsys: Any, tmp_path: Path, server: Server, loose_umask: None
) -> None:
    keys = tmp_path / "keys"
    code, out, err = run_cli(capsys, "keys", "init", "--keys", keys, "--root-keys", "3", "--root-threshold", "2",
                             "--server", server.url, "--json")
    assert code == 0, err
    first = json.loads(out)
    old_root_ids = first["roles"]["root"]["keyids"]
    assert first["root_version"] == 1
    assert canonical_bytes(_served(server, "1.root.json")) == (keys / "image" / "1.root.json").read_bytes()

    code, out, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "root", "--json")
    assert code == 0, err
    second = json.loads(out)
    new_root_ids = second["roles"]["root"]["keyids"]
    assert second["root_version"] == 2 and not set(new_root_ids) & set(old_root_ids)
    assert second["fingerprint"] != first["fingerprint"]
    root1 = Metadata[Root].from_file(str(keys / "image" / "1.root.json"))
    root2 = _served(server, "2.root.json")
    assert set(root2.signatures) == set(old_root_ids) | set(new_root_ids)  # every old and new root key signed
    check = root2.signed.get_root_verification_result(root1.signed, root2.signed_bytes, root2.signatures)
    assert check.first.verified and check.second.verified
    assert sorted(p.stem for p in (keys / "private").iterdir()) == sorted(
        new_root_ids + second["roles"]["targets"]["keyids"])  # the retired keys are gone
    assert all(_mode(p) == 0o600 for p in (keys / "private").iterdir())

    code, out, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "targets", "--json")
    assert code == 0, err
    third = json.loads(out)
    assert third["root_version"] == 3 and third["roles"]["targets"]["keyids"] != first["roles"]["targets"]["keyids"]
    root3 = _served(server, "3.root.json")
    assert set(root3.signatures) == set(new_root_ids)
    targets = _served(server, "2.targets.json")  # targets 1 re-signed as 2 with the new release key
    assert isinstance(targets.signed, Targets)
    root3.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)
    assert list(targets.signatures) == third["roles"]["targets"]["keyids"]


def test_keys_init_server_adopts_its_own_root_from_a_cut_run_and_refuses_a_second_publish(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    from edgefleet.tufmeta.keyring import Keyring

    keys = tmp_path / "keys"
    ring = Keyring.create(keys, 1, 1)
    h = {"Authorization": f"Bearer {os.environ['EDGEFLEET_TOKEN']}"}
    ring.online = httpx.get(f"{server.url}/tuf/image/keys", headers=h).json()["keys"]
    ring.server = server.url
    ring.save()
    root = ring.sign_root(ring.build_root(datetime.now(UTC)), ring.roles["root"])
    assert httpx.put(f"{server.url}/tuf/image/root", content=canonical_bytes(root), headers=h).status_code == 200
    # ... and the run stopped here, before the server's answer arrived: no local root, no targets 1

    code, out, err = run_cli(capsys, "keys", "init", "--keys", keys, "--server", server.url, "--json")
    assert code == 0, err
    assert json.loads(out)["root_version"] == 1
    assert (keys / "image" / "1.root.json").read_bytes() == canonical_bytes(root)
    assert isinstance(_served(server, "1.targets.json").signed, Targets)
    code, _, err = run_cli(capsys, "keys", "init", "--keys", keys, "--server", server.url)
    assert_one_line_error(code, err, "already published image root 1", "keys rotate")
    code, _, err = run_cli(capsys, "keys", "init", "--keys", tmp_path / "other", "--server", server.url)
    assert_one_line_error(code, err, "already has image root 1")


def test_server_init_on_a_folder_from_before_tuf_adds_only_the_online_keys_0600_under_umask_000(
    tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first = subprocess.run([*CLI, "server", "init", "--data", str(data), "--json"], capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    for key in (data / "tuf").iterdir():  # a folder initialised before TUF had none
        key.unlink()
    (data / "tuf").rmdir()
    again = subprocess.run([*CLI, "server", "init", "--data", str(data), "--json"], capture_output=True, text=True,
                           timeout=60, preexec_fn=lambda: os.umask(0))
    assert again.returncode == 0, again.stderr
    out = json.loads(again.stdout)
    assert out["initialised"] is False and set(out["tuf_keys"]) == {"snapshot", "timestamp", "director-targets"}
    assert "admin_token" not in out
    assert _mode(data / "tuf") == 0o700
    assert sorted(p.name for p in (data / "tuf").iterdir()) == ["director-targets.key", "snapshot.key",
                                                                  "timestamp.key"]
    assert all(_mode(p) == 0o600 for p in (data / "tuf").iterdir())
    third = subprocess.run([*CLI, "server", "init", "--data", str(data)], capture_output=True, text=True, timeout=60)
    assert third.returncode == 1 and "already initialised" in third.stderr


class _LosesAnswers:
    """A loopback HTTP proxy to ``upstream`` that forwards everything, but hangs up instead of answering a
    ``PUT`` to ``path``: after forwarding it (the server took it, the CLI never hears), or without
    forwarding it (``forward=False``: the run is cut before it)."""

    def __init__(self, upstream: str, path: str = "/tuf/image/root", forward: bool = True) -> None:
        import http.server
        import threading

        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                drop = self.command == "PUT" and self.path == path
                if forward or not drop:
                    r = httpx.request(self.command, upstream + self.path, content=body, headers=headers, timeout=30)
                if drop:
                    proxy.dropped += 1
                    self.close_connection = True
                    return
                self.send_response(r.status_code)
                self.send_header("content-type", r.headers.get("content-type", "application/json"))
                self.send_header("content-length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_PUT = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.dropped = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def test_rotate_whose_answer_is_lost_keeps_the_new_keys_the_server_took(capsys: Any, tmp_path: Path,
                                                                         server: Server) -> None:
    keys = tmp_path / "keys"
    code, out, err = run_cli(capsys, "keys", "init", "--keys", keys, "--server", server.url, "--json")
    assert code == 0, err
    proxy = _LosesAnswers(server.url)
    try:
        code, out, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "root", "--server", proxy.url,
                                 "--json")
    finally:
        proxy.close()
    assert proxy.dropped == 1
    assert code == 0, err
    rotated = json.loads(out)
    served = _served(server, "2.root.json")
    assert rotated["root_version"] == 2 and sorted(served.signed.roles["root"].keyids) == sorted(
        rotated["roles"]["root"]["keyids"])
    for keyid in rotated["roles"]["root"]["keyids"]:  # the keys root 2 names are still here
        assert (keys / "private" / f"{keyid}.key").is_file()


def test_a_targets_rotation_cut_before_the_targets_is_finished_by_the_next_rotate(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = tmp_path / "keys"
    assert run_cli(capsys, "keys", "init", "--keys", keys, "--server", server.url)[0] == 0
    proxy = _LosesAnswers(server.url, "/tuf/image/targets", forward=False)
    try:
        code, _, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "targets", "--server", proxy.url)
    finally:
        proxy.close()
    assert_one_line_error(code, err, "root 2 is published", "again to finish")
    assert proxy.dropped == 1
    root2 = _served(server, "2.root.json")  # the root naming the new release key is out; targets 1 is not re-signed
    code, out, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "targets", "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["finished_earlier_rotation"] is True and shown["root_version"] == 2
    targets = _served(server, "2.targets.json")
    root2.signed.verify_delegate("targets", targets.signed_bytes, targets.signatures)


def _director_device(srv: Server, keys: Path, tmp: Path, capsys: Any) -> Callable[[], Updater]:
    """A freshly enrolled device: each call makes a stock ngclient Updater over its director repository,
    as that device (its access token), trusting what the previous one stored (director root 1 from the
    keyring the first time), as a device does between runs."""
    code, out, err = run_cli(capsys, "device", "enroll-token", "--server", srv.url, "--json")
    assert code == 0, err
    device = enroll(httpx.Client(base_url=srv.url, timeout=30), json.loads(out)["token"])
    device.authenticate()
    (tmp / "meta").mkdir(parents=True)
    (tmp / "targets").mkdir()

    def updater() -> Updater:
        first = not (tmp / "meta" / "root.json").exists()
        return Updater(str(tmp / "meta"), f"{srv.url}/tuf/director/{device.id}/", str(tmp / "targets"),
                       f"{srv.url}/tuf/image/targets/", BearerFetcher(device.client, device.headers),
                       bootstrap=(keys / "director" / "1.root.json").read_bytes() if first else None)

    return updater


def test_rotate_root_publishes_a_director_root_signed_by_old_and_new_root_keys_that_a_device_follows(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = tmp_path / "keys"
    code, out, err = run_cli(capsys, "keys", "init", "--keys", keys, "--root-keys", "2", "--root-threshold", "2",
                             "--server", server.url, "--json")
    assert code == 0, err
    old_ids = json.loads(out)["roles"]["root"]["keyids"]
    device = _director_device(server, keys, tmp_path / "device", capsys)
    device().refresh()
    assert Metadata.from_file(str(tmp_path / "device" / "meta" / "root.json")).signed.version == 1
    h = {"Authorization": f"Bearer {os.environ['EDGEFLEET_TOKEN']}"}
    image_before = httpx.get(f"{server.url}/tuf/image/keys", headers=h).json()

    code, out, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "root", "--json")
    assert code == 0, err
    new_ids = json.loads(out)["roles"]["root"]["keyids"]
    r = httpx.get(f"{server.url}/tuf/director/any/2.root.json", headers=h)
    assert r.status_code == 200, r.text
    served = Metadata[Root].from_bytes(r.content)
    assert canonical_bytes(served) == (keys / "director" / "2.root.json").read_bytes()
    assert sorted(served.signed.roles["root"].keyids) == sorted(new_ids) and served.signed.roles["root"].threshold == 2
    assert set(served.signatures) == set(old_ids) | set(new_ids)  # every old and new root key signed
    director1 = Metadata[Root].from_file(str(keys / "director" / "1.root.json"))
    check = served.signed.get_root_verification_result(director1.signed, served.signed_bytes, served.signatures)
    assert check.first.verified and check.second.verified
    for role in ("targets", "snapshot", "timestamp"):  # the online keys are the same as before
        assert served.signed.roles[role].keyids == director1.signed.roles[role].keyids
    after = httpx.get(f"{server.url}/tuf/image/keys", headers=h).json()
    assert after["director_root_version"] == 2 and after["root_version"] == 2
    assert after["targets_version"] == image_before["targets_version"]

    device().refresh()  # the device, trusting director root 1, follows the rotation to 2
    assert Metadata.from_file(str(tmp_path / "device" / "meta" / "root.json")).signed.version == 2

    code, out, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "targets", "--json")
    assert code == 0, err  # a release key rotation leaves the director root alone
    assert httpx.get(f"{server.url}/tuf/image/keys", headers=h).json()["director_root_version"] == 2


def test_a_root_rotation_whose_director_root_upload_fails_is_finished_by_keys_init_server(
    capsys: Any, tmp_path: Path, server: Server
) -> None:
    keys = tmp_path / "keys"
    assert run_cli(capsys, "keys", "init", "--keys", keys, "--server", server.url)[0] == 0
    proxy = _LosesAnswers(server.url, "/tuf/director/root", forward=False)
    try:
        code, _, err = run_cli(capsys, "keys", "rotate", "--keys", keys, "--role", "root", "--server", proxy.url)
    finally:
        proxy.close()
    assert_one_line_error(code, err, "director root 2 is not published", "keys init --keys")
    assert proxy.dropped == 1
    h = {"Authorization": f"Bearer {os.environ['EDGEFLEET_TOKEN']}"}
    assert httpx.get(f"{server.url}/tuf/image/keys", headers=h).json()["director_root_version"] == 1
    assert (keys / "director" / "2.root.json").is_file()  # signed while the old root keys existed, kept

    code, _, err = run_cli(capsys, "keys", "init", "--keys", keys, "--server", server.url, "--json")
    assert code == 0, err
    r = httpx.get(f"{server.url}/tuf/director/any/2.root.json", headers=h)
    assert r.status_code == 200 and r.content == (keys / "director" / "2.root.json").read_bytes()
