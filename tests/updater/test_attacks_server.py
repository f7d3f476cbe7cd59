"""Attacks by someone who holds the fleet server's whole data directory: its database, its blobs and its
online TUF keys (snapshot, timestamp, director-targets), never the operator's release or root keys.

Each attack writes the server's SQLite rows directly and re-signs whatever the online keys can sign so
the result looks consistent to a naive client (see ``_attacker.py``); a real agent process, under load
all along, must refuse it, report the refusal with its reason, and keep serving the version it had
(no failed inference, no other version answering). Attacks that poison the shared image repository
get a fleet of their own; those that touch only one device's director share a module fleet, one
device each.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import secrets
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]
from updater._attacker import Attacker
from updater._fleet import Agent, Fleet, Load

from edgefleet.agent.updater.status import describe
from edgefleet.agent.updater.trust import trust_summary
from edgefleet.bundle import read_manifest
from edgefleet.tufmeta import expiry_from
from edgefleet.tufmeta.keyfiles import new_signer, read_signer

# max_metadata_age 1 s: the device re-verifies both repositories at every check-in, so an attack on the
# image repository alone (which moves no check-in ETag) is seen within a second.
FAST = {"checkin_interval": 0.5, "max_metadata_age": 1.0, "probation_inferences": 20, "probation_seconds": 1.0}
MODEL = "digits"
MakeBundle = Callable[[str, str], Path]
# What the device must never have done for a target it refuses before download, then after it.
BEFORE_DOWNLOAD = ("update.started", "download.ok")
AFTER_DOWNLOAD = ("install.ok", "selftest.ok", "switch.ok", "probation.ok", "update.committed")


# helpers ---------------------------------------------------------------------------------------------


def trusted_version(agent: Agent, repo: str, role: str) -> int | None:
    """The version of ``role`` the device verified and keeps in ``STATE/tuf/REPO/`` (None: none yet)."""
    info = trust_summary(agent.state_dir)[repo][role]
    return None if info is None else int(info["version"])


def wait_trusts_newest(fleet: Fleet, agent: Agent, attacker: Attacker) -> int:
    """Wait until the device verified the newest image targets the server holds; returns its version."""
    newest = attacker.latest_version(Targets.type)
    fleet.wait_for(lambda: trusted_version(agent, "image", Targets.type) == newest, 30,
                   f"the device trusting image targets {newest}")
    return newest


@contextlib.contextmanager
def keeps_serving(agent: Agent, version: str) -> Iterator[Load]:
    """Inferences under load around the attack: before it, answered; after the block (the refusal),
    answered again; none failed and only ``version`` ever answered."""
    with agent.load(rate=40) as load:
        load.wait_answers(5, version=version)
        yield load
        load.wait_answers(10, after=time.monotonic())
    assert not load.failures(), load.failures()[:3]
    assert set(load.versions()) == {version}, load.versions()
    assert agent.served_version() == version


def never_installed(fleet: Fleet, agent: Agent, version: str, started: bool = False) -> None:
    """Nothing of ``MODEL-VERSION`` is installed or staged; unless ``started``, the device never even
    began the update (refused before any download)."""
    assert agent.device_id is not None
    target = f"{MODEL}-{version}.efb"
    kinds = [e["kind"] for e in fleet.events(agent.device_id) if e.get("target") == target]
    forbidden = AFTER_DOWNLOAD if started else BEFORE_DOWNLOAD + AFTER_DOWNLOAD
    assert not set(kinds) & set(forbidden), kinds
    assert not (agent.state_dir / "models" / MODEL / version).exists()
    staging = agent.state_dir / "staging"
    assert not staging.is_dir() or not any(staging.iterdir()), list(staging.iterdir())
    assert describe(agent.state_dir)["running"].get(MODEL, {}).get("version") != version


def wait_new_event(fleet: Fleet, device_id: str, after_seq: int, kind: str, **match: str) -> dict[str, Any]:
    """The first event of ``kind`` with fields ``match`` and a seq above ``after_seq`` (a reason the
    device reported before may come again after another one)."""
    def found() -> dict[str, Any] | None:
        return next((e for e in fleet.events(device_id) if e["kind"] == kind and (e["seq"] or 0) > after_seq
                     and all(e.get(k) == v for k, v in match.items())), None)

    event: dict[str, Any] = fleet.wait_for(found, 60, f"event {kind} {match} after seq {after_seq}")
    return event


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def traversal_bundle(source: Path, out: Path, names: Sequence[str]) -> Path:
    """``source``'s members behind tar members named ``names`` (``../../x``, ``/abs/x``), first in the
    archive, as a naive extractor would write them before anything else."""
    with tarfile.open(source) as src, tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as dst:
        for name in names:
            data = b"written outside the bundle folder\n"
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            dst.addfile(info, io.BytesIO(data))
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
    return out


# fleets ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, update_models: dict[str, Path],
           make_bundle: MakeBundle) -> Iterator[Fleet]:
    """One fleet for the attacks on a device's director (each test enrolls its own device): the operator
    pushed and signed 1.0.0, 2.0.0, 3.1.0 and 3.2.0, then withdrew 1.0.0."""
    f = Fleet(tmp_path_factory.mktemp("attacks-director") / "fleet")
    try:
        f.start()
        for bundle in (update_models["good"], update_models["good2"], make_bundle("good", "3.1.0"),
                       make_bundle("good", "3.2.0")):
            f.push(bundle)
        f.withdraw(MODEL, "1.0.0")
        yield f
    finally:
        f.close()


@pytest.fixture
def fleet_2_of_3(tmp_path: Path) -> Iterator[Fleet]:
    """A fleet whose operator keyring has 3 root keys, any 2 of which must sign a new root."""
    f = Fleet(tmp_path / "fleet")
    try:
        f.server.init()
        f.server.start()
        f.cli("keys", "init", "--keys", f.keys, "--root-keys", "3", "--root-threshold", "2",
              "--server", f.server.url)
        yield f
    finally:
        f.close()


# 1. forged image targets ------------------------------------------------------------------------------


def test_a_bundle_in_image_targets_signed_by_the_servers_online_keys_not_the_release_key_is_refused(
    fleet: Fleet, update_models: dict[str, Path], make_bundle: MakeBundle
) -> None:
    fleet.push(update_models["good"])
    agent = fleet.agent(update_models["good"], updates=FAST)
    assert agent.device_id is not None
    evil: Path = make_bundle("good", "9.0.0")  # a working model no operator signed
    with Attacker(fleet.server.data) as attacker, keeps_serving(agent, "1.0.0"):
        trusted = wait_trusts_newest(fleet, agent, attacker)
        attacker.add_bundle(evil)
        forged = attacker.sign_targets(add=[evil])  # snapshot + timestamp + director-targets keys
        attacker.republish(forged)
        attacker.assign(agent.device_id, MODEL, "9.0.0")
        event = fleet.wait_event(agent.device_id, "metadata.refused", reason="metadata_invalid")
    assert "image metadata: UnsignedMetadataError: targets" in event["detail"], event  # 0 of 1 release keys
    never_installed(fleet, agent, "9.0.0")
    assert trusted_version(agent, "image", Targets.type) == trusted  # the forged targets were not kept


# 2. a withdrawn version through the director ----------------------------------------------------------


def test_a_withdrawn_version_assigned_through_the_director_is_refused_as_not_in_image(
    shared: Fleet, update_models: dict[str, Path]
) -> None:
    agent = shared.agent(update_models["good2"], updates=FAST)
    assert agent.device_id is not None
    try:
        with Attacker(shared.server.data) as attacker, keeps_serving(agent, "2.0.0"):
            attacker.assign(agent.device_id, MODEL, "1.0.0")  # the director key signs it
            shared.wait_event(agent.device_id, "update.refused", reason="not_in_image",
                              target=f"{MODEL}-1.0.0.efb")
        never_installed(shared, agent, "1.0.0")
        refused = describe(agent.state_dir)["refused"]
        assert [r["reason"] for r in refused.values()] == ["not_in_image"], refused
    finally:
        agent.close()


# 3. the director and the image repository disagree ----------------------------------------------------


def test_an_assigned_registry_bundle_that_no_image_targets_list_is_refused_as_not_in_image(
    shared: Fleet, update_models: dict[str, Path], make_bundle: MakeBundle
) -> None:
    agent = shared.agent(update_models["good2"], updates=FAST)
    assert agent.device_id is not None
    evil: Path = make_bundle("errors_in_probation", "4.0.0")
    try:
        with Attacker(shared.server.data) as attacker, keeps_serving(agent, "2.0.0"):
            attacker.add_bundle(evil)  # in the registry and the blob store, never signed
            attacker.assign(agent.device_id, MODEL, "4.0.0")
            shared.wait_event(agent.device_id, "update.refused", reason="not_in_image",
                              target=f"{MODEL}-4.0.0.efb")
        never_installed(shared, agent, "4.0.0")
    finally:
        agent.close()


def test_director_targets_with_other_hashes_or_length_than_the_image_lists_are_refused_as_a_mismatch(
    shared: Fleet, update_models: dict[str, Path], make_bundle: MakeBundle
) -> None:
    """The attacker rewrites the registry rows director targets are signed from: 3.1.0 becomes the sha256
    and length of a malicious bundle it stored, 3.2.0 a longer file with the genuine sha256."""
    agent = shared.agent(update_models["good2"], updates=FAST)
    assert agent.device_id is not None
    evil: Path = make_bundle("errors_in_probation", "3.1.0")  # passes the self-test, then fails in probation
    with Attacker(shared.server.data) as attacker:
        genuine = {v: attacker.registry_row(MODEL, v) for v in ("3.1.0", "3.2.0")}
        try:
            with keeps_serving(agent, "2.0.0"):
                attacker.tamper_registry(MODEL, "3.1.0", sha256=attacker.place_blob(evil), size=evil.stat().st_size)
                attacker.assign(agent.device_id, MODEL, "3.1.0")
                e1 = shared.wait_event(agent.device_id, "update.refused", reason="director_image_mismatch",
                                       target=f"{MODEL}-3.1.0.efb")
                sha, size = genuine["3.2.0"]
                attacker.tamper_registry(MODEL, "3.2.0", size=size + 1000)
                attacker.assign(agent.device_id, MODEL, "3.2.0")
                e2 = shared.wait_event(agent.device_id, "update.refused", reason="director_image_mismatch",
                                       target=f"{MODEL}-3.2.0.efb")
            assert sha256(evil.read_bytes()) in e1["detail"] and str(size + 1000) in e2["detail"], (e1, e2)
            never_installed(shared, agent, "3.1.0")
            never_installed(shared, agent, "3.2.0")
        finally:  # the other tests of this fleet sign image targets, which the registry must match
            agent.close()
            shared.unassign(agent.device_id, MODEL)
            for version, (sha, size) in genuine.items():
                attacker.tamper_registry(MODEL, version, sha256=sha, size=size)


# 4. image targets rolled back -------------------------------------------------------------------------


def test_image_targets_rolled_back_to_before_a_withdrawal_are_refused_as_a_rollback(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    """The operator withdrew 1.0.0; the attacker deletes those targets, signs a snapshot naming the
    previous ones (which still list 1.0.0) and assigns 1.0.0."""
    fleet.push(update_models["good"])
    fleet.push(update_models["good2"])
    fleet.withdraw(MODEL, "1.0.0")
    agent = fleet.agent(update_models["good2"], updates=FAST)
    assert agent.device_id is not None
    with Attacker(fleet.server.data) as attacker, keeps_serving(agent, "2.0.0"):
        newest = wait_trusts_newest(fleet, agent, attacker)
        attacker.delete(Targets.type, [newest])
        attacker.republish(newest - 1)
        served = fleet.http.get("/tuf/image/timestamp.json").json()["signed"]["meta"]["snapshot.json"]["version"]
        snapshot = fleet.http.get(f"/tuf/image/{served}.snapshot.json").json()["signed"]
        assert snapshot["meta"]["targets.json"]["version"] == newest - 1  # what a naive client now gets
        attacker.assign(agent.device_id, MODEL, "1.0.0")
        fleet.wait_event(agent.device_id, "metadata.refused", reason="metadata_rollback")
    never_installed(fleet, agent, "1.0.0")
    assert trusted_version(agent, "image", Targets.type) == newest


# 5. snapshot and targets mixed and matched ------------------------------------------------------------


def test_a_snapshot_that_does_not_match_the_targets_served_is_refused(
    fleet: Fleet, update_models: dict[str, Path]
) -> None:
    """Three mix-and-match snapshots, each signed by the online snapshot key with a timestamp naming it:
    one naming the previous targets while the newest are still served (metadata_rollback); one naming
    the newest targets with the sha256 of another file (metadata_invalid); and older, genuinely signed
    targets served as a new version, named with their very length and sha256 (the bytes verify, the
    version inside does not: metadata_rollback)."""
    fleet.push(update_models["good"])
    fleet.push(update_models["good2"])
    agent = fleet.agent(update_models["good"], updates=FAST)
    assert agent.device_id is not None
    device = agent.device_id
    with Attacker(fleet.server.data) as attacker, keeps_serving(agent, "1.0.0"):
        newest = wait_trusts_newest(fleet, agent, attacker)
        current, older = attacker.raw(Targets.type, newest), attacker.raw(Targets.type, newest - 1)

        attacker.republish(newest - 1)
        e1 = wait_new_event(fleet, device, 0, "metadata.refused", reason="metadata_rollback")

        attacker.republish(newest, length=len(current), hashes={"sha256": sha256(older)})
        e2 = wait_new_event(fleet, device, e1["seq"], "metadata.refused", reason="metadata_invalid")

        expires = Metadata.from_bytes(older).signed.expires
        attacker.store_raw(Targets.type, newest + 1, older, expires)  # {newest+1}.targets.json: old bytes
        attacker.republish(newest + 1, length=len(older), hashes={"sha256": sha256(older)})
        e3 = wait_new_event(fleet, device, e2["seq"], "metadata.refused", reason="metadata_rollback")
    assert "targets.json version" in e1["detail"], e1
    assert "LengthOrHashMismatchError" in e2["detail"], e2
    assert f"Expected targets v{newest + 1}, got v{newest - 1}" in e3["detail"], e3
    assert not [e for e in fleet.events(device) if e["kind"] == "metadata.ok"]  # never accepted in between
    assert trusted_version(agent, "image", Targets.type) == newest


# 6. path traversal in an operator-signed bundle -------------------------------------------------------


def test_a_bundle_with_path_traversal_signed_by_the_operator_is_refused_and_writes_nothing_outside(
    shared: Fleet, update_models: dict[str, Path], make_bundle: MakeBundle, tmp_path: Path
) -> None:
    agent = shared.agent(update_models["good2"], updates=FAST)
    assert agent.device_id is not None
    token = secrets.token_hex(4)
    relative, absolute = f"../../../../evil-{token}", Path(f"/tmp/ef-evil-{token}")
    source: Path = make_bundle("good", "6.6.6")
    evil = traversal_bundle(source, tmp_path / source.name, [relative, str(absolute)])
    r = shared.http.post("/api/v1/models", content=evil.read_bytes(),
                         headers={"content-type": "application/octet-stream"})
    assert r.status_code == 422 and "escapes" in r.text, r.text  # the registry refuses such an upload...
    try:
        with Attacker(shared.server.data) as attacker, keeps_serving(agent, "2.0.0"):
            # ...so the attacker puts it in, and the operator's release key signs it: only the device is left
            attacker.add_bundle(evil, manifest=read_manifest(source).model_dump(mode="json"))
            shared.sign_targets(add=[evil])
            shared.assign(agent.device_id, MODEL, "6.6.6")
            event = shared.wait_event(agent.device_id, "update.refused", reason="bad_bundle",
                                      target=f"{MODEL}-6.6.6.efb")
        assert "escapes the bundle folder" in event["detail"], event
        never_installed(shared, agent, "6.6.6", started=True)
        state = agent.state_dir
        for base in (state / "models" / MODEL / "6.6.6", state / "staging", state, agent.root, Path.cwd()):
            assert not Path(os.path.normpath(base / relative)).exists(), base / relative
        assert not absolute.exists()
        assert not [p for p in agent.root.rglob(f"*evil-{token}*")]
    finally:
        agent.close()


# 7. a root rotation below the threshold ---------------------------------------------------------------


def test_a_root_rotation_signed_by_fewer_old_root_keys_than_the_threshold_is_refused_and_root_1_stays(
    fleet_2_of_3: Fleet, update_models: dict[str, Path], make_bundle: MakeBundle
) -> None:
    """Root 1 wants 2 of its 3 root keys. The attacker stole one root key file: root 2 is signed by it and
    two new keys of its own (a threshold of root 2's keys), and names its own release key, with which
    it signs targets listing its bundle."""
    fleet = fleet_2_of_3
    fleet.push(update_models["good"])
    agent = fleet.agent(update_models["good"], updates=FAST)
    assert agent.device_id is not None
    evil: Path = make_bundle("good", "9.0.0")
    with Attacker(fleet.server.data) as attacker, keeps_serving(agent, "1.0.0"):
        wait_trusts_newest(fleet, agent, attacker)
        root1: Root = attacker.metadata(Root.type, 1).signed
        assert root1.roles[Root.type].threshold == 2 and len(root1.roles[Root.type].keyids) == 3
        stolen_id = root1.roles[Root.type].keyids[0]
        stolen = read_signer(fleet.keys / "private" / f"{stolen_id}.key")
        root2 = copy.deepcopy(root1)
        root2.version, root2.expires = 2, expiry_from(datetime.now(UTC), Root.type)
        for keyid in [k for k in root1.roles[Root.type].keyids if k != stolen_id]:
            root2.revoke_key(keyid, Root.type)
        new_root, release = [new_signer(), new_signer()], new_signer()
        for s in new_root:
            root2.add_key(s.public_key, Root.type)
        for keyid in list(root1.roles[Targets.type].keyids):
            root2.revoke_key(keyid, Targets.type)
        root2.add_key(release.public_key, Targets.type)
        md = Metadata(root2)
        for s in (stolen, *new_root):
            md.sign(s, append=True)
        root2.verify_delegate(Root.type, md.signed_bytes, md.signatures)  # a threshold of its own keys...
        with pytest.raises(UnsignedMetadataError):
            root1.verify_delegate(Root.type, md.signed_bytes, md.signatures)  # ...but 1 of root 1's 2
        attacker.store(md)
        attacker.add_bundle(evil)
        attacker.republish(attacker.sign_targets(add=[evil], signers=[release]))
        attacker.assign(agent.device_id, MODEL, "9.0.0")
        event = fleet.wait_event(agent.device_id, "metadata.refused", reason="metadata_invalid")
    assert "image metadata: UnsignedMetadataError: root" in event["detail"], event  # 1 of 2 old root keys
    never_installed(fleet, agent, "9.0.0")
    assert trusted_version(agent, "image", Root.type) == 1
    assert Metadata.from_bytes((agent.state_dir / "tuf" / "image" / "root.json").read_bytes()).signed.version == 1
