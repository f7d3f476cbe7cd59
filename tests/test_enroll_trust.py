"""Trust at enrollment, against a real `edgefleet server run` process (SQLite): `agent enroll` with a
pinned token writes both TUF roots (and stock ngclient refreshes both repositories from the seeded
metadata folders); every wrong root is one clear refusal that leaves no identity behind: a wrong
fingerprint, a server serving another root than the operator's file, a director root not signed by the
image root's keys, a malformed pin or none; the server refuses enrollment (409, token not used up)
until the roots exist; `agent trust` gives a device enrolled before this issue its roots."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support import assert_one_line_error, free_port, run_cli, wait_until
from cryptography.hazmat.primitives import serialization
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from edgefleet.agent.updater.bootstrap import (
    DIRECTOR_ROOT_FILE,
    IMAGE_ROOT_FILE,
    check_director_root,
    check_root_file,
    fetch_director_root,
    install_roots,
)
from edgefleet.server.settings import Settings
from edgefleet.server.state import init_server
from edgefleet.tufmeta import TrustError, canonical_bytes, fingerprint
from edgefleet.tufmeta.keyring import Keyring
from edgefleet.tufmeta.pin import pin_token

# tests/server/_fleet.py under a name of its own (other test folders have a `_fleet` too)
_spec = importlib.util.spec_from_file_location("server_fleet_helpers", Path(__file__).parent / "server" / "_fleet.py")
assert _spec is not None and _spec.loader is not None
fleet_helpers = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(fleet_helpers)
Server, publish_roots, pinned = fleet_helpers.Server, fleet_helpers.publish_roots, fleet_helpers.pinned


class Live:
    """A server process, its operator client, and the keyring that published its roots (if any)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        data = tmp / "data"
        admin = init_server(Settings(data_dir=data, db_url=f"sqlite:///{tmp / 'fleet.db'}"))
        self.srv = Server(data, f"sqlite:///{tmp / 'fleet.db'}")
        self.srv.start()
        self.h = {"Authorization": f"Bearer {admin}"}
        self.admin = httpx.Client(base_url=self.srv.url, headers=self.h, timeout=30)
        self.ring: Keyring | None = None

    def token(self, max_uses: int = 1) -> str:
        r = self.admin.post("/api/v1/enrollment-tokens", json={"tags": ["lab"], "max_uses": max_uses})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def pinned_token(self) -> str:
        return str(pinned(self.ring, self.token()))

    def enroll(self, capsys: Any, state: Path, token: str, *extra: str | Path) -> tuple[int, str, str]:
        return run_cli(capsys, "agent", "enroll", "--server", self.srv.url, "--token", token, "--state-dir", state,
                       "--allow-http", *extra)

    def close(self) -> None:
        self.admin.close()
        self.srv.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A server whose image and director roots were published by one operator keyring."""
    f = Live(tmp_path_factory.mktemp("live"))
    try:
        f.ring = publish_roots(f.admin, f.h, f.tmp / "keys")
        yield f
    finally:
        f.close()


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Live]:
    """A server with no roots yet."""
    f = Live(tmp_path / "bare")
    try:
        yield f
    finally:
        f.close()


def _other_ring(tmp: Path, live: Live) -> Keyring:
    """Another operator's keyring (other root keys) naming the same server's online keys."""
    ring = Keyring.create(tmp, 1, 1)
    assert live.ring is not None
    ring.online = live.ring.online
    ring.save()
    ring.save_root(ring.sign_root(ring.build_root(datetime.now(UTC)), ring.roles["root"]))
    return ring


def _nothing_written(state: Path) -> None:
    assert not state.exists(), sorted(str(p) for p in state.rglob("*"))


class BearerFetcher(FetcherInterface):
    """ngclient's one-method fetcher over httpx with the device's access token."""

    def __init__(self, client: httpx.Client, token: str) -> None:
        self.client, self.token = client, token

    def _fetch(self, url: str) -> Iterator[bytes]:
        r = self.client.get(url, headers={"Authorization": f"Bearer {self.token}"})
        if r.status_code != 200:
            raise DownloadHTTPError(f"{url}: HTTP {r.status_code}", r.status_code)
        return iter([r.content])


def _device_token(live: Live, state: Path) -> str:
    """An access token for the enrolled device in ``state``, signed with the key enrollment left there."""
    ident = json.loads((state / "identity" / "identity.json").read_text())
    key = serialization.load_pem_private_key(Path(ident["key"]).read_bytes(), password=None)
    device = fleet_helpers.SimDevice(live.admin, ident["device_id"], key, "", "")
    with httpx.Client(base_url=live.srv.url, timeout=30) as c:
        device.client = c
        return str(device.authenticate())


# ------------------------------------------------------------------------------------ the good path


def test_enrolling_with_a_pinned_token_writes_both_roots_and_ngclient_refreshes_from_them(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert live.ring is not None
    state = tmp_path / "state"
    old = os.umask(0)
    try:
        code, out, err = live.enroll(capsys, state, live.pinned_token(), "--json")
    finally:
        os.umask(old)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["image_root"] == {"version": 1, "fingerprint": live.ring.fingerprint()}
    assert shown["director_root"] == {"version": 1}
    identity = state / "identity"
    image, director = (identity / IMAGE_ROOT_FILE).read_bytes(), (identity / DIRECTOR_ROOT_FILE).read_bytes()
    assert hashlib.sha256(image).hexdigest() == live.ring.fingerprint()
    assert image == live.ring.root_file(1).read_bytes()
    assert director == live.ring.director_root_file(1).read_bytes()
    assert (state / "tuf" / "image" / "root.json").read_bytes() == image
    assert (state / "tuf" / "director" / "root.json").read_bytes() == director
    assert stat.S_IMODE(identity.stat().st_mode) == 0o700
    for f in identity.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    # the seeded folders are what stock ngclient trusts (bootstrap=None: "root.json in metadata_dir")
    ident = json.loads((identity / "identity.json").read_text())
    token = _device_token(live, state)
    with httpx.Client(timeout=30) as c:
        for repo, base in (("image", "/tuf/image/"), ("director", f"/tuf/director/{ident['device_id']}/")):
            updater = Updater(str(state / "tuf" / repo), live.srv.url + base, str(tmp_path / "t"),
                              live.srv.url + "/tuf/image/targets/", BearerFetcher(c, token), bootstrap=None)
            updater.refresh()
    assert Metadata.from_file(str(state / "tuf" / "director" / "timestamp.json")).signed.version >= 1


def test_an_unpinned_token_with_the_operators_root_file_enrolls_and_a_mismatching_pin_is_refused(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert live.ring is not None
    root_file = live.ring.root_file(1)
    other = _other_ring(tmp_path / "other-keys", live)
    token = live.token()
    code, _, err = live.enroll(capsys, tmp_path / "a", pin_token(token, 1, str(other.fingerprint())),
                               "--image-root", root_file)
    assert_one_line_error(code, err, "--image-root", str(root_file), "the token pins root 1")
    _nothing_written(tmp_path / "a")

    code, out, err = live.enroll(capsys, tmp_path / "b", token, "--image-root", root_file, "--json")
    assert code == 0, err
    assert json.loads(out)["image_root"]["fingerprint"] == fingerprint(root_file.read_bytes())
    assert (tmp_path / "b" / "identity" / IMAGE_ROOT_FILE).read_bytes() == root_file.read_bytes()


# ------------------------------------------------------------------------------------ refusals


def test_a_wrong_fingerprint_is_refused_and_leaves_no_identity(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = pin_token(live.token(), 1, "ab" * 32)
    code, _, err = live.enroll(capsys, tmp_path / "state", token)
    assert_one_line_error(code, err, "fingerprint", "ab" * 32, "not the pinned", "nothing was written")
    _nothing_written(tmp_path / "state")

    code, _, err = live.enroll(capsys, tmp_path / "state", pin_token(live.token(), 7, "ab" * 32))
    assert_one_line_error(code, err, "no image root 7")
    _nothing_written(tmp_path / "state")


def test_a_server_serving_another_root_than_the_operators_file_is_refused(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The operator's root file is from keys the server never saw: its root 1 is someone else's."""
    other = _other_ring(tmp_path / "operator-keys", live)
    code, _, err = live.enroll(capsys, tmp_path / "state", live.token(), "--image-root", other.root_file(1))
    assert_one_line_error(code, err, "/tuf/image/1.root.json", "fingerprint", str(other.fingerprint()))
    _nothing_written(tmp_path / "state")


