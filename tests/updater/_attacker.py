"""The attacker of ``test_attacks_server.py``: someone who holds the fleet server's whole data directory
(its SQLite database, its blobs and its online TUF keys: snapshot, timestamp, director-targets) and
none of the operator's offline keys (root, release).

:class:`Attacker` opens ``DATA/edgefleet.db`` beside the running server (WAL: both write, one at a time)
and ``DATA/tuf/*.key``, and writes what the server would serve from then on: ``tuf_metadata`` rows
signed with the ONLINE keys (:meth:`Attacker.sign_targets`, :meth:`Attacker.sign_snapshot`,
:meth:`Attacker.sign_timestamp`, or raw bytes under any version with :meth:`Attacker.store_raw`),
registry rows and blobs (:meth:`Attacker.add_bundle` skips the upload's bundle check,
:meth:`Attacker.tamper_registry` rewrites a bundle's sha256 or size) and assignments
(:meth:`Attacker.assign`, which signs the device's director metadata with the server's own code and the
stolen director key, and moves its check-in ETag, so the device hears of it at once).

Everything is re-signed so that it looks consistent to a naive client: new snapshot and timestamp with
versions above everything the server ever signed. The operator's keyring is never read here (the one
attack that needs a stolen root key reads it itself, in the test).
"""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer  # type: ignore[attr-defined]
from sqlalchemy import delete, func, select, update
from tuf.api.metadata import (  # type: ignore[attr-defined]
    Metadata,
    MetaFile,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from edgefleet.bundle import read_manifest
from edgefleet.server.blobs import BlobStore
from edgefleet.server.db import make_engine, make_sessionmaker
from edgefleet.server.desired import refresh_etag
from edgefleet.server.models import Assignment, ModelVersion, TufMetadata, upsert_insert, utcnow
from edgefleet.server.tuf.director import DirectorRepository
from edgefleet.server.tuf.keys import load_online_keys
from edgefleet.tufmeta import canonical_bytes, expiry_from

__all__ = ["IMAGE", "Attacker"]

IMAGE = "image"
ACTOR = "attacker (stolen data directory)"


class Attacker:
    """The server's data folder ``data_dir`` in the attacker's hands (the server may keep running)."""

    def __init__(self, data_dir: Path) -> None:
        self.data = data_dir
        self.keys = load_online_keys(data_dir)
        self.engine = make_engine(f"sqlite:///{(data_dir / 'edgefleet.db').resolve()}")
        self.sessions = make_sessionmaker(self.engine)
        self.blobs = BlobStore(data_dir)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Attacker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def online_signers(self) -> list[Signer]:
        """Every key the server holds: what a forged release signature can at best be made with."""
        return [self.keys.snapshot, self.keys.timestamp, self.keys.director_targets]

    # reading ---------------------------------------------------------------------------------------

    def latest_version(self, role: str, repo: str = IMAGE) -> int:
        """The highest version of ``role`` in ``repo`` the database holds (0: none)."""
        with self.sessions() as s:
            v = s.scalar(select(func.max(TufMetadata.version)).where(TufMetadata.repo == repo,
                                                                     TufMetadata.role == role))
        return int(v or 0)

    def raw(self, role: str, version: int, repo: str = IMAGE) -> bytes:
        """The bytes served as ``{version}.{role}.json``."""
        with self.sessions() as s:
            row = s.get(TufMetadata, (repo, role, version))
            assert row is not None, f"{repo}: no {role} version {version}"
            return row.data.encode()

    def metadata(self, role: str, version: int, repo: str = IMAGE) -> Metadata[Any]:
        return Metadata.from_bytes(self.raw(role, version, repo))

    # writing metadata ------------------------------------------------------------------------------

    def store(self, md: Metadata[Any], repo: str = IMAGE) -> int:
        """Insert ``md`` as the row its role and version name; returns the version."""
        data = canonical_bytes(md)
        self.store_raw(md.signed.type, md.signed.version, data, md.signed.expires, repo)
        return int(md.signed.version)

    def store_raw(self, role: str, version: int, data: bytes, expires: datetime, repo: str = IMAGE) -> None:
        """Insert ``data`` as ``{version}.{role}.json`` of ``repo``, whatever the bytes say inside."""
        with self.sessions.begin() as s:
            s.add(TufMetadata(repo=repo, role=role, version=version, data=data.decode(), expires=expires,
                              created_at=utcnow(), created_by=ACTOR))

    def delete(self, role: str, versions: Iterable[int], repo: str = IMAGE) -> None:
        """Remove versions of ``role`` (the server then serves the older ones as the newest)."""
        with self.sessions.begin() as s:
            s.execute(delete(TufMetadata).where(TufMetadata.repo == repo, TufMetadata.role == role,
                                                TufMetadata.version.in_(list(versions))))

    def sign_targets(self, add: Sequence[Path] = (), signers: Sequence[Signer] | None = None) -> int:
        """Image targets ``latest + 1``: the newest ones plus the bundles ``add``, signed by ``signers``
        (default: every online key; the release key is not the server's to use). Returns the version."""
        current = self.metadata(Targets.type, self.latest_version(Targets.type))
        targets: Targets = copy.deepcopy(current.signed)
        targets.version += 1
        targets.expires = expiry_from(datetime.now(UTC), Targets.type)
        for b in add:
            targets.targets[b.name] = TargetFile.from_file(b.name, str(b), ["sha256"])
        md: Metadata[Targets] = Metadata(targets)
        for signer in signers if signers is not None else self.online_signers:
            md.sign(signer, append=True)
        return self.store(md)

    def sign_snapshot(self, targets_version: int, length: int | None = None,
                      hashes: dict[str, str] | None = None) -> int:
        """Image snapshot ``latest + 1`` naming targets ``targets_version`` (with ``length`` and ``hashes``
        when given), signed by the online snapshot key. Returns its version."""
        snap = Snapshot(version=self.latest_version(Snapshot.type) + 1,
                        expires=expiry_from(datetime.now(UTC), Snapshot.type),
                        meta={"targets.json": MetaFile(version=targets_version, length=length, hashes=hashes)})
        md: Metadata[Snapshot] = Metadata(snap)
        md.sign(self.keys.snapshot)
        return self.store(md)

    def sign_timestamp(self) -> int:
        """Image timestamp ``latest + 1`` naming the newest snapshot (version, length, sha256) as the
        server's own do, signed by the online timestamp key. Returns its version."""
        version = self.latest_version(Snapshot.type)
        raw = self.raw(Snapshot.type, version)
        meta = MetaFile(version=version, length=len(raw), hashes={"sha256": hashlib.sha256(raw).hexdigest()})
        md: Metadata[Timestamp] = Metadata(Timestamp(version=self.latest_version(Timestamp.type) + 1,
                                                     expires=expiry_from(datetime.now(UTC), Timestamp.type),
                                                     snapshot_meta=meta))
        md.sign(self.keys.timestamp)
        return self.store(md)

    def republish(self, targets_version: int, length: int | None = None,
                  hashes: dict[str, str] | None = None) -> int:
        """A new snapshot naming ``targets_version`` and a timestamp naming it; returns the snapshot's
        version."""
        version = self.sign_snapshot(targets_version, length, hashes)
        self.sign_timestamp()
        return version

    # registry and assignments ----------------------------------------------------------------------

    def add_bundle(self, path: Path, name: str | None = None, version: str | None = None,
                   manifest: dict[str, Any] | None = None) -> int:
        """Put ``path`` into the blob store and the registry as NAME-VERSION (default: its manifest's;
        give ``manifest`` for a file whose own cannot be read), without the upload's checks. Returns
        the row's id."""
        if manifest is None:
            manifest = read_manifest(path).model_dump(mode="json")
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        self.place_blob(path)
        with self.sessions.begin() as s:
            row = ModelVersion(name=name or manifest["name"], version=version or manifest["version"],
                               runtime=str(manifest.get("runtime", "onnx")), sha256=sha, size=len(data),
                               manifest=manifest, created_at=utcnow(), created_by=ACTOR)
            s.add(row)
            s.flush()
            return int(row.id)

    def place_blob(self, path: Path) -> str:
        """Copy ``path`` into ``DATA/blobs`` under its sha256 (as the server stores blobs: 0400); returns
        the sha256."""
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        dest = self.blobs.path(sha)
        if not dest.is_file():
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = dest.with_name(f".{sha}.tmp")
            shutil.copyfile(path, tmp)
            os.chmod(tmp, 0o400)
            os.replace(tmp, dest)
        return sha

    def registry_row(self, name: str, version: str) -> tuple[str, int]:
        """The registry's (sha256, size) of NAME VERSION."""
        with self.sessions() as s:
            row = s.scalar(select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version))
            assert row is not None, f"registry: no {name} {version}"
            return row.sha256, int(row.size)

    def tamper_registry(self, name: str, version: str, sha256: str | None = None, size: int | None = None) -> None:
        """Rewrite the registry's sha256 and/or size of NAME VERSION (what director targets are signed from)."""
        values: dict[str, Any] = {}
        if sha256 is not None:
            values["sha256"] = sha256
        if size is not None:
            values["size"] = size
        with self.sessions.begin() as s:
            s.execute(update(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
                      .values(**values))

    def assign(self, device_id: str, name: str, version: str) -> str:
        """Make NAME VERSION the device's assignment in the database, then sign its director targets,
        snapshot and timestamp with the stolen online keys (the server's own signing code) and store the
        new check-in ETag, in one transaction. Returns the ETag."""
        with self.sessions.begin() as s:
            version_id = s.scalar(select(ModelVersion.id).where(ModelVersion.name == name,
                                                                ModelVersion.version == version))
            assert version_id is not None, f"registry: no {name} {version}"
            now, row = utcnow(), {"version_id": version_id, "source": "operator"}
            s.execute(upsert_insert(s, Assignment).values(device_id=device_id, model_name=name, updated_at=now, **row)
                      .on_conflict_do_update(index_elements=[Assignment.device_id, Assignment.model_name],
                                             set_={**row, "updated_at": now}))
            s.flush()
            return refresh_etag(s, device_id, DirectorRepository(self.sessions, self.keys))
