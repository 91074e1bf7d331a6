"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's HF folder (SmolLM2-135M-Instruct Q4_1), converted once and cached."""
    from runtime.default_model import default_model_dir as _default_model_dir

    return _default_model_dir()
