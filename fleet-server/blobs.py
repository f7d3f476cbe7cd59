"""Content-addressed bundle storage: ``DATA/blobs/sha256/ab/abcdef...``, immutable once written.

An upload streams into ``DATA/tmp/`` (same file system) while its sha256 is computed and its size
bounded; then it is validated as a bundle, fsynced and ``os.replace``d into place. A crash at any
point leaves either nothing or a complete blob; :meth:`BlobStore.sweep` removes what a crash left in
``tmp/`` at start. Raises :class:`UploadError` (too large, hash mismatch, bad bundle).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from edgefleet.bundle import BundleReader, Manifest
from edgefleet.durable import fsync_dir
from edgefleet.errors import BundleError, EdgefleetError

__all__ = ["BlobStore", "StoredBlob", "UploadError"]

_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")


class UploadError(EdgefleetError):
    """An upload was refused; ``status`` is the HTTP status, ``field`` what was wrong."""

    def __init__(self, message: str, status: int = 400, field: str = "body") -> None:
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int
    manifest: Manifest


class BlobStore:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "blobs" / "sha256"
        self.tmp = data_dir / "tmp"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA256.match(sha256):
            raise ValueError("not a sha256 hex digest")
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def sweep(self) -> int:
        """Remove partial uploads a crash left behind; returns how many."""
        n = 0
        for p in self.tmp.glob("upload-*"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                n += 1
        return n

    async def receive(
        self, chunks: AsyncIterator[bytes], limit: int, expected_sha256: str | None = None
    ) -> StoredBlob:
        """Stream ``chunks`` to a temp file, validate, and move into place. Nothing is left on failure."""
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
            await run_in_threadpool(self._commit, Path(tmp), sha)
            return StoredBlob(sha, size, manifest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _commit(self, tmp: Path, sha: str) -> None:
        final = self.path(sha)
        if final.is_file():
            return  # same content already stored: content addressing makes this a no-op
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, final)
        fsync_dir(final.parent)

    def delete(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(sha256).unlink()


def _validate(path: Path) -> Manifest:
    try:
        with BundleReader(path) as reader:
            reader.verify_hashes()
            return reader.manifest
    except BundleError as e:
        raise UploadError(str(e).replace(str(path), "bundle"), 422, "body") from e
