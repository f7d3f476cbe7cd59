"""Server test fixtures: every test runs on SQLite and on the real PostgreSQL (127.0.0.1:5432, database
``test``, a fresh schema per session, dropped after). PostgreSQL unreachable: skipped, but failed when
CI=true."""

from __future__ import annotations

import os
import secrets
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file (_fleet.py)
from _fleet import SimDevice, enroll, publish_roots

warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient`")
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import text  # noqa: E402

from edgefleet.server.app import create_app  # noqa: E402
from edgefleet.server.db import make_engine, migrate  # noqa: E402
from edgefleet.server.settings import Settings  # noqa: E402
from edgefleet.server.state import ServerState, init_server, open_state  # noqa: E402

PG_ADMIN = os.environ.get("EDGEFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
TABLES = (
    "rollout_members",
    "rollouts",
    "controller_leases",
    "telemetry_shadow_rollups",
    "device_events",
    "assignments",
    "audit_log",
    "devices",
    "model_versions",
    "enrollment_tokens",
    "api_tokens",
    "server_secrets",
    "tuf_metadata",
)


def _postgres_schema() -> Iterator[str]:
    import psycopg

    plain = PG_ADMIN.replace("postgresql+psycopg://", "postgresql://")
    try:
        conn = psycopg.connect(plain, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL at {plain} unreachable: {str(e).splitlines()[0]}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"ef_test_{secrets.token_hex(4)}"
    with conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        try:
            yield f"{PG_ADMIN}?options=-csearch_path%3D{schema}"
        finally:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'edgefleet.db'}"
        yield from _migrated(url)
    else:
        for url in _postgres_schema():
            yield from _migrated(url)


def _migrated(url: str) -> Iterator[str]:
    engine = make_engine(url)
    migrate(engine)
    engine.dispose()
    yield url


@dataclass
class Fleet:
    client: TestClient
    state: ServerState
    settings: Settings
    admin: str
    keyring: Any = None  # the operator keyring that published the roots enrollment needs (see enrollment_token)

    def auth(self, token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    @property
    def admin_h(self) -> dict[str, str]:
        return self.auth(self.admin)

    def api_token(self, role: str) -> str:
        r = self.client.post("/api/v1/tokens", json={"name": f"{role}-x", "role": role}, headers=self.admin_h)
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

    def enrollment_token(self, **body: Any) -> str:
        """A new enrollment token; first publishes the image and director roots the server lacks (it
        refuses enrollment without them), so a test that publishes its own keeps them."""
        self.keyring = publish_roots(self.client, self.admin_h, self.settings.data_dir.parent / "fleet-keyring")
        r = self.client.post("/api/v1/enrollment-tokens", json=body, headers=self.admin_h)
        assert r.status_code == 201, r.text
        token: str = r.json()["token"]
        return token

    def device(self, tags: list[str] | None = None) -> SimDevice:
        d = enroll(self.client, self.enrollment_token(tags=tags or []))
        d.authenticate()
        return d

    def upload(self, bundle: Path, token: str | None = None) -> Any:
        return self.client.post("/api/v1/models", content=bundle.read_bytes(), headers=self.auth(token or self.admin))


def make_settings(db_url: str, data_dir: Path, **extra: Any) -> Settings:
    return Settings(data_dir=data_dir, db_url=db_url, allow_plain_http_devices=True, migrate_on_start=False, **extra)


def _clean(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.begin() as c:
        for t in TABLES:
            c.execute(text(f"DELETE FROM {t}"))
    engine.dispose()


@pytest.fixture
def clean_db(db_url: str) -> str:
    """The session's database, emptied (schema kept)."""
    _clean(db_url)
    return db_url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL schema of its own, migrated, for tests that only make sense there."""
    for url in _postgres_schema():
        yield from _migrated(url)


@pytest.fixture
def clean_postgres(postgres_url: str) -> str:
    """That PostgreSQL schema, emptied."""
    _clean(postgres_url)
    return postgres_url


@pytest.fixture
def fleet(db_url: str, tmp_path: Path) -> Iterator[Fleet]:
    _clean(db_url)
    settings = make_settings(
        db_url, tmp_path / "data", client_cert_header="x-client-cert", trusted_proxies=["10.9.9.9"]
    )
    admin = init_server(settings)
    state = open_state(settings, run_migrations=False)
    with TestClient(create_app(settings, state), base_url="http://testserver") as client:
        yield Fleet(client, state, settings, admin)
    state.loop_db.close()
    state.engine.dispose()
