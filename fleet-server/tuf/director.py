"""The director repository: one TUF repository per device, listing what that device must run now.

- One director **root**, shared by every device, signed by the operator's offline root keys (``edgefleet
  keys init --server`` publishes it) and naming the server's online ``director-targets``, ``snapshot``
  and ``timestamp`` keys. Stored as repo ``director`` in ``tuf_metadata``.
- Per device (repo ``director/<device_id>``): **targets** listing exactly the bundles of its committed
  assignments (``NAME-VERSION.efb``, length, sha256, ``custom: {"model": NAME, "role": "serve"|"shadow",
  "device": ID}``; a shadow target is a candidate the device runs beside the served version), signed
  online by the director-targets key, then **snapshot** and **timestamp** as in the image repository.

Signing happens in the transaction that changes a device's assignments
(:meth:`DirectorRepository.sign_assignments`, called by ``desired.refresh_etag``), and lazily when a
device's ``timestamp.json`` is read: the targets are re-signed if the assignment set differs from the
newest signed targets (assignments made before the director root existed) or they are past half their
lifetime; snapshot and timestamp follow. Whenever a timestamp is signed, its version becomes the
device's check-in ETag (``ts-N``, on the device row) in the same transaction, so check-in and metadata
agree. The check is repeated under the repository's lock (PostgreSQL advisory lock, SQLite's write
lock), and versions are ``max + 1`` of what the database holds (the primary key refuses a duplicate), so
versions only grow, across restarts and replicas. Methods are blocking: call them from a thread pool.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp  # type: ignore[attr-defined]

from edgefleet.server.desired import store_etag, timestamp_etag
from edgefleet.server.models import Assignment, Device, ModelVersion, TufMetadata, utcnow
from edgefleet.server.state import audit
from edgefleet.server.tuf.keys import OnlineKeys
from edgefleet.server.tuf.repository import ImageRepository, NotFound
from edgefleet.tufmeta import check_root_update, expiry_from, parse_metadata, target_path

__all__ = ["DIRECTOR", "DIRECTOR_EXPIRY", "DirectorRepository", "assigned_targets", "is_assigned"]

DIRECTOR = "director"  # the shared root's repo; each device's is "director/<device_id>"
# Online roles only (root comes from the operator): short, and re-signed once half is gone.
DIRECTOR_EXPIRY: dict[str, timedelta] = {
    Targets.type: timedelta(days=3),
    Snapshot.type: timedelta(days=3),
    Timestamp.type: timedelta(days=1),
}
SERVE = "serve"  # the version the device serves
SHADOW = "shadow"  # a candidate it runs beside the served version on live inputs, never serving it


def assigned_targets(s: Session, device_id: str) -> dict[str, TargetFile]:
    """The targets the device's committed assignments name, by target path: each served version (role
    ``serve``) and each shadow candidate (role ``shadow``)."""
    out: dict[str, TargetFile] = {}
    for role, column in ((SERVE, Assignment.version_id), (SHADOW, Assignment.shadow_version_id)):
        rows = s.execute(
            select(Assignment.model_name, ModelVersion.version, ModelVersion.sha256, ModelVersion.size)
            .join(ModelVersion, ModelVersion.id == column)
            .where(Assignment.device_id == device_id)
        ).all()
        for name, version, sha, size in rows:
            path = target_path(name, version)
            if path in out:
                continue  # a shadow of the served version itself: it is served
            out[path] = TargetFile(length=size, hashes={"sha256": sha}, path=path,
                                   unrecognized_fields={"custom": {"model": name, "role": role, "device": device_id}})
    return out


def is_assigned(s: Session, device_id: str, sha256: str) -> bool:
    """Whether a committed assignment of the device names a bundle with this sha256, served or shadow
    (what any route that sends bundle bytes to a device must check: its director targets name exactly
    these)."""
    return s.scalar(
        select(Assignment.model_name).join(ModelVersion, or_(ModelVersion.id == Assignment.version_id,
                                                             ModelVersion.id == Assignment.shadow_version_id))
        .where(Assignment.device_id == device_id, ModelVersion.sha256 == sha256).limit(1)
    ) is not None


def _same(signed: dict[str, TargetFile], wanted: dict[str, TargetFile]) -> bool:
    return signed.keys() == wanted.keys() and all(signed[p].to_dict() == wanted[p].to_dict() for p in wanted)


class DirectorRepository:
    """The director repositories over ``sessions``; ``expiries`` and ``clock`` are injected for tests."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        keys: OnlineKeys,
        expiries: dict[str, timedelta] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.keys = keys
        self.expiries = {**DIRECTOR_EXPIRY, **(expiries or {})}
        self.clock = clock
        self.root_repo = ImageRepository(sessions, keys, self.expiries, clock, DIRECTOR)

    def device_repo(self, device_id: str) -> ImageRepository:
        """The device's repository: the image repository's storage, locking and online signing."""
        return ImageRepository(self.sessions, self.keys, self.expiries, self.clock, f"{DIRECTOR}/{device_id}")

    def online_keyids(self) -> dict[str, str]:
        return {Targets.type: self.keys.director_targets.public_key.keyid,
                Snapshot.type: self.keys.snapshot.public_key.keyid,
                Timestamp.type: self.keys.timestamp.public_key.keyid}

    # the shared root -------------------------------------------------------------------------------

    def put_root(self, data: bytes, actor: str) -> int:
        """Accept a new director root: version current + 1, signed by a threshold of the current root's
        keys and of its own, naming exactly the server's online director-targets, snapshot and timestamp
        keys. Returns its version. Raises TrustError (``conflict`` for a version that is not the next)."""
        md = parse_metadata(data, Root.type, Root)
        repo = self.root_repo
        with self.sessions.begin() as s:
            repo._lock(s)
            row = repo._latest(s, Root.type)
            current = None if row is None else parse_metadata(row.data.encode(), Root.type, Root).signed
            check_root_update(current, md, self.clock(), self.online_keyids())
            repo._add(s, Root.type, md, actor)
            audit(s, actor, "tuf.director.root", f"tuf:{DIRECTOR}/root", None,
                  {"version": md.signed.version, "expires": md.signed.expires.isoformat()})
        return md.signed.version

    def root(self, version: int) -> bytes:
        """Director root ``version``. Raises NotFound."""
        return self.root_repo.read(Root.type, version)

    # one device ------------------------------------------------------------------------------------

    def read(self, device_id: str, role: str, version: int) -> bytes:
        """The device's stored ``version`` of ``role`` (root: the shared one). Raises NotFound."""
        if role == Root.type:
            return self.root(version)
        return self.device_repo(device_id).read(role, version)

    def timestamp(self, device_id: str) -> bytes:
        """The device's newest timestamp, first signing new targets (its assignments changed, or they are
        past half their lifetime), snapshot and timestamp as needed. Raises NotFound before the director
        root is published or for an unknown device."""
        repo = self.device_repo(device_id)
        with self.sessions() as s:
            ts = self._fresh(s, repo, device_id)
            if ts is not None:
                return ts
        with self.sessions.begin() as s:
            repo._lock(s)
            ts = self._fresh(s, repo, device_id)
            if ts is not None:
                return ts
            return self._resign(s, repo, device_id).data.encode()

    def sign_assignments(self, s: Session, device_id: str) -> int | None:
        """In the caller's transaction ``s``, right after it changed the device's assignments (flushed,
        not committed): take the device repository's lock, sign targets from the assignments as ``s``
        sees them, then snapshot and timestamp, and store ``ts-N`` as the device's check-in ETag; all of
        it commits or rolls back with the change. Returns the timestamp version N, or None when the
        director root is not published yet (nothing signed; the caller keeps a hash ETag)."""
        if self.root_repo._latest(s, Root.type) is None:
            return None
        repo = self.device_repo(device_id)
        repo._lock(s)
        return self._resign(s, repo, device_id).version

    def current_targets_version(self, device_id: str) -> int:
        return self.device_repo(device_id).current_version(Targets.type)

    def _check_exists(self, s: Session, device_id: str) -> None:
        if self.root_repo._latest(s, Root.type) is None:
            raise NotFound("director root: none yet; publish it with `edgefleet keys init --server URL`")
        if s.get(Device, device_id) is None:
            raise NotFound(f"device {device_id}: no such device")

    def _fresh(self, s: Session, repo: ImageRepository, device_id: str) -> bytes | None:
        """The newest timestamp when nothing needs signing, else None."""
        self._check_exists(s, device_id)
        ts, sn, targets = (repo._latest(s, r) for r in (Timestamp.type, Snapshot.type, Targets.type))
        if ts is None or sn is None or targets is None:
            return None
        now = self.clock()
        if repo._stale(targets, Targets.type, now) or repo._stale(sn, Snapshot.type, now) or repo._stale(
                ts, Timestamp.type, now):
            return None
        signed = json.loads(targets.data)["signed"]["targets"]  # our own canonical JSON: no need to rebuild it
        if signed != {p: t.to_dict() for p, t in assigned_targets(s, device_id).items()}:
            return None
        return ts.data.encode()

    def _resign(self, s: Session, repo: ImageRepository, device_id: str) -> TufMetadata:
        """Under the lock: sign what is stale, store the newest timestamp's version as the device's
        check-in ETag, and return that timestamp row."""
        now = self.clock()
        ts, sn, targets = (repo._latest(s, r) for r in (Timestamp.type, Snapshot.type, Targets.type))
        wanted = assigned_targets(s, device_id)
        new_targets = targets is None or repo._stale(targets, Targets.type, now) or not _same(
            parse_metadata(targets.data.encode(), Targets.type, Targets).signed.targets, wanted)
        if new_targets:
            t = Targets(version=(targets.version if targets else 0) + 1,
                        expires=expiry_from(now, Targets.type, self.expiries), targets=wanted)
            md: Metadata[Any] = Metadata(t)
            md.sign(self.keys.director_targets)
            targets = repo._add(s, Targets.type, md, "server (online director key)")
        assert targets is not None
        new_snapshot = new_targets or sn is None or repo._stale(sn, Snapshot.type, now)
        if new_snapshot:
            sn = repo._sign_snapshot(s, targets.version, (sn.version if sn else 0) + 1, now)
        assert sn is not None
        if new_snapshot or ts is None or repo._stale(ts, Timestamp.type, now):
            ts = repo._sign_timestamp(s, sn, (ts.version if ts else 0) + 1, now)
        store_etag(s, device_id, timestamp_etag(ts.version))  # also when nothing was new: a hash ETag goes
        return ts

    def names(self, device_id: str, path: str, sha256: str) -> bool:
        """Whether the device's director targets name ``path`` with that sha256 (from its committed
        assignments: what its next refresh is signed from)."""
        with self.sessions() as s:
            info = assigned_targets(s, device_id).get(path)
        return info is not None and info.hashes.get("sha256") == sha256
