"""Fixtures of the hardware tests: every test measures into its own cache."""

from pathlib import Path

import pytest

from cptrain.hardware import probe as hardware
from cptrain.models.build import build_model


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    """Every test measures into its own cache."""
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_config():
    return build_model("tiny", 512, seed=0).config

