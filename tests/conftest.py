"""Shared fixtures: paths to the shared real-model assets, and running the CLI as a user would."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared assets folder (ONNXCOMP_ASSETS); tests that need it skip without it."""
    location = os.environ.get("ONNXCOMP_ASSETS")
    if not location or not Path(location).is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI needs the shared assets, but ONNXCOMP_ASSETS={location!r} is not a folder")
        pytest.skip("ONNXCOMP_ASSETS is not set to the shared assets folder")
    return Path(location)


@pytest.fixture(scope="session")
def digits_model() -> Path:
    return PROJECT / "models" / "digits_cnn.onnx"


@pytest.fixture(scope="session")
def digits_data() -> Path:
    return PROJECT / "models" / "digits_test.npz"
