"""Shared fixtures: the committed models (made by tests/fixtures/make_models.py) and their data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import MODELS
from hypothesis import settings

# No per-example deadline: the suite shares 2 cores between two xdist workers and the servers they
# start, and a slow example is not a failure (speed is measured in bench/, never asserted in a test).
settings.register_profile("edgefleet", deadline=None)
settings.load_profile("edgefleet")


# The files that take longest (a clean-clone CI run of 2026-12-01: minutes each), first: the Makefile runs
# the suite in two xdist workers a file at a time, in this order (--no-loadscope-reorder; xdist's own
# order, most tests first, left the few-test fleet files to run alone at the end). The two files of
# 200 and 40 simulated devices sit first and third, so one worker runs them one after the other.
HEAVY_FIRST = (
    "rollouts/test_scenarios.py",
    "test_docs_container.py",
    "rollouts/test_operations.py",
    "updater/test_crashes.py",
    "test_docs_demo.py",
    "test_docs.py",
    "test_install.py",
    "test_cli.py",
    "server/test_schemathesis.py",
    "telemetry/test_outage_server.py",
    "updater/test_bad_models.py",
    "server/test_process.py",
)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::", 1)[0].removeprefix("tests/")
        return HEAVY_FIRST.index(path) if path in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the rest, pytest's order stays


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Say up front which optional converter frameworks are missing, and how to get them."""
    missing = [m for m in ("tensorflow", "torch") if importlib.util.find_spec(m) is None]
    if not missing:
        return ["converter frameworks: tensorflow and torch installed"]
    how = "CI=true: their tests fail" if os.environ.get("CI") == "true" else "their tests skip; `make test-full` runs them"
    return [f"converter frameworks missing: {', '.join(missing)} ({how})"]


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def holdout() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(MODELS / "digits_holdout.npz") as z:
        return z["x"], z["y"]
