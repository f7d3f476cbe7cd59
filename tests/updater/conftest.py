"""Fixtures of the updater's end-to-end tests (see ``_fleet.py`` beside this file).

* ``update_models`` (session): one bundle of every kind of ``make_update_models.build`` (``good``
  1.0.0, ``good2`` 2.0.0, ``slow`` 3.0.0, ``big`` 5.0.0, ``bad_selftest`` 6.0.0,
  ``errors_in_probation`` 7.0.0, all of model ``digits``), built once (about a second).
* ``make_bundle`` (session): ``make_bundle(kind, version)`` -> a bundle of any kind at any version,
  built once per (kind, version) and session.
* ``fleet`` (per test): a started :class:`Fleet` (server process on SQLite, keyring published) in the
  test's folder; everything it started is stopped after the test, pass or fail.

Import the harness as ``from updater._fleet import ...`` (``tests/`` is on the path): a bare
``_fleet`` is ``tests/server/_fleet.py``, which some tests here put on ``sys.path`` too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from updater._fleet import Fleet, models


@pytest.fixture(scope="session")
def update_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    built: dict[str, Path] = models.build(tmp_path_factory.mktemp("update-models"))
    return built


@pytest.fixture(scope="session")
def make_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    made: dict[tuple[str, str], Path] = {}

    def make(kind: str, version: str) -> Path:
        if (kind, version) not in made:
            made[kind, version] = models.bundle(kind, version, tmp_path_factory.mktemp(f"{kind}-{version}"))
        return made[kind, version]

    return make


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path / "fleet")
    try:
        yield f.start()
    finally:
        f.close()
