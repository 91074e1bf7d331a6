"""One progress bar for long loading steps (GGUF conversion, CUDA-graph capture)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def progress(items: list[T], desc: str, unit: str, enabled: bool = True) -> Iterable[T]:
    """tqdm over `items` on stderr when wanted and tqdm is installed; plain iteration otherwise."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, file=sys.stderr)
