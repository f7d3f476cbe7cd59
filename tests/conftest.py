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
