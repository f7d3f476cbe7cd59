"""``edgefleet keys init|show|rotate --keys DIR``: the operator's offline TUF keys and the image root.

``init`` makes the root keys (``--root-keys M``, threshold ``--root-threshold N``) and the release
(targets) key as private files (0600, folder 0700, whatever the umask) that are never sent anywhere;
with ``--server URL`` it fetches the server's online public keys and publishes the image repository's
root 1 (signed by the root keys) and an empty targets 1 (signed by the release key), and the director
root 1 (signed by the root keys, naming the server's online director-targets, snapshot and timestamp
keys; one for every device). ``show`` prints key
ids, roles, thresholds, the root's fingerprint and expiries. ``rotate --role root|targets`` makes new
keys and a new root signed by the old AND the new root keys, publishes it, and (for targets) re-signs
the current targets with the new release key. Every failure is one ``error: ...`` line.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.cli.fleet import ApiClientError, _client, _result, _send
from edgefleet.errors import ConfigError

if TYPE_CHECKING:  # tuf is imported by the commands that use it: `edgefleet --help` stays quick
    from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]

    from edgefleet.tufmeta.keyring import Keyring

__all__ = ["app", "current_targets", "publish"]

app = typer.Typer(help="The operator's offline TUF keys: root and release keys, the image root.",
                  no_args_is_help=True)

_KEYS = typer.Option(..., "--keys", help="keyring folder (made 0700; private keys 0600; keep it offline)")
_SERVER = typer.Option(None, "--server", "-s", help="fleet server URL [env: EDGEFLEET_SERVER; default: the "
                       "keyring's]; the operator token comes from EDGEFLEET_TOKEN")
_JSON = typer.Option(False, "--json", help="print JSON")
_IMAGE = "/tuf/image"


def _now() -> datetime:
    return datetime.now(UTC)


def publish(c: Any, role: str, md: Metadata[Any]) -> int:
    """PUT ``md`` (root or targets) to the image repository; returns the version the server took.
    Raises ApiClientError with the server's reason (409 for a version that is not the next)."""
    from edgefleet.tufmeta import canonical_bytes

    body = canonical_bytes(md)
    r = _send(c, "PUT", f"{_IMAGE}/{role}", content=body, headers={"content-type": "application/json"})
    out = _result(r)
    return int(out["version"])


def _get_metadata(c: Any, path: str, role: str, cls: type[Any]) -> Metadata[Any]:
    from edgefleet.tufmeta import TrustError, parse_metadata

    r = _send(c, "GET", f"{_IMAGE}/{path}")
    if r.status_code >= 400:
        _result(r)
    try:
        return parse_metadata(r.content, role, cls, f"{_IMAGE}/{path}")
    except TrustError as e:
        raise ApiClientError(str(e)) from e


def current_targets(c: Any, root: Root) -> Metadata[Targets]:
    """The image repository's current targets, fetched through timestamp and snapshot and each checked
    against ``root`` (signatures and versions). Raises ApiClientError when the server has none or serves
    metadata ``root`` does not verify."""
    from tuf.api.exceptions import UnsignedMetadataError
    from tuf.api.metadata import Snapshot, Targets, Timestamp  # type: ignore[attr-defined]

    ts = _get_metadata(c, "timestamp.json", Timestamp.type, Timestamp)
    try:
        root.verify_delegate(Timestamp.type, ts.signed_bytes, ts.signatures)
        sn = _get_metadata(c, f"{ts.signed.snapshot_meta.version}.snapshot.json", Snapshot.type, Snapshot)
        root.verify_delegate(Snapshot.type, sn.signed_bytes, sn.signatures)
        version = sn.signed.meta["targets.json"].version
        targets = _get_metadata(c, f"{version}.targets.json", Targets.type, Targets)
        root.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
    except (UnsignedMetadataError, KeyError) as e:
        raise ApiClientError(f"{c.base_url}: the image metadata does not verify against root "
                             f"{root.version}: {e}") from e
    if targets.signed.version != version:
        raise ApiClientError(f"{c.base_url}: snapshot names targets {version}, the server sent "
                             f"{targets.signed.version}")
    result: Metadata[Targets] = targets
    return result


def _echo(out: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"keyring: {out['keys_dir']}")
    if out.get("fingerprint"):
        typer.echo(f"image root: version {out['root_version']}, expires {out['root_expires']}")
        typer.echo(f"image root fingerprint (sha256): {out['fingerprint']}")
        typer.echo(f"image root file (give it to devices): {out['root_file']}")
    if out.get("director_root_file"):
        typer.echo(f"director root file (give it to devices): {out['director_root_file']}")
    else:
        typer.echo("image root: not published yet (`edgefleet keys init --keys DIR --server URL`)")
    for name, role in out["roles"].items():
        where = f" [{role['where']}]" if "where" in role else ""
        typer.echo(f"{name}: threshold {role['threshold']} of {len(role['keyids'])}{where}")
        for keyid in role["keyids"]:
            typer.echo(f"  {keyid}")
    days = ", ".join(f"{r} {d} d" for r, d in out["expiry_days"].items())
    typer.echo(f"expiries when signed: {days}")


