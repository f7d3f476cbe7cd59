"""The image repository: every version of every role in the ``tuf_metadata`` table, online signing.

Root and targets come from the operator, already signed with offline keys; they are checked here (see
:func:`edgefleet.tufmeta.check_root_update` and :func:`~edgefleet.tufmeta.check_targets_update`) and
stored as sent. Snapshot and timestamp are signed here with the server's online keys: a new pair on
every accepted targets, and again whenever the served ones have less than half their lifetime left
(checked when ``timestamp.json`` is read, so an idle server keeps valid metadata for whoever asks).

Every change takes one lock per repository first (PostgreSQL: an advisory transaction lock; SQLite: its
single write lock), so concurrent replicas never sign two snapshots of one version; versions are the
primary key, so nothing can be overwritten. Methods are blocking: call them from a thread pool.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp  # type: ignore[attr-defined]

from edgefleet.server.models import ModelVersion, TufMetadata, utcnow
from edgefleet.server.state import audit
from edgefleet.server.tuf.keys import OnlineKeys
from edgefleet.tufmeta import (
    EXPIRY,
    TrustError,
    canonical_bytes,
    check_root_update,
    check_targets_update,
    expiry_from,
    parse_metadata,
    target_path,
)

__all__ = ["IMAGE", "ImageRepository", "NotFound", "RegistryMismatch", "listing_version", "lock_repo"]

IMAGE = "image"
_BATCH = 500  # content hashes per registry query


class NotFound(Exception):
    """The repository has no such metadata (yet)."""


class RegistryMismatch(TrustError):
    """Targets that list a bundle the registry does not hold with that length and sha256."""


class ImageRepository:
    """The image repository over ``sessions``. ``expiries`` (role -> lifetime) and ``clock`` are injected
    so tests can make the online roles short-lived and move time on."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        keys: OnlineKeys,
        expiries: dict[str, timedelta] | None = None,
        clock: Callable[[], datetime] = utcnow,
        repo: str = IMAGE,
    ) -> None:
        self.sessions = sessions
        self.keys = keys
        self.expiries = {**EXPIRY, **(expiries or {})}
        self.clock = clock
        self.repo = repo

    # reading ---------------------------------------------------------------------------------------

    def _latest(self, s: Session, role: str) -> TufMetadata | None:
        return s.scalars(
            select(TufMetadata).where(TufMetadata.repo == self.repo, TufMetadata.role == role)
            .order_by(TufMetadata.version.desc()).limit(1)
        ).first()

    def current_version(self, role: str) -> int:
        """The newest version of ``role`` (0: none)."""
        with self.sessions() as s:
            v = s.scalar(select(func.max(TufMetadata.version)).where(TufMetadata.repo == self.repo,
                                                                      TufMetadata.role == role))
        return int(v or 0)

    def read(self, role: str, version: int) -> bytes:
        """The stored ``version`` of ``role``. Raises NotFound."""
        with self.sessions() as s:
            row = s.get(TufMetadata, (self.repo, role, version))
            if row is None:
                raise NotFound(f"{role}: no version {version}")
            return row.data.encode()

    def latest(self, role: str) -> bytes:
        """The newest version of ``role``. Raises NotFound."""
        with self.sessions() as s:
            row = self._latest(s, role)
            if row is None:
                raise NotFound(f"{role}: none yet")
            return row.data.encode()

    def timestamp(self) -> bytes:
        """The newest timestamp, first re-signing snapshot and timestamp when they are past half their
        lifetime. Raises NotFound before the first targets."""
        with self.sessions() as s:
            ts = self._latest(s, Timestamp.type)
            sn = self._latest(s, Snapshot.type)
            if ts is None or sn is None:
                raise NotFound("timestamp: none yet (the operator has not published targets)")
            now = self.clock()
            if not (self._stale(sn, Snapshot.type, now) or self._stale(ts, Timestamp.type, now)):
                return ts.data.encode()
        with self.sessions.begin() as s:
            self._lock(s)
            now = self.clock()
            sn, ts = self._latest(s, Snapshot.type), self._latest(s, Timestamp.type)
            assert sn is not None and ts is not None  # only ever added
            new_snapshot = self._stale(sn, Snapshot.type, now)
            if new_snapshot:
                targets = self._latest(s, Targets.type)
                assert targets is not None
                sn = self._sign_snapshot(s, targets.version, sn.version + 1, now)
            if new_snapshot or self._stale(ts, Timestamp.type, now):
                ts = self._sign_timestamp(s, sn, ts.version + 1, now)
            return ts.data.encode()

    def _stale(self, row: TufMetadata, role: str, now: datetime) -> bool:
        return row.expires - now < self.expiries[role] / 2

    # operator uploads ------------------------------------------------------------------------------

    def put_root(self, data: bytes, actor: str) -> int:
        """Accept a new root: version current + 1, signed by a threshold of the current root's keys and of
        its own, naming this server's online keys for snapshot and timestamp. Returns its version.
        Raises TrustError (``conflict`` for a version that is not the next)."""
        md = parse_metadata(data, Root.type, Root)
        online = {Snapshot.type: self.keys.snapshot.public_key.keyid,
                  Timestamp.type: self.keys.timestamp.public_key.keyid}
        with self.sessions.begin() as s:
            self._lock(s)
            row = self._latest(s, Root.type)
            current = None if row is None else parse_metadata(row.data.encode(), Root.type, Root).signed
            check_root_update(current, md, self.clock(), online)
            self._add(s, Root.type, md, actor)
            audit(s, actor, "tuf.root", f"tuf:{self.repo}/root", None,
                  {"version": md.signed.version, "expires": md.signed.expires.isoformat()})
        return md.signed.version

    def put_targets(self, data: bytes, actor: str) -> int:
        """Accept new targets: signed by the release key(s) the current root names, version current + 1,
        every target a bundle in the registry with that length and sha256; then sign a new snapshot and
        timestamp. Returns its version. Raises NotFound (no root yet), TrustError, RegistryMismatch."""
        md = parse_metadata(data, Targets.type, Targets)
        with self.sessions.begin() as s:
            self._lock(s)
            row = self._latest(s, Root.type)
            if row is None:
                raise NotFound("root: none yet; publish one with `edgefleet keys init --server URL`")
            root = parse_metadata(row.data.encode(), Root.type, Root).signed
            now = self.clock()
            current = self._latest(s, Targets.type)
            check_targets_update(root, current.version if current else 0, md, now)
            _check_registry(s, md.signed)
            self._add(s, Targets.type, md, actor)
            sn_row = self._latest(s, Snapshot.type)
            ts_row = self._latest(s, Timestamp.type)
            sn = self._sign_snapshot(s, md.signed.version, (sn_row.version if sn_row else 0) + 1, now)
            self._sign_timestamp(s, sn, (ts_row.version if ts_row else 0) + 1, now)
            audit(s, actor, "tuf.targets", f"tuf:{self.repo}/targets", None,
                  {"version": md.signed.version, "targets": sorted(md.signed.targets)})
        return md.signed.version

    # online signing --------------------------------------------------------------------------------

    def _sign_snapshot(self, s: Session, targets_version: int, version: int, now: datetime) -> TufMetadata:
        snap = Snapshot(version=version, expires=expiry_from(now, Snapshot.type, self.expiries),
                        meta={"targets.json": MetaFile(version=targets_version)})
        md = Metadata(snap)
        md.sign(self.keys.snapshot)
        return self._add(s, Snapshot.type, md, "server (online snapshot key)")

    def _sign_timestamp(self, s: Session, snapshot: TufMetadata, version: int, now: datetime) -> TufMetadata:
        raw = snapshot.data.encode()
        meta = MetaFile(version=snapshot.version, length=len(raw), hashes={"sha256": hashlib.sha256(raw).hexdigest()})
        md = Metadata(Timestamp(version=version, expires=expiry_from(now, Timestamp.type, self.expiries),
                                snapshot_meta=meta))
        md.sign(self.keys.timestamp)
        return self._add(s, Timestamp.type, md, "server (online timestamp key)")

    def _add(self, s: Session, role: str, md: Metadata[Any], actor: str) -> TufMetadata:
        row = TufMetadata(repo=self.repo, role=role, version=md.signed.version, data=canonical_bytes(md).decode(),
                          expires=md.signed.expires, created_at=utcnow(), created_by=actor[:160])
        s.add(row)
        s.flush()
        return row

    def _lock(self, s: Session) -> None:
        """Serialize changes to this repository until the transaction ends (its first statement)."""
        lock_repo(s, self.repo)


