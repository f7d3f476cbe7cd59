"""Helpers for the controller-side rollout tests (collect, controller, replicas): rollouts, members,
telemetry rollups and device events written straight into the database (what creation, ingestion
and check-ins write), and an injected clock."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefleet.server.models import (
    LATENCY_BUCKETS,
    DeviceEvent,
    ModelVersion,
    Rollout,
    RolloutMember,
    TelemetryRollup,
    TelemetryShadowRollup,
)
from edgefleet.server.rollouts.codec import gates_to_json
from edgefleet.server.rollouts.judge import initial_phase
from edgefleet.server.rollouts.types import Gates

__all__ = ["Clock", "add_event", "add_rollup", "add_shadow_rollup", "make_rollout", "sha_of"]


class Clock:
    """The controller's clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def sha_of(s: Session, model: str, version: str) -> str:
    sha = s.scalar(select(ModelVersion.sha256).where(ModelVersion.name == model, ModelVersion.version == version))
    assert sha is not None
    return sha


def make_rollout(s: Session, model: str, version: ModelVersion, device_ids: Sequence[str], gates: Gates,
                 now: datetime, previous: ModelVersion | None, *, statuses: dict[str, str] | None = None,
                 arms: dict[str, str] | None = None, version_b: ModelVersion | None = None) -> Rollout:
    """A running rollout at stage 0 whose members rank in the order given (status waiting unless
    ``statuses`` says), each recorded with ``previous`` as an operator's assignment."""
    r = Rollout(model=model, version_id=version.id, version_b_id=version_b.id if version_b else None, tags=[],
                gates=gates_to_json(gates), state="running", stage=0, phase=initial_phase(gates),
                stage_started_at=now, phase_started_at=now, state_version=0, reason="", last_gates=[],
                last_judged_at=None, created_at=now, created_by="test", updated_at=now, ended_at=None)
    s.add(r)
    s.flush()
    for rank, dev in enumerate(device_ids):
        s.add(RolloutMember(rollout_id=r.id, device_id=dev, rank=rank, arm=(arms or {}).get(dev, "a"),
                            status=(statuses or {}).get(dev, "waiting"),
                            previous_version_id=previous.id if previous else None,
                            previous_source="operator" if previous else None, assigned_at=None, updated_at=None,
                            detail=""))
    s.flush()
    return r


def add_rollup(s: Session, device_id: str, model: str, version: str, bucket: int, *, inferences: int,
               errors: int = 0, lat: Sequence[int] | None = None, psi_max: float | None = None,
               accuracy_wsum: float = 0.0, accuracy_window: int = 0) -> None:
    counts = list(lat) if lat is not None else [0] * LATENCY_BUCKETS
    assert len(counts) == LATENCY_BUCKETS
    row: dict[str, Any] = {f"lat{i:02d}": c for i, c in enumerate(counts)}
    s.add(TelemetryRollup(device_id=device_id, model=model, version=version, bucket=bucket, reports=1,
                          inferences=inferences, errors=errors, latency_sum=0.0, drift_reports=0, drift_samples=0,
                          psi_max=psi_max, psi_mean_wsum=0.0, mean_shift_max=None, std_ratio_max=None,
                          accuracy_wsum=accuracy_wsum, accuracy_window=accuracy_window, **row))


def add_shadow_rollup(s: Session, device_id: str, model: str, version: str, candidate: str, bucket: int, *,
                      compared: int, agreed: int) -> None:
    s.add(TelemetryShadowRollup(device_id=device_id, model=model, version=version, candidate=candidate,
                                bucket=bucket, compared=compared, agreed=agreed, skipped=0, abs_error_sum=0.0))


def add_event(s: Session, device_id: str, kind: str, at: datetime, **data: Any) -> None:
    s.add(DeviceEvent(device_id=device_id, seq=None, at=at, received_at=at, kind=kind, data=data))


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