def _publish_first(ring: Keyring, server: str | None) -> None:
    """Publish root 1 and an empty targets 1; or, when an earlier run published this keyring's root 1 but
    stopped before the targets, only the targets."""
    from tuf.api.metadata import Targets  # type: ignore[attr-defined]

    from edgefleet.tufmeta import expiry_from

    local = ring.latest_root()
    with _client(server or ring.server) as c:
        info = _result(_send(c, "GET", f"{_IMAGE}/keys"))
        on_server, targets = int(info.get("root_version", 0)), int(info.get("targets_version", 0))
        if local is not None and not (local.signed.version == 1 == on_server and targets == 0):
            if _publish_director_root(c, ring, info):
                return  # a keyring from before the director, or a run cut after the image's targets
            raise ConfigError(f"{ring.folder}: this keyring already published image root {local.signed.version}; "
                              "use `edgefleet keys rotate`")
        if local is None and on_server == 1 and _adopt_root_1(c, ring):
            local = ring.latest_root()  # an earlier run's root 1 reached the server, its answer did not reach us
        if local is None and on_server != 0:
            raise ConfigError(
                f"{c.base_url}: the server already has image root {on_server}, and this keyring signed none; use "
                "the keyring that made it (or rotate with it)")
        now = _now()
        if local is None:
            ring.online = dict(info["keys"])
            ring.server = str(c.base_url)
            ring.save()
            root = ring.sign_root(ring.build_root(now), ring.roles["root"])
            publish(c, "root", root)
            ring.save_root(root)
        publish(c, "targets", ring.sign_targets(Targets(version=1, expires=expiry_from(now, "targets"))))
        _publish_director_root(c, ring, info)


def _publish_director_root(c: Any, ring: Keyring, info: dict[str, Any]) -> bool:
    """Publish director root 1 unless the server has one; returns whether it did. A root 1 this keyring
    signed earlier (a run cut before the upload) is sent again as it is, so its bytes never change."""
    from edgefleet.tufmeta import canonical_bytes

    if int(info.get("director_root_version", 0)) != 0:
        return False
    if "director-targets" not in ring.online:
        ring.online = dict(info["keys"])
        ring.save()
    md = ring.director_root(1)
    if md is None:
        md = ring.sign_root(ring.build_director_root(_now()), ring.roles["root"])
        ring.save_director_root(md)
    r = _send(c, "PUT", "/tuf/director/root", content=canonical_bytes(md), headers={"content-type": "application/json"})
    _result(r)
    return True


def _served_root(c: Any, version: int) -> Metadata[Root] | None:
    """The server's root ``version``, or None when it has none. Raises ApiClientError when it cannot say."""
    r = _send(c, "GET", f"{_IMAGE}/{version}.root.json")
    if r.status_code == 404:
        return None
    if r.status_code >= 400:
        _result(r)  # raises, with the server's reason
    return _parse_root(r.content, f"{_IMAGE}/{version}.root.json")


def _parse_root(data: bytes, what: str) -> Metadata[Root]:
    from tuf.api.metadata import Root  # type: ignore[attr-defined]

    from edgefleet.tufmeta import TrustError, parse_metadata

    try:
        return parse_metadata(data, "root", Root, what)
    except TrustError as e:
        raise ApiClientError(str(e)) from e


def _adopt_root_1(c: Any, ring: Keyring) -> bool:
    """Whether the server's root 1 is this keyring's (its root and targets keys, signed by a threshold of
    them); if so it is saved as this keyring's root 1."""
    md = _served_root(c, 1)
    if md is None:
        return False
    root = md.signed
    if sorted(root.roles["root"].keyids) != sorted(ring.roles["root"]) or sorted(
            root.roles["targets"].keyids) != sorted(ring.roles["targets"]):
        return False
    if not root.get_root_verification_result(None, md.signed_bytes, md.signatures).verified:
        return False
    ring.save_root(md)
    return True


