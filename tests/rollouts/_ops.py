"""Fixtures for the operator-side rollout tests (service, API, CLI): the server test fixtures of
tests/server/conftest.py (SQLite and the real PostgreSQL), with the rollout tables emptied too, and
rows made straight in the database where the test is not about how they got there.

Import the fixtures into a test module: ``from rollouts._ops import db_url, fleet  # noqa: F401``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from server.conftest import Fleet, _clean, _migrated, _postgres_schema, make_settings
from sqlalchemy.orm import Session

from edgefleet.server.models import Assignment, Device, ModelVersion

__all__ = ["NOW", "add_device", "add_version", "assign", "clean_rollouts", "db_url", "fleet"]

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        yield from _migrated(f"sqlite:///{tmp_path_factory.mktemp('db') / 'edgefleet.db'}")
    else:
        for url in _postgres_schema():
            yield from _migrated(url)


def clean_rollouts(url: str) -> None:
    """Empty every table tests/server/conftest.py empties (the rollout tables first: they hold versions)."""
    _clean(url)


@pytest.fixture
def fleet(db_url: str, tmp_path: Path) -> Iterator[Fleet]:
    """A server app over a TestClient (as tests/server's ``fleet``), on emptied tables."""
    from fastapi.testclient import TestClient

    from edgefleet.server.app import create_app
    from edgefleet.server.state import init_server, open_state

    clean_rollouts(db_url)
    settings = make_settings(db_url, tmp_path / "data", rollout_enabled=False) if _has_setting(
        "rollout_enabled") else make_settings(db_url, tmp_path / "data")
    admin = init_server(settings)
    state = open_state(settings, run_migrations=False)
    with TestClient(create_app(settings, state), base_url="http://testserver") as client:
        yield Fleet(client, state, settings, admin)
    state.loop_db.close()
    state.engine.dispose()
    clean_rollouts(db_url)


def _has_setting(name: str) -> bool:
    from edgefleet.server.settings import Settings

    return name in Settings.model_fields


def add_device(s: Session, device_id: str, tags: list[str] | None = None, *, revoked: bool = False) -> Device:
    d = Device(
        id=device_id, tags=sorted(tags or []), cert_serial="00", cert_pem="-", cert_not_after=NOW, enrolled_at=NOW,
        enrollment_token_id=None, revoked_at=NOW if revoked else None, last_seen=NOW, reported_at=None,
        agent_version=None, hardware_profile=None, running=[], desired_etag="-", update_state=None,
    )
    s.add(d)
    s.flush()
    return d


def add_version(s: Session, name: str, version: str) -> ModelVersion:
    v = ModelVersion(
        name=name, version=version, runtime="onnx", sha256=hashlib.sha256(f"{name}{version}".encode()).hexdigest(),
        size=1, manifest={}, created_at=NOW, created_by="test",
    )
    s.add(v)
    s.flush()
    return v


def assign(s: Session, device_id: str, v: ModelVersion, source: str = "operator") -> None:
    s.merge(Assignment(device_id=device_id, model_name=v.name, version_id=v.id, source=source, updated_at=NOW,
                       shadow_version_id=None))
    s.flush()


def members(s: Session, rollout_id: int) -> dict[str, Any]:
    from sqlalchemy import select

    from edgefleet.server.models import RolloutMember

    return {m.device_id: m for m in s.scalars(select(RolloutMember).where(RolloutMember.rollout_id == rollout_id))}