def test_a_root_file_not_signed_by_its_own_keys_is_refused_before_anything_is_sent(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert live.ring is not None
    md = live.ring.root(1)
    assert md is not None
    md.signatures.clear()
    unsigned = tmp_path / "unsigned.root.json"
    unsigned.write_bytes(canonical_bytes(md))
    token = live.token()
    code, _, err = live.enroll(capsys, tmp_path / "state", token, "--image-root", unsigned)
    assert_one_line_error(code, err, str(unsigned), "signatures", "signed by 0 of its own root keys")
    _nothing_written(tmp_path / "state")
    assert live.enroll(capsys, tmp_path / "ok", token, "--image-root", live.ring.root_file(1))[0] == 0  # unused


@pytest.mark.parametrize("token_tail, needle", [
    (".1.nothex", "malformed root pin"),
    (".0." + "a" * 64, "malformed root pin"),
    ("", "carries no image root pin"),
])
def test_a_malformed_pin_or_none_is_refused_before_anything_is_sent(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str], token_tail: str, needle: str
) -> None:
    token = live.token()  # one use: still there afterwards, so the server never saw it
    code, _, err = live.enroll(capsys, tmp_path / "state", token + token_tail)
    assert_one_line_error(code, err, "token", needle)
    _nothing_written(tmp_path / "state")
    assert live.enroll(capsys, tmp_path / "ok", pinned(live.ring, token))[0] == 0


