"""Shared fixtures: a private cache for tiny weights (built once per test session) and loaded pipelines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_CACHE = Path(tempfile.mkdtemp(prefix="sdaot-test-cache-"))
os.environ.setdefault("SDAOT_CACHE", str(_CACHE))


@pytest.fixture(scope="session")
def pipelines():
    """Load each model's tiny pipeline once per session: pipelines(name, refiner=False)."""
    from sdaot.runtime.loader import load_pipeline

    loaded = {}

    def get(name: str, refiner: bool = False):
        key = (name, refiner)
        if key not in loaded:
            loaded[key] = load_pipeline(name, "tiny", with_refiner=refiner)
        return loaded[key]

    return get