@app.command()
def init(
    keys: Path = _KEYS,
    root_keys: int = typer.Option(1, "--root-keys", help="how many root keys to make (1 to 16)"),
    root_threshold: int = typer.Option(1, "--root-threshold", help="how many of them must sign a new root"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Make the root and release keys in --keys; with --server, publish the image root there.

    On a keyring that exists but has published nothing, --server publishes its root (no new keys).
    """
    from edgefleet.tufmeta.keyring import KEYS_FILE, Keyring

    exists = (keys / KEYS_FILE).exists()
    if exists and not server:
        raise ConfigError(f"{keys}: a keyring already exists here; see it with `edgefleet keys show`, or publish "
                          "its root with --server URL")
    ring = Keyring.load(keys) if exists else Keyring.create(keys, root_keys, root_threshold)
    if server:
        _publish_first(ring, server)
    _echo(ring.describe(), as_json)


@app.command()
def show(keys: Path = _KEYS, as_json: bool = _JSON) -> None:
    """Key ids, roles, thresholds, the image root's fingerprint and expiries."""
    from edgefleet.tufmeta.keyring import Keyring

    _echo(Keyring.load(keys).describe(), as_json)


def _finish_targets_rotation(c: Any, ring: Keyring, root: Root) -> bool:
    """Whether an earlier ``rotate --role targets`` published ``root`` but stopped before re-signing the
    targets (they verify only against the root before, with the key it retired); if so, re-sign them now
    with the current release key. Nothing else is re-signed: targets the previous root does not verify are
    refused as before."""
    import copy

    from edgefleet.tufmeta import expiry_from

    previous = ring.root(root.version - 1)
    if previous is None or previous.signed.roles["targets"].keyids == root.roles["targets"].keyids:
        return False
    current = current_targets(c, previous.signed)
    targets = copy.deepcopy(current.signed)
    targets.version += 1
    targets.expires = expiry_from(_now(), "targets")
    publish(c, "targets", ring.sign_targets(targets))
    return True


def _unless_taken(
    c: Any, ring: Keyring, new_root: Metadata[Root], role: str, before: list[str], added: list[str], e: BaseException
) -> None:
    """After a failed upload of a rotated root: return when the server took it anyway (its answer was
    lost), else undo the rotation (delete the new keys) and re-raise ``e``. When the server cannot be
    asked, nothing is deleted: the new keys stay in private/ and the root is kept beside the others as
    ``image/pending.N.root.json``, so a root the server did take never names keys that are gone."""
    from edgefleet.durable import atomic_write_bytes
    from edgefleet.tufmeta import canonical_bytes

    version = new_root.signed.version
    try:
        served = _served_root(c, version)
    except (ApiClientError, OSError) as check:
        ring.roles[role] = before + added
        ring.save()
        pending = ring.folder / "image" / f"pending.{version}.root.json"
        atomic_write_bytes(pending, canonical_bytes(new_root), mode=0o644)
        raise ConfigError(f"root {version}: the upload failed ({e}) and the server cannot say whether it took it "
                          f"({check}); kept the new keys and {pending}; check `GET /tuf/image/{version}.root.json` "
                          "before rotating again") from e
    if served is not None and canonical_bytes(served) == canonical_bytes(new_root):
        return
    for keyid in added:
        ring.retire(keyid)
    ring.roles[role] = before
    raise e


@app.command()
def rotate(
    keys: Path = _KEYS,
    role: str = typer.Option(..., "--role", help="root or targets (snapshot and timestamp are the server's)"),
    server: str | None = _SERVER,
    as_json: bool = _JSON,
) -> None:
    """Replace ROLE's keys with new ones and publish a new root signed by the old AND the new root keys.

    For targets, the current targets are then re-signed with the new release key (version + 1).
    """
    from edgefleet.tufmeta import expiry_from
    from edgefleet.tufmeta.keyring import Keyring

    if role not in ("root", "targets"):
        raise ConfigError(f"--role: {role!r}; rotate root or targets here (the online snapshot and timestamp "
                          "keys are the server's)")
    ring = Keyring.load(keys)
    old = ring.latest_root()
    if old is None:
        raise ConfigError(f"{keys}: no image root published yet; run `edgefleet keys init --keys {keys} --server URL`")
    with _client(server or ring.server) as c:
        current = None
        if role == "targets":
            try:
                current = current_targets(c, old.signed)
            except ApiClientError:
                if _finish_targets_rotation(c, ring, old.signed):
                    _echo({**ring.describe(), "finished_earlier_rotation": True}, as_json)
                    return
                raise
        before = list(ring.roles[role])
        signers_before = list(ring.roles["root"])
        added = [ring.new_key(role) for _ in before]
        ring.roles[role] = added
        now = _now()
        new_root = ring.sign_root(ring.build_root(now, old.signed), signers_before + ring.roles["root"])
        try:
            publish(c, "root", new_root)
        except BaseException as e:
            _unless_taken(c, ring, new_root, role, before, added, e)
        ring.save_root(new_root)
        for keyid in before:
            ring.retire(keyid)
        ring.save()
        if current is not None:
            targets = copy.deepcopy(current.signed)
            targets.version += 1
            targets.expires = expiry_from(now, "targets")
            try:
                publish(c, "targets", ring.sign_targets(targets))
            except ApiClientError as e:
                raise ApiClientError(
                    f"root {new_root.signed.version} is published, but re-signing the targets failed ({e}); run "
                    f"`edgefleet keys rotate --keys {keys} --role targets` again to finish") from e
    _echo(ring.describe(), as_json)
