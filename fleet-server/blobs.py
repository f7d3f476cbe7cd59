"""Content-addressed bundle storage: ``DATA/blobs/sha256/ab/abcdef...``, immutable once written.

A blob's lifetime follows its database rows; the registry drives it in this order:

1. :meth:`BlobStore.receive` streams an upload into ``DATA/tmp/`` (same file system) while its sha256
   is computed and its size bounded, fsyncs and validates it as a bundle: a :class:`StagedBlob`,
   reachable by nobody.
2. Inside the transaction that inserts the row, holding the content's lock, :meth:`BlobStore.place`
   renames it into the store (a no-op when the content is already there). Downloads serve a blob only
   for a committed row, so a blob placed by a transaction that then fails is never reachable; the
   registry takes it back out with the same reference check a delete uses.
3. A delete, in the transaction that removes the last row referencing a hash and holding the same
   lock, :meth:`BlobStore.trash`\\ es the blob (a rename into ``tmp/``); after the commit it is
   :meth:`BlobStore.purge`\\ d, after a rollback :meth:`BlobStore.restore`\\ d.

A crash at any point leaves either nothing or a complete blob: :meth:`BlobStore.sweep`, at start,
removes partial uploads and puts back trashed blobs (a delete that committed leaves an unreachable
file; one that did not must find its blob again). Raises :class:`UploadError` (too large, hash
mismatch, bad bundle).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from edgefleet.bundle import BundleReader, Manifest
from edgefleet.durable import fsync_dir
from edgefleet.errors import BundleError, EdgefleetError

__all__ = ["BlobStore", "StagedBlob", "UploadError"]

_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
_BLOB_MODE = 0o400  # immutable, and private to the server's user whatever the umask (as its folders: 0700)
_TRASH = "trash-"  # tmp/trash-SHA-RANDOM: a blob a delete took out, until its transaction ends


class UploadError(EdgefleetError):
    """An upload was refused; ``status`` is the HTTP status, ``field`` what was wrong."""

    def __init__(self, message: str, status: int = 400, field: str = "body") -> None:
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class StagedBlob:
    """A received, validated upload in ``tmp/``: not in the store until :meth:`BlobStore.place`."""

    sha256: str
    size: int
    manifest: Manifest
    path: Path


class BlobStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "blobs" / "sha256"
        self.tmp = data_dir / "tmp"
        for folder in (self.root.parent, self.root, self.tmp):
            _private_dir(folder)

    def path(self, sha256: str) -> Path:
        """Where the blob with this hash lives. Raises ValueError for anything but a sha256 hex digest."""
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def stored(self) -> set[str]:
        """The hash of every blob in the store."""
        return {p.name for p in self.root.glob("??/*") if _SHA256.match(p.name) and p.is_file()}

    def sweep(self) -> int:
        """Remove partial uploads a crash left behind and put back blobs a crashed delete took out;
        returns how many files were handled."""
        n = 0
        for p in self.tmp.glob("upload-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        for p in self.tmp.glob(f"{_TRASH}*"):
            sha = p.name[len(_TRASH):][:64]
            if _SHA256.match(sha):
                self.restore(p, sha)
            else:
                p.unlink(missing_ok=True)
            n += 1
        return n

    async def receive(
        self, chunks: AsyncIterator[bytes], limit: int, expected_sha256: str | None = None
    ) -> StagedBlob:
        """Stream ``chunks`` to a temp file and validate it. Nothing is left on failure; on success the
        caller must :meth:`place` or :meth:`discard` the result. Raises :class:`UploadError`."""
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".efb", dir=self.tmp)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise UploadError(f"body: larger than the {limit}-byte upload limit", 413)
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                await run_in_threadpool(os.fsync, f.fileno())
            sha = digest.hexdigest()
            if size == 0:
                raise UploadError("body: empty; send the .efb bundle as the request body")
            if expected_sha256 is not None and expected_sha256.lower() != sha:
                raise UploadError(f"x-content-sha256: the body's sha256 is {sha}", 400, "x-content-sha256")
            manifest = await run_in_threadpool(_validate, Path(tmp))
            return StagedBlob(sha, size, manifest, Path(tmp))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def discard(self, staged: StagedBlob) -> None:
        """Drop a staged upload (placed or not)."""
        staged.path.unlink(missing_ok=True)

    def place(self, staged: StagedBlob) -> bool:
        """Move a staged upload into the store (call holding the content's lock, before the commit of
        its row). Returns False when the content was already stored."""
        final = self.path(staged.sha256)
        if final.is_file():
            self.discard(staged)
            return False  # same content already stored: content addressing makes this a no-op
        _private_dir(final.parent)
        os.chmod(staged.path, _BLOB_MODE)
        os.replace(staged.path, final)
        fsync_dir(final.parent)
        return True

    def trash(self, sha256: str) -> Path | None:
        """Take a blob out of the store, reversibly (call holding the content's lock, before the commit
        that removes its last row). Returns where it went, or None when it was not stored."""
        final = self.path(sha256)
        out = self.tmp / f"{_TRASH}{sha256}-{secrets.token_hex(4)}"
        try:
            os.replace(final, out)
        except FileNotFoundError:
            return None
        fsync_dir(final.parent)
        return out

    def restore(self, trashed: Path, sha256: str) -> None:
        """Put a trashed blob back (its delete rolled back); a no-op if the content is stored again."""
        final = self.path(sha256)
        if final.is_file():
            trashed.unlink(missing_ok=True)
            return
        _private_dir(final.parent)
        with contextlib.suppress(FileNotFoundError):
            os.replace(trashed, final)
            fsync_dir(final.parent)

    def purge(self, trashed: Path) -> None:
        """Remove a trashed blob for good (its delete committed)."""
        trashed.unlink(missing_ok=True)


def _private_dir(folder: Path) -> None:
    """Create ``folder`` if needed and make it 0700 (mkdir's mode is cut by the umask, chmod's is not)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if folder.stat().st_mode & 0o777 != 0o700:
        os.chmod(folder, 0o700)


def _validate(path: Path) -> Manifest:
    try:
        with BundleReader(path) as reader:
            reader.verify_hashes()
            return reader.manifest
    except BundleError as e:
        raise UploadError(str(e).replace(str(path), "bundle"), 422, "body") from e
