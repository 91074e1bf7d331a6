"""nurserve's HTTP layer: LightLLM's API on Quart-Trio + Hypercorn (see server/app.py)."""

from __future__ import annotations

from typing import Any

import runtime  # noqa: F401  (first: its OpenMP defaults apply before torch loads)

__all__ = ["create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    """Build the Quart-Trio app (see `server.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(*args, **kwargs)
