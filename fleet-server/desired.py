"""A device's desired state (which model versions it should run) and its ETag.

The ETag is a hash of the desired state, stored on the device row whenever an assignment changes, so a
check-in with an unchanged state compares two strings and reads nothing else. ``version_in_use`` is the
hook that refuses to delete a version something still needs (assignments now; rollouts will add to it).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from edgefleet.server.models import Assignment, Device, ModelVersion

__all__ = ["desired_state", "etag_of", "refresh_etag", "version_in_use"]


def desired_state(s: Session, device_id: str) -> dict[str, Any]:
    rows = s.execute(
        select(Assignment.model_name, ModelVersion.version, ModelVersion.sha256, ModelVersion.size, Assignment.source)
        .join(ModelVersion, ModelVersion.id == Assignment.version_id)
        .where(Assignment.device_id == device_id)
        .order_by(Assignment.model_name)
    ).all()
    models = [
        {
            "name": name,
            "version": version,
            "sha256": sha,
            "size": size,
            "url": f"/api/v1/blobs/{sha}",
            "source": source,
        }
        for name, version, sha, size, source in rows
    ]
    return {"device_id": device_id, "models": models}


def etag_of(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def refresh_etag(s: Session, device_id: str) -> str:
    """Recompute and store the device's desired-state ETag (in the caller's transaction)."""
    etag = etag_of(desired_state(s, device_id))
    s.execute(update(Device).where(Device.id == device_id).values(desired_etag=etag))
    return etag


def version_in_use(s: Session, version_id: int) -> str | None:
    """Why a version cannot be deleted, or None when nothing uses it."""
    n = s.scalar(select(func.count()).select_from(Assignment).where(Assignment.version_id == version_id)) or 0
    if n:
        return f"assigned to {n} device(s) (by an operator or a rollout)"
    return None