def test_enrollment_before_the_roots_exist_is_a_409_and_a_director_root_of_other_keys_is_refused(
    bare: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = bare.token(max_uses=2)
    r = bare.admin.post("/api/v1/enroll", json={"token": token, "csr": fleet_helpers.csr_pem(fleet_helpers.new_key())})
    assert r.status_code == 409 and r.json()["field"] == "tuf", r.text
    assert "keys init --server" in r.json()["error"]
    code, _, err = bare.enroll(capsys, tmp_path / "state", pin_token(token, 1, "ab" * 32))
    assert_one_line_error(code, err, "409", "no image root yet", "keys init --server URL")
    _nothing_written(tmp_path / "state")

    # image root by the operator's keys, the director root by other keys (the server accepts it: it is
    # self-signed and names the server's online keys); the token is not used up by the 409s
    info = bare.admin.get("/tuf/image/keys").json()
    rings = []
    for name in ("operator", "intruder"):
        ring = Keyring.create(tmp_path / name, 1, 1)
        ring.online = info["keys"]
        ring.save()
        rings.append(ring)
    operator, intruder = rings
    now = datetime.now(UTC)
    image = operator.sign_root(operator.build_root(now), operator.roles["root"])
    operator.save_root(image)
    director = intruder.sign_root(intruder.build_director_root(now), intruder.roles["root"])
    for path, md in (("/tuf/image/root", image), ("/tuf/director/root", director)):
        assert bare.admin.put(path, content=canonical_bytes(md)).status_code == 200
    code, _, err = bare.enroll(capsys, tmp_path / "state", pinned(operator, token))
    assert_one_line_error(code, err, "director", "signatures", "signed by 0 of image root 1's root keys",
                          "nothing was written")
    _nothing_written(tmp_path / "state")


# ------------------------------------------------------------------------------------ the pure checks


def test_a_director_root_signed_by_the_image_root_keys_but_naming_other_root_keys_is_refused(tmp_path: Path) -> None:
    a, b = Keyring.create(tmp_path / "a", 1, 1), Keyring.create(tmp_path / "b", 1, 1)
    online = Keyring.create(tmp_path / "online", 3, 1)  # stands in for the server's three online keys
    keys = [online.keys[k] for k in online.roles["root"]]
    for ring in (a, b):
        ring.online = {role: {"keyid": kid, **k} for role, kid, k in zip(
            ("snapshot", "timestamp", "director-targets"), online.roles["root"], keys, strict=True)}
    now = datetime.now(UTC)
    image = a.sign_root(a.build_root(now), a.roles["root"])
    assert check_root_file(canonical_bytes(image), "image").signed.version == 1
    good = a.sign_root(a.build_director_root(now), a.roles["root"])
    assert check_director_root(canonical_bytes(good), image).signed.version == 1
    wrong = b.build_director_root(now)  # b's root keys ...
    with pytest.raises(TrustError) as e:
        check_director_root(canonical_bytes(a.sign_root(wrong, a.roles["root"])), image)  # ... signed by a's
    assert e.value.field == "signed.roles.root" and "names root keys" in str(e.value)

    # after a root rotation the newest director root of the image root's keys is the one taken
    rotated = a.build_director_root(now, wrong)  # version 2: a's root keys, signed by the old and the new
    both = a.sign_root(rotated, a.roles["root"])
    both.sign(b.signer(b.roles["root"][0]), append=True)
    served = {1: canonical_bytes(b.sign_root(wrong, b.roles["root"])), 2: canonical_bytes(both)}
    got = fetch_director_root(lambda p: served.get(int(p.rsplit("/", 1)[1].split(".")[0])), "dev-1", image)
    assert Metadata[Root].from_bytes(got).signed.version == 2
    with pytest.raises(TrustError, match="no director root yet"):
        fetch_director_root(lambda p: None, "dev-1", image)


def test_install_roots_replaces_metadata_trusted_under_an_earlier_identity(tmp_path: Path) -> None:
    old = tmp_path / "tuf" / "image"
    (old / "root_history").mkdir(parents=True)
    (old / "timestamp.json").write_text("{}")
    install_roots(tmp_path, b"image", b"director")
    assert sorted(p.name for p in old.iterdir()) == ["root.json"]
    assert (tmp_path / "identity" / IMAGE_ROOT_FILE).read_bytes() == b"image"
    assert (tmp_path / "tuf" / "director" / "root.json").read_bytes() == b"director"


# ------------------------------------------------------------------------------------ agent trust


def test_agent_trust_gives_a_device_enrolled_before_roots_its_roots_with_its_existing_key(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert live.ring is not None
    state = tmp_path / "state"
    assert live.enroll(capsys, state, live.pinned_token())[0] == 0
    identity = state / "identity"
    before = {p.name: p.read_bytes() for p in identity.iterdir() if p.suffix != ".json" or p.name == "identity.json"}
    for name in (IMAGE_ROOT_FILE, DIRECTOR_ROOT_FILE):
        (identity / name).unlink()  # as a device enrolled before this issue
    for repo in ("image", "director"):
        (state / "tuf" / repo / "root.json").unlink()

    pin = f"1.{live.ring.fingerprint()}"
    code, _, err = run_cli(capsys, "agent", "trust", "--state-dir", state, "--pin", "1.nothex", "--allow-http")
    assert_one_line_error(code, err, "--pin", "N.SHA256")
    code, _, err = run_cli(capsys, "agent", "trust", "--state-dir", state, "--pin", f"1.{'ab' * 32}", "--allow-http")
    assert_one_line_error(code, err, "fingerprint", "not the pinned")
    assert not (identity / IMAGE_ROOT_FILE).exists()

    code, out, err = run_cli(capsys, "agent", "trust", "--state-dir", state, "--pin", pin, "--allow-http", "--json")
    assert code == 0, err
    assert json.loads(out)["image_root"] == {"version": 1, "fingerprint": live.ring.fingerprint()}
    assert (identity / IMAGE_ROOT_FILE).read_bytes() == live.ring.root_file(1).read_bytes()
    assert (state / "tuf" / "director" / "root.json").read_bytes() == live.ring.director_root_file(1).read_bytes()
    assert {n: (identity / n).read_bytes() for n in before} == before  # key, certificate, identity untouched

    code, _, err = run_cli(capsys, "agent", "trust", "--state-dir", state, "--image-root", live.ring.root_file(1),
                           "--allow-http")
    assert_one_line_error(code, err, "already has its trust roots", "--force")
    code, _, err = run_cli(capsys, "agent", "trust", "--state-dir", tmp_path / "nobody", "--pin", pin)
    assert_one_line_error(code, err, "not enrolled")


def test_enroll_and_trust_over_https_verify_the_server_with_the_fleet_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    admin = init_server(Settings(data_dir=data))
    code, out, err = run_cli(capsys, "server", "tls", "--data", data, "--hostname", "127.0.0.1", "--json")
    assert code == 0, err
    issued = json.loads(out)
    port = free_port()
    env = {**os.environ, "EDGEFLEET_SERVER_TLS_CERTFILE": issued["tls_certfile"],
           "EDGEFLEET_SERVER_TLS_KEYFILE": issued["tls_keyfile"]}
    proc = subprocess.Popen([sys.executable, "-c", "from edgefleet.cli.main import main; main()", "server", "run",
                             "--data", str(data), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url, ca = f"https://127.0.0.1:{port}", data / "ca" / "ca.crt"
    try:
        with httpx.Client(base_url=url, verify=ssl.create_default_context(cafile=str(ca)), timeout=30,
                          headers={"Authorization": f"Bearer {admin}"}) as c:

            def up() -> bool:
                assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
                try:
                    return c.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    return False

            assert wait_until(up, 30), "the server did not answer over TLS"
            ring = publish_roots(c, {}, tmp_path / "keys")
            r = c.post("/api/v1/enrollment-tokens", json={})
            assert r.status_code == 201, r.text
            token = pinned(ring, r.json()["token"])
        state = tmp_path / "state"
        code, _, err = run_cli(capsys, "agent", "enroll", "--server", url, "--token", token, "--state-dir", state)
        assert_one_line_error(code, err, "--server", "CERTIFICATE_VERIFY_FAILED")  # system CAs: not ours
        _nothing_written(state)
        code, _, err = run_cli(capsys, "agent", "enroll", "--server", url, "--token", token, "--state-dir", state,
                               "--ca", ca)
        assert code == 0, err
        for name in (IMAGE_ROOT_FILE, DIRECTOR_ROOT_FILE):
            (state / "identity" / name).unlink()
        code, _, err = run_cli(capsys, "agent", "trust", "--state-dir", state, "--image-root", ring.root_file(1))
        assert code == 0, err  # verified with the identity's fleet CA
        assert (state / "identity" / IMAGE_ROOT_FILE).read_bytes() == ring.root_file(1).read_bytes()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_server_verifies_renewals_with_the_shared_renewal_message() -> None:
    from edgefleet.renewal import renewal_message
    from edgefleet.server.api import identity

    assert identity.renewal_message is renewal_message and "renewal_message" in identity.__all__
