"""Reading and writing ``.efb`` bundles: a tar archive, ``manifest.json`` first, the members beside it.

Reading is strict. Every member must be a regular file with a flat name that the manifest lists, with
exactly the size the manifest gives; its sha256 is checked as it is read. Links, folders, devices,
absolute paths, ``..``, unlisted or duplicate members are refused before a byte is written, and
:func:`unpack_bundle` builds the result in a temp folder beside the target, renaming it into place only
when every member checked out, so a bad bundle leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from edgefleet.bundle.manifest import MAX_MANIFEST_BYTES, FileRef, Manifest, parse_manifest, shown
from edgefleet.durable import atomic_writer, fsync_dir
from edgefleet.errors import BundleError

__all__ = ["MAX_NPZ_BYTES", "BundleReader", "file_ref", "read_manifest", "read_npz", "unpack_bundle", "write_bundle"]

MANIFEST = "manifest.json"
MAX_MEMBERS = 16
MAX_PADDING = 64 << 10  # bytes of NUL padding allowed after the end of the archive (tar records)
MAX_NPZ_BYTES = 256 << 20  # bytes: all the arrays of one .npz member (golden vectors), once decoded
MAX_NPZ_ARRAYS = 1024
MAX_EXTENDED_HEADER = 64 << 10  # bytes: a pax or GNU long-name header is read into memory whole
_CHUNK = 1 << 20
_EXTENDED = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
             tarfile.SOLARIS_XHDTYPE)


class _BoundedTarInfo(tarfile.TarInfo):
    """A member header that refuses an extended header too large to read, before tarfile reads it."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED and self.size > MAX_EXTENDED_HEADER:
            raise tarfile.HeaderError(
                f"extended header at offset {self.offset}: {self.size} bytes, more than {MAX_EXTENDED_HEADER}"
            )
        return super()._proc_member(tar)  # type: ignore[misc,no-any-return]


