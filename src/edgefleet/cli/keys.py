"""``edgefleet keys init|show|rotate --keys DIR``: the operator's offline TUF keys and the image root.

``init`` makes the root keys (``--root-keys M``, threshold ``--root-threshold N``) and the release
(targets) key as private files (0600, folder 0700, whatever the umask) that are never sent anywhere;
with ``--server URL`` it fetches the server's online public keys and publishes the image repository's
root 1 (signed by the root keys) and an empty targets 1 (signed by the release key), and the director
root 1 (signed by the root keys, naming the server's online director-targets, snapshot and timestamp
keys; one for every device). ``show`` prints key
ids, roles, thresholds, the root's fingerprint and expiries. ``rotate --role root|targets`` makes new
keys and a new root signed by the old AND the new root keys, publishes it, and (for targets) re-signs
the current targets with the new release key; a root rotation also publishes a new director root
signed by the old AND the new root keys (devices follow it as they follow the image root).

:func:`change_targets` is the signing protocol ``model push|sign|withdraw`` use: fetch the current
image targets (checked against this keyring's root), change them, version + 1, sign with the release
key, PUT; on a 409 (another operator published in between) fetch again and redo the change, a bounded
number of times. A change that is already there signs nothing. Every failure is one ``error: ...`` line.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from edgefleet.cli.fleet import ApiClientError, _client, _result, _send
from edgefleet.errors import ConfigError

if TYPE_CHECKING:  # tuf is imported by the commands that use it: `edgefleet --help` stays quick
    from tuf.api.metadata import Metadata, Root, Targets  # type: ignore[attr-defined]

    from edgefleet.tufmeta.keyring import Keyring

__all__ = ["TARGETS_TRIES", "TargetsChange", "app", "change_targets", "current_targets", "publish", "signing_keyring"]

app = typer.Typer(help="The operator's offline TUF keys: root and release keys, the image root.",
                  no_args_is_help=True)

_KEYS = typer.Option(..., "--keys", envvar="EDGEFLEET_KEYS",
                     help="keyring folder (made 0700; private keys 0600; keep it offline)")
_SERVER = typer.Option(None, "--server", "-s", help="fleet server URL [env: EDGEFLEET_SERVER; default: the "
                       "keyring's]; the operator token comes from EDGEFLEET_TOKEN")
_JSON = typer.Option(False, "--json", help="print JSON")
_IMAGE = "/tuf/image"
TARGETS_TRIES = 10  # attempts of one targets change while other operators keep publishing (409)
_PAUSE = 0.1  # seconds before the second attempt; doubled each time up to _MAX_PAUSE, jittered by +-50 %
_MAX_PAUSE = 2.0  # seconds


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


def signing_keyring(keys: Path) -> tuple[Keyring, Metadata[Root]]:
    """The keyring in ``keys`` and its newest image root, for a command that will sign targets: the
    root must be published and the release key readable (checked now, before anything is sent).
    Raises ConfigError."""
    from edgefleet.tufmeta.keyring import Keyring

    ring = Keyring.load(keys)
    root = ring.latest_root()
    if root is None:
        raise ConfigError(f"{keys}: this keyring has published no image root; run `edgefleet keys init --keys "
                          f"{keys} --server URL` first")
    ring.release_signers()
    return ring, root


@dataclass(frozen=True)
class TargetsChange:
    """What :func:`change_targets` did: ``version`` is the image targets version that holds the change;
    ``changed`` is False when the targets already were as wanted (nothing signed); ``tries`` counts the
    PUTs (1 without a conflict)."""

    version: int
    changed: bool
    tries: int


def _conflict(r: Any) -> bool:
    """A 409 for a targets version that is not the next (someone published in between), as opposed to
    another 409 (no root yet)."""
    if r.status_code != 409:
        return False
    try:
        return bool(r.json().get("field") == "signed.version")
    except (ValueError, AttributeError):
        return False


def _pause(attempt: int, retry_after: str | None = None) -> None:
    """Wait before attempt ``attempt + 1``: exponential from :data:`_PAUSE`, jittered so that operators
    who collided do not collide again, at most :data:`_MAX_PAUSE` (or the server's Retry-After, capped)."""
    base = min(_PAUSE * 2 ** attempt, _MAX_PAUSE)
    if retry_after and retry_after.isdigit():
        base = min(float(retry_after), _MAX_PAUSE)
    time.sleep(base * random.uniform(0.5, 1.5))


def change_targets(c: Any, ring: Keyring, root: Root, edit: Callable[[Targets], bool],
                   tries: int = TARGETS_TRIES) -> TargetsChange:
    """Apply ``edit`` to the image repository's current targets and publish them signed by the release key.

    ``edit`` changes the Targets it is given in place and returns True, or returns False when they are
    already as wanted (then nothing is signed); it may raise to refuse. It runs again on fresh targets
    after every 409 (another operator's targets landed first) and after a PUT whose answer was lost, at
    most ``tries`` times, with jittered pauses; a 503 (the database is busy) is retried the same way.
    Raises ApiClientError (the server's reason, or still conflicting after ``tries``), ConfigError."""
    from edgefleet.tufmeta import canonical_bytes, expiry_from

    lost: ApiClientError | None = None
    for attempt in range(tries):
        current = current_targets(c, root)
        targets = copy.deepcopy(current.signed)
        if not edit(targets):
            return TargetsChange(current.signed.version, lost is not None, attempt)
        targets.version = current.signed.version + 1
        targets.expires = expiry_from(_now(), "targets")
        body = canonical_bytes(ring.sign_targets(targets))
        try:
            r = _send(c, "PUT", f"{_IMAGE}/targets", content=body, headers={"content-type": "application/json"})
        except ApiClientError as e:  # the server may have taken it: the next attempt's fetch says
            lost = e
            _pause(attempt)
            continue
        if _conflict(r) or r.status_code == 503:
            _pause(attempt, r.headers.get("retry-after"))
            continue
        return TargetsChange(int(_result(r)["version"]), True, attempt + 1)
    if lost is not None:
        raise ApiClientError(f"PUT {_IMAGE}/targets: {lost}") from lost
    raise ApiClientError(f"PUT {_IMAGE}/targets: other targets kept landing first ({tries} tries); nothing of "
                         "this change is published: run the command again")


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
    """Send the director roots this keyring signed that the server lacks, oldest first (a run cut before
    their upload: sent again as they are, so their bytes never change); with none on either side, sign
    director root 1 with the current root keys and send it. Returns whether it sent any. Raises
    ConfigError when the server has a newer director root than this keyring signed."""
    on_server = int(info.get("director_root_version", 0))
    local = ring.latest_director_root()
    if local is None and on_server == 0:
        if "director-targets" not in ring.online:
            ring.online = dict(info["keys"])
            ring.save()
        local = ring.sign_root(ring.build_director_root(_now()), ring.roles["root"])
        ring.save_director_root(local)
    newest = 0 if local is None else local.signed.version
    if newest < on_server:
        raise ConfigError(f"{ring.folder}: the server has director root {on_server}, this keyring signed only up to "
                          f"{newest}; use the keyring copy that signed it")
    for version in range(on_server + 1, newest + 1):
        md = ring.director_root(version)
        if md is None:
            raise ConfigError(f"{ring.director_root_file(version)}: missing (the server has director root "
                              f"{on_server}, this keyring {newest})")
        _put_director_root(c, md)
    return newest > on_server


def _put_director_root(c: Any, md: Metadata[Root]) -> None:
    from edgefleet.tufmeta import canonical_bytes

    r = _send(c, "PUT", "/tuf/director/root", content=canonical_bytes(md), headers={"content-type": "application/json"})
    _result(r)


def _director_base(c: Any, ring: Keyring) -> Metadata[Root]:
    """The director root a root rotation starts from: this keyring's newest, after sending the server
    any it lacks (director root 1 signed now with the current root keys, if neither side has one)."""
    info = _result(_send(c, "GET", f"{_IMAGE}/keys"))
    if "director-targets" not in ring.online:
        ring.online = dict(info["keys"])
        ring.save()
    _publish_director_root(c, ring, info)
    previous = ring.latest_director_root()
    assert previous is not None  # there is one now, on both sides
    return previous


def _next_director_root(ring: Keyring, previous: Metadata[Root], now: datetime,
                        signers_before: list[str]) -> Metadata[Root]:
    """Director root N+1 for a root rotation: this keyring's (new) root keys, signed by the old root keys
    (``signers_before``) and the new ones, checked here against director root N as a device will check
    it. Raises ConfigError when the old keys cannot sign it (director root N names root keys this keyring
    no longer holds)."""
    md = ring.sign_root(ring.build_director_root(now, previous.signed), signers_before + ring.roles["root"])
    check = md.signed.get_root_verification_result(previous.signed, md.signed_bytes, md.signatures)
    if not check.verified:
        raise ConfigError(
            f"director root {md.signed.version}: signed by {len(check.first.signed)} of the root keys director root "
            f"{previous.signed.version} names (threshold {check.first.threshold}); this keyring no longer holds "
            "them, so the director root cannot be rotated with it")
    return md


def _send_director_root(c: Any, ring: Keyring, md: Metadata[Root]) -> None:
    """Upload the rotated director root (already saved in the keyring); an upload whose answer was lost
    counts when the server now has that version. Raises ApiClientError saying how to finish."""
    try:
        _put_director_root(c, md)
        return
    except ApiClientError as e:
        try:
            if int(_result(_send(c, "GET", f"{_IMAGE}/keys")).get("director_root_version", 0)) >= md.signed.version:
                return
        except ApiClientError:
            pass
        raise ApiClientError(
            f"image root is rotated, but director root {md.signed.version} is not published ({e}); it is signed and "
            f"kept in {ring.director_root_file(md.signed.version)}: run `edgefleet keys init --keys {ring.folder} "
            "--server URL` to send it") from e


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

    For root, a new director root (the same new root keys) is published too, signed the same way. For
    targets, the current targets are then re-signed with the new release key (version + 1).
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
        director_base = _director_base(c, ring) if role == "root" else None
        before = list(ring.roles[role])
        signers_before = list(ring.roles["root"])
        added = [ring.new_key(role) for _ in before]
        ring.roles[role] = added
        now = _now()
        director = None
        try:
            new_root = ring.sign_root(ring.build_root(now, old.signed), signers_before + ring.roles["root"])
            if director_base is not None:  # the director root names the same root keys: rotated with them
                director = _next_director_root(ring, director_base, now, signers_before)
        except BaseException:
            for keyid in added:
                ring.retire(keyid)
            ring.roles[role] = before
            raise
        try:
            publish(c, "root", new_root)
        except BaseException as e:
            _unless_taken(c, ring, new_root, role, before, added, e)
        ring.save_root(new_root)
        if director is not None:
            ring.save_director_root(director)
        for keyid in before:
            ring.retire(keyid)
        ring.save()
        if director is not None:
            _send_director_root(c, ring, director)
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
