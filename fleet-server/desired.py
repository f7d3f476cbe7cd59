"""A device's desired state (which model versions it should run) and its check-in ETag.

The ETag lives on the device row, written in the same transaction as every assignment change, so a
check-in with an unchanged state compares two strings and reads nothing else. It is ``ts-N``: the
version N of the device's director ``timestamp.json`` signed with those assignments (see
:meth:`edgefleet.server.tuf.director.DirectorRepository.sign_assignments`), so the ETag names exactly
the director metadata the device will fetch; the director's own re-signing past half a lifetime writes
it too. While the server has no director root (or no online keys) it is a hash of the desired state,
as before TUF. ``version_in_use`` is the hook that refuses to delete a version something still needs
(assignments now; rollouts will add to it).
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, aliased

from edgefleet.server.models import Assignment, Device, ModelVersion, Rollout, RolloutMember

if TYPE_CHECKING:  # the director writes the ETag through store_etag: no import cycle at run time
    from edgefleet.server.tuf.director import DirectorRepository

__all__ = [
    "desired_state",
    "etag_of",
    "refresh_etag",
    "store_etag",
    "timestamp_etag",
    "timestamp_version",
    "version_in_use",
]

_TS = "ts-"


def timestamp_etag(version: int) -> str:
    """The check-in ETag naming director timestamp ``version``: ``ts-17``."""
    return f"{_TS}{version}"


def timestamp_version(etag: str | None) -> int | None:
    """The director timestamp version an ETag names, or None for a hash ETag (no director yet)."""
    if etag is None or not etag.startswith(_TS) or not etag[len(_TS):].isdigit():
        return None
    return int(etag[len(_TS):])


def _models(s: Session, device_id: str) -> list[dict[str, Any]]:
    shadow = aliased(ModelVersion)
    rows = s.execute(
        select(Assignment.model_name, ModelVersion.version, ModelVersion.sha256, ModelVersion.size, Assignment.source,
               shadow.version, shadow.sha256, shadow.size)
        .join(ModelVersion, ModelVersion.id == Assignment.version_id)
        .outerjoin(shadow, shadow.id == Assignment.shadow_version_id)
        .where(Assignment.device_id == device_id)
        .order_by(Assignment.model_name)
    ).all()
    out: list[dict[str, Any]] = []
    for name, version, sha, size, source, s_version, s_sha, s_size in rows:
        m: dict[str, Any] = {"name": name, "version": version, "sha256": sha, "size": size,
                             "url": f"/api/v1/blobs/{sha}", "source": source}
        if s_version is not None:  # only then: a state without shadows hashes as it did before them
            m["shadow"] = {"version": s_version, "sha256": s_sha, "size": s_size, "url": f"/api/v1/blobs/{s_sha}"}
        out.append(m)
    return out


def desired_state(s: Session, device_id: str, etag: str | None) -> dict[str, Any]:
    """The check-in body: the assigned models and ``director_timestamp_version``, the director timestamp
    the ETag ``etag`` names (None before the director). Read after the ETag, the models may already be
    newer than it: the device then gets a new ETag on its next check-in, never an older body."""
    return {"device_id": device_id, "models": _models(s, device_id),
            "director_timestamp_version": timestamp_version(etag)}


def etag_of(state: dict[str, Any]) -> str:
    """The hash ETag of ``{"device_id", "models"}`` (what enrollment stores for a device with nothing)."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def store_etag(s: Session, device_id: str, etag: str) -> None:
    """Write the device's check-in ETag (in the caller's transaction)."""
    s.execute(update(Device).where(Device.id == device_id).values(desired_etag=etag))


def refresh_etag(s: Session, device_id: str, director: DirectorRepository | None = None) -> str:
    """After an assignment change in ``s`` (flushed, not committed): sign the device's director metadata
    in that same transaction and store ``ts-N`` as its ETag; with no ``director`` (no online keys) or no
    director root yet, store the hash of the desired state. Returns the ETag."""
    if director is not None:
        version = director.sign_assignments(s, device_id)
        if version is not None:
            return timestamp_etag(version)
    etag = etag_of({"device_id": device_id, "models": _models(s, device_id)})
    store_etag(s, device_id, etag)
    return etag


def version_in_use(s: Session, version_id: int) -> str | None:
    """Why a version cannot be deleted, or None when nothing uses it: an assignment (served or shadow),
    an active rollout of it, or a rollout member's previous version (what an abort restores)."""
    n = s.scalar(select(func.count()).select_from(Assignment).where(
        or_(Assignment.version_id == version_id, Assignment.shadow_version_id == version_id))) or 0
    if n:
        return f"assigned to {n} device(s) (by an operator or a rollout)"
    active = ("running", "paused")
    r = s.scalar(select(Rollout.id).where(
        or_(Rollout.version_id == version_id, Rollout.version_b_id == version_id), Rollout.state.in_(active)).limit(1))
    if r is not None:
        return f"rolled out by rollout {r}"
    r = s.scalar(select(RolloutMember.rollout_id).join(Rollout, Rollout.id == RolloutMember.rollout_id).where(
        RolloutMember.previous_version_id == version_id, Rollout.state.in_(active)).limit(1))
    if r is not None:
        return f"the version rollout {r} rolls back to"
    return None