def file_ref(path: str, data: bytes) -> FileRef:
    """The manifest entry for a member with these bytes."""
    return FileRef(path=path, sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def write_bundle(out: str | os.PathLike[str], manifest: Manifest, members: Mapping[str, bytes]) -> Path:
    """Write a reproducible bundle atomically: same manifest and members, same bytes.

    ``members`` maps each member path the manifest lists to its bytes; a missing, extra or
    mismatching member raises :class:`BundleError`.
    """
    expected = {r.path: r for r in manifest.members()}
    if set(members) != set(expected):
        raise BundleError(f"bundle members {sorted(members)} do not match the manifest's {sorted(expected)}")
    for name, data in members.items():
        ref = expected[name]
        if len(data) != ref.size or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise BundleError(f"member {name}: bytes do not match the manifest's size/sha256")
    mtime = int(manifest.created_at.timestamp())
    out_path = Path(out)
    with atomic_writer(out_path) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        head = manifest.to_json()
        tar.addfile(_tarinfo(MANIFEST, len(head), mtime), io.BytesIO(head))
        for name in sorted(members):
            data = members[name]
            tar.addfile(_tarinfo(name, len(data), mtime), io.BytesIO(data))
    return out_path


class BundleReader:
    """A checked, read-only view of a bundle file. Use as a context manager.

    Opening reads and validates the manifest and every member header (not the contents);
    :meth:`read` returns a member's bytes after checking their sha256.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        try:
            self._file: IO[bytes] = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        except OSError as e:
            raise BundleError(f"{self.path}: cannot open bundle: {e.strerror or e}") from e
        try:
            try:
                tar = tarfile.open(fileobj=self._file, mode="r:", tarinfo=_BoundedTarInfo)  # noqa: SIM115 - closed in close()
            except (tarfile.TarError, EOFError) as e:
                raise self._fail(f"not a valid bundle (truncated or not a tar archive): {e}") from e
            self._tar = tar
            self._infos = self._scan(tar)
            self._check_end(tar.offset)
            self.manifest = self._read_manifest()
            self._check_members()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> BundleReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._file.close()

    def _fail(self, msg: str) -> BundleError:
        return BundleError(f"{self.path}: {msg}")

    def _scan(self, tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
        infos: dict[str, tarfile.TarInfo] = {}
        try:
            for info in tar:
                name = info.name
                if name.startswith("/") or ".." in name.split("/") or "/" in name.strip("/") or "\\" in name:
                    raise self._fail(f"member {shown(name)}: path escapes the bundle folder or is not flat")
                if not info.isreg():
                    raise self._fail(f"member {shown(name)}: only regular files are allowed (links, folders refused)")
                if name in infos:
                    raise self._fail(f"member {shown(name)}: appears twice")
                infos[name] = info
                if len(infos) > MAX_MEMBERS:
                    raise self._fail(f"more than {MAX_MEMBERS} members")
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise self._fail(f"not a valid bundle (truncated or not a tar archive): {e}") from e
        if not infos:
            raise self._fail("not a valid bundle: empty or not a tar archive")
        return infos

    def _check_end(self, end: int) -> None:
        """After the last member only the end-of-archive blocks and record padding (NULs) may follow."""
        self._file.seek(end)
        tail = self._file.read(MAX_PADDING + 1)
        junk = tail.lstrip(b"\0")
        if junk:
            at = end + len(tail) - len(junk)
            raise self._fail(f"trailing data after the end of the archive at offset {at}")
        if len(tail) > MAX_PADDING:
            raise self._fail(f"more than {MAX_PADDING} bytes of padding after the end of the archive at offset {end}")

    def _raw(self, info: tarfile.TarInfo, limit: int) -> bytes:
        if info.size > limit:
            raise self._fail(f"member {shown(info.name)}: {info.size} bytes, more than the {limit} allowed")
        assert self._tar is not None
        try:
            f = self._tar.extractfile(info)
            data = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise self._fail(f"member {shown(info.name)}: cannot be read (truncated?): {e}") from e
        if len(data) != info.size:
            raise self._fail(f"member {shown(info.name)}: truncated ({len(data)} of {info.size} bytes)")
        return data

    def _read_manifest(self) -> Manifest:
        info = self._infos.get(MANIFEST)
        if info is None:
            raise self._fail(f"no {MANIFEST} at the root of the bundle")
        return parse_manifest(self._raw(info, MAX_MANIFEST_BYTES), where=f"{self.path}: {MANIFEST}")

    def _check_members(self) -> None:
        listed = {r.path: r for r in self.manifest.members()}
        for name, info in self._infos.items():
            if name == MANIFEST:
                continue
            ref = listed.get(name)
            if ref is None:
                raise self._fail(f"member {shown(name)}: not listed in the manifest")
            if info.size != ref.size:
                raise self._fail(f"member {shown(name)}: {info.size} bytes, the manifest says {ref.size}")
        missing = sorted(set(listed) - set(self._infos))
        if missing:
            raise self._fail(f"member(s) {missing}: listed in the manifest but missing")

    def ref(self, name: str) -> FileRef:
        for r in self.manifest.members():
            if r.path == name:
                return r
        raise self._fail(f"member {shown(name)}: not listed in the manifest")

    def read(self, name: str) -> bytes:
        """The member's bytes, after checking size and sha256 against the manifest."""
        ref = self.ref(name)
        data = self._raw(self._infos[name], ref.size)
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise self._fail(f"member {shown(name)}: sha256 does not match the manifest (tampered or corrupt)")
        return data

    def read_model(self) -> bytes:
        return self.read(self.manifest.model.path)

    def verify_hashes(self) -> None:
        """Check every member's sha256, streaming (reads the whole bundle, holds 1 MiB of it at a time)."""
        assert self._tar is not None
        for ref in self.manifest.members():
            info = self._infos[ref.path]
            digest = hashlib.sha256()
            size = 0
            try:
                f = self._tar.extractfile(info)
                while f is not None and (chunk := f.read(_CHUNK)):
                    digest.update(chunk)
                    size += len(chunk)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise self._fail(f"member {shown(ref.path)}: cannot be read (truncated?): {e}") from e
            if size != ref.size:
                raise self._fail(f"member {shown(ref.path)}: truncated ({size} of {ref.size} bytes)")
            if digest.hexdigest() != ref.sha256:
                raise self._fail(f"member {shown(ref.path)}: sha256 does not match the manifest (tampered or corrupt)")


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """The validated manifest of a bundle (member headers are checked; contents are not read)."""
    with BundleReader(path) as b:
        return b.manifest


def unpack_bundle(path: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Manifest:
    """Unpack a bundle into the new folder ``dest``, all or nothing.

    Every member is verified before ``dest`` appears; on any error nothing is left behind.
    """
    target = Path(dest)
    if target.exists():
        raise BundleError(f"{target}: already exists; unpack into a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        with BundleReader(path) as b:
            for ref in b.manifest.members():
                data = b.read(ref.path)
                with atomic_writer(tmp / ref.path) as f:
                    f.write(data)
            with atomic_writer(tmp / MANIFEST) as f:
                f.write(b.manifest.to_json())
            manifest = b.manifest
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_npz(data: bytes, where: str = "golden.npz", limit: int = MAX_NPZ_BYTES) -> dict[str, Any]:
    """The arrays of an ``.npz`` file's bytes, by name, read without trusting its headers: each array's
    declared shape and dtype are checked against the bytes its member holds, and the total against
    ``limit``, before anything is allocated. Pickled (object) arrays are refused.

    Raises :class:`BundleError` naming the array.
    """
    import math
    import zipfile

    from numpy.lib import format as npf

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise BundleError(f"{where}: not a readable .npz file: {e}") from e
    if len(infos) > MAX_NPZ_ARRAYS:
        raise BundleError(f"{where}: {len(infos)} arrays, more than {MAX_NPZ_ARRAYS}")
    out: dict[str, Any] = {}
    total = 0
    with zf:
        for info in infos:
            name = info.filename.removesuffix(".npy")
            what = f"{where}: array {shown(name)}"
            if not info.filename.endswith(".npy"):
                raise BundleError(f"{what}: not an .npy member")
            try:
                with zf.open(info) as f:
                    version = npf.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = npf.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = npf.read_array_header_2_0(f)
                    else:
                        raise BundleError(f"{what}: .npy format version {version} is not supported (1.0, 2.0)")
                    holds = info.file_size - f.tell()
                    if dtype.hasobject:
                        raise BundleError(f"{what}: object arrays (pickles) are refused")
                    if any(d < 0 for d in shape):
                        raise BundleError(f"{what}: negative dimension in shape {shown(shape)}")
                    size = math.prod(shape) * dtype.itemsize
                    if size > holds:
                        raise BundleError(
                            f"{what}: declares shape {shown(shape)} of {dtype} ({size} bytes), "
                            f"but its member holds {max(holds, 0)} bytes"
                        )
                    total += size
                    if total > limit:
                        raise BundleError(f"{what}: the arrays take more than the {limit} bytes allowed")
                with zf.open(info) as f:
                    out[name] = npf.read_array(f, allow_pickle=False)
            except BundleError:
                raise
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, NotImplementedError) as e:
                raise BundleError(f"{what}: not a readable array: {shown(str(e), 200)}") from e
    return out
