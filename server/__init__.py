"""nurserve's HTTP layer: LightLLM's API on Quart-Trio + Hypercorn (see server/app.py)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see runtime/__init__.py

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build the Quart-Trio app (see `server.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
