"""Staging and installing a downloaded target.

- ``STATE/staging/SHA256.part``: the download, resumed with ``Range`` (see :class:`DeviceClient.download`),
  never longer than the signed length.
- verified (length and sha256 against the signed target) it is renamed ``SHA256.efb``;
- installed as ``STATE/models/NAME/VERSION/`` holding ``bundle.efb`` (the signed bytes themselves, so an
  installed version can be re-checked against its target at any time) and ``target.json``. The folder is
  made under a temporary name, every file fsynced, then renamed into place and its parent fsynced: a
  folder with that name is always complete.

The agent never extracts a bundle into the file system: the runtime reads the model from the verified
tar in memory (:class:`edgefleet.bundle.BundleReader` refuses member names that are absolute, contain
``..`` or are not flat, links and devices), so a bundle crafted for path traversal cannot write a byte
outside its folder; it is refused at install with the reader's reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgefleet.agent.updater.errors import Refused, Transient
from edgefleet.agent.updater.state import Installed
from edgefleet.durable import atomic_writer, fsync_dir

__all__ = ["bundle_file", "install", "installed", "prune", "read_installed", "staged", "staging_part", "verify_staged"]

BUNDLE = "bundle.efb"
TARGET = "target.json"
_CHUNK = 1 << 20


def staging_part(state_dir: Path, sha256: str) -> Path:
    folder = state_dir / "staging"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"{sha256}.part"


def staged(state_dir: Path, sha256: str) -> Path:
    return state_dir / "staging" / f"{sha256}.efb"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_staged(state_dir: Path, sha256: str, length: int, hashed: bool = False) -> Path:
    """Check the finished ``.part`` against the signed length and sha256 and rename it ``.efb``
    (``hashed``: the download just hashed these bytes, skip that). Raises Refused (``hash_mismatch``,
    ``length_mismatch``; the bad file is deleted)."""
    done = staged(state_dir, sha256)
    if done.is_file() and done.stat().st_size == length and _sha256(done) == sha256:
        return done  # a previous run got this far
    part = staging_part(state_dir, sha256)
    size = part.stat().st_size if part.exists() else -1
    if size != length:
        part.unlink(missing_ok=True)
        raise Refused(f"download: {size} bytes, the signed target has {length}", "length_mismatch")
    got = sha256 if hashed else _sha256(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise Refused(f"download: sha256 {got}, the signed target's is {sha256}", "hash_mismatch")
    os.replace(part, done)
    fsync_dir(done.parent)
    return done


def install(state_dir: Path, name: str, version: str, target: str, sha256: str, length: int) -> Installed:
    """Install the staged bundle as ``models/NAME/VERSION/`` (all or nothing) and return it. A folder
    already there with the same sha256 (a run cut after the rename) is taken as it is. Raises Refused
    for a bundle that does not read (``bad_bundle``) or a version installed with other bytes."""
    from edgefleet.bundle.archive import BundleReader
    from edgefleet.errors import BundleError

    src = staged(state_dir, sha256)
    rel = Path("models") / name / version
    dest = state_dir / rel
    inst = Installed(name=name, version=version, target=target, sha256=sha256, length=length, path=str(rel / BUNDLE))
    existing = _read_target(dest)
    if existing is not None:
        if existing.sha256 == sha256:
            return existing
        raise Refused(f"install: {rel} is already installed with sha256 {existing.sha256}, not {sha256}",
                      "version_conflict")
    try:
        with BundleReader(src) as b:
            b.verify_hashes()
            manifest = b.manifest
    except BundleError as e:
        raise Refused(f"install: {e}", "bad_bundle") from e
    if (manifest.name, manifest.version) != (name, version):
        raise Refused(f"install: the bundle says {manifest.name} {manifest.version}, the target {target}",
                      "name_mismatch")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():  # a folder without target.json is not ours (never renamed into place half-made)
        shutil.rmtree(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=dest.parent))
    try:
        # The staged file moves (same file system: no copy); it was fsynced when it was downloaded. A cut
        # from here to the final rename leaves neither it nor the version: the download starts again.
        os.chmod(src, 0o644)
        os.replace(src, tmp / BUNDLE)
        fsync_dir(src.parent)
        with atomic_writer(tmp / TARGET, mode=0o644) as out:
            out.write(json.dumps(inst.model_dump(), indent=1).encode())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Transient(f"install: {dest}: {e.strerror or e}", "disk_full" if e.errno == 28 else "io_error") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return inst


def installed(state_dir: Path, name: str, version: str, sha256: str) -> Installed | None:
    """The complete install of ``name`` ``version`` with these bytes, or None."""
    inst = _read_target(state_dir / "models" / name / version)
    if inst is None or inst.sha256 != sha256 or not (state_dir / inst.path).is_file():
        return None
    return inst


def bundle_file(state_dir: Path, inst: Installed) -> Path:
    return state_dir / inst.path


def _read_target(folder: Path) -> Installed | None:
    try:
        return Installed.model_validate_json((folder / TARGET).read_bytes())
    except (OSError, ValueError):
        return None


def read_installed(state_dir: Path) -> Iterator[Installed]:
    """Every complete install under ``models/`` (folders with a readable ``target.json``)."""
    root = state_dir / "models"
    if not root.is_dir():
        return
    for name_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for ver_dir in sorted(p for p in name_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            inst = _read_target(ver_dir)
            if inst is not None and (state_dir / inst.path).is_file():
                yield inst


def prune(state_dir: Path, name: str, keep: set[str]) -> list[str]:
    """Delete the installed versions of ``name`` not in ``keep`` (and leftovers of cut installs);
    returns the versions deleted. Staging files are the caller's to delete."""
    folder = state_dir / "models" / name
    gone: list[str] = []
    if not folder.is_dir():
        return gone
    for ver_dir in folder.iterdir():
        if ver_dir.name in keep:
            continue
        shutil.rmtree(ver_dir, ignore_errors=True)
        if not ver_dir.name.startswith("."):
            gone.append(ver_dir.name)
    with contextlib.suppress(OSError):
        fsync_dir(folder)
    return gone


def clear_staging(state_dir: Path, keep: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """Delete staging files whose sha256 is not in ``keep``."""
    folder = state_dir / "staging"
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.split(".")[0] not in keep:
            p.unlink(missing_ok=True)
