"""Numba's disk cache for the kernel modules of this package, kept consistent across files.

Numba checks a cached function against its own file's modification stamp only, but the fused
decode kernel (`decode_numba`) compiles in code from `numba_kernels` and `quant_int16`: an edit
there alone would leave its cached machine code stale. So before any kernel module loads,
`refresh` hashes every module of the package and, when the hash differs from the one recorded
beside the cache, drops the package's cache files (they recompile once, ~30 s). A cache folder
that cannot be written (a read-only install) is left alone: Numba then caches elsewhere, and an
install rewrites every file, which invalidates every stamp anyway.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

_HERE = Path(__file__).resolve().parent
_STAMP = "nurserve-kernel-sources.sha256"


def sources_hash(folder: Path = _HERE) -> str:
    """sha256 over the package's modules, by name and content."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def refresh_folder(folder: Path) -> bool:
    """Drop `folder`'s Numba cache files if its modules changed since the last call; whether
    any were dropped."""
    cache = folder / "__pycache__"
    stamp = cache / _STAMP
    now = sources_hash(folder)
    try:
        if stamp.is_file() and stamp.read_text() == now:
            return False
        dropped = False
        for pattern in ("*.nbi", "*.nbc"):
            for path in cache.glob(pattern):
                path.unlink(missing_ok=True)
                dropped = True
        cache.mkdir(exist_ok=True)
        stamp.write_text(now)
        return dropped
    except OSError:  # read-only: see the module docstring
        return False


@functools.cache
def refresh() -> None:
    """`refresh_folder` on this package, once per process (before its kernel modules load)."""
    refresh_folder(_HERE)