def lock_repo(s: Session, repo: str) -> None:
    """Serialize changes to repository ``repo`` until ``s``'s transaction ends (PostgreSQL: an advisory
    transaction lock; SQLite: its single write lock)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"),
                  {"a": 0x7475, "b": zlib.crc32(repo.encode()) - (1 << 31)})
    else:  # SQLite: a write statement takes the database's single write lock until commit
        s.execute(text("UPDATE tuf_metadata SET version = version WHERE 0 = 1"))


def listing_version(s: Session, path: str) -> int | None:
    """The version of the newest image targets when they list ``path`` (NAME-VERSION.efb), else None."""
    import json

    row = s.scalars(select(TufMetadata).where(TufMetadata.repo == IMAGE, TufMetadata.role == Targets.type)
                    .order_by(TufMetadata.version.desc()).limit(1)).first()
    if row is None or path not in json.loads(row.data)["signed"]["targets"]:
        return None
    return int(row.version)


def _check_registry(s: Session, targets: Targets) -> None:
    """Every target must be a committed bundle NAME-VERSION.efb with that length and sha256 (the rows
    are read in a few batched queries, not one per target)."""
    wanted: dict[str, str] = {}
    for path, info in targets.targets.items():
        sha = info.hashes.get("sha256")
        if sha is None:
            raise RegistryMismatch(f"signed.targets.{path}.hashes: a sha256 is required",
                                   f"signed.targets.{path}.hashes")
        wanted[path] = sha
    sizes: dict[tuple[str, str], int] = {}
    shas = sorted(set(wanted.values()))
    for i in range(0, len(shas), _BATCH):
        for name, version, sha, length in s.execute(
            select(ModelVersion.name, ModelVersion.version, ModelVersion.sha256, ModelVersion.size)
            .where(ModelVersion.sha256.in_(shas[i:i + _BATCH]))
        ):
            sizes[(target_path(name, version), sha)] = length
    for path, info in targets.targets.items():
        where = f"signed.targets.{path}"
        size = sizes.get((path, wanted[path]))
        if size is None:
            raise RegistryMismatch(
                f"{where}: no bundle {path} with sha256 {wanted[path]} in the registry; push the bundle first", where)
        if size != info.length:
            raise RegistryMismatch(
                f"{where}.length: {info.length}, but the registry's {path} is {size} bytes", f"{where}.length")
