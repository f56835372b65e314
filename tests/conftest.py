"""Shared fixtures: a private cache for tiny weights (built once per test session) and loaded pipelines."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

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


FAMILIES = ["SD1.5", "SD2", "SDXL1.0-base"]


@pytest.fixture(scope="session")
def compiled_root(tmp_path_factory):
    """One real `sdaot compile` per family at 64x64 (all components), shared by the tests below."""
    root = tmp_path_factory.mktemp("artifacts")
    from sdaot.runtime.cli import main

    for model in FAMILIES:
        result = CliRunner().invoke(main, ["compile", "--model", model, "--weights", "tiny", "--resolution", "64x64",
                                           "--out", str(root)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert "[1/" in result.output and "built TVM library" in result.output
    return root


def psnr(a: Image.Image, b: Image.Image) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)
