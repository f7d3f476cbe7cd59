"""Shared fixtures: the committed models (made by tests/fixtures/make_models.py) and their data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _support import MODELS


@pytest.fixture(scope="session")
def models_dir() -> Path:
    return MODELS


@pytest.fixture(scope="session")
def holdout() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(MODELS / "digits_holdout.npz") as z:
        return z["x"], z["y"]
