"""Paged decode attention for the CPU: reads K/V through the slot table, no gathered copies.

The torch path gathers every sequence's K and V (`index_select`) into a padded batch before SDPA;
at batch 64 that copy costs as much as the layer's matmuls. This Numba kernel walks the slot table
directly, one sequence per work item, scoring all of its queries against each key row as it
is read (items of a whole sequence read whole slot rows: 1.6-2x faster here than items of one
(sequence, kv head)). Semantics equal the torch path (masked by `seq_lens`, softmax in fp32).
`--cpu_attention torch` assembles models without it (`runtime.model.backends`).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np
import torch
from torch import Tensor

PARALLEL_MIN_ROWS = 1024  # slot rows (batch x table width) from which the parallel kernel runs


@functools.cache
def _kernel() -> Any:
    """The kernel module (compiled, or loaded from Numba's cache, on first use); None without Numba."""
    try:
        import numba
    except ImportError:
        return None
    config: Any = numba.config
    if config.THREADING_LAYER == "default":
        # OpenMP first: its workers spin briefly between calls (runtime/__init__.py), where the
        # workqueue layer's sleep costs 50-100 us per parallel call here; workqueue if no libgomp
        config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

    from runtime.kernels.cpu import numba_cache

    numba_cache.refresh()  # before any kernel module loads: cross-file edits drop the cache
    from runtime.kernels.cpu import numba_kernels  # module level: Numba can cache it

    return numba_kernels


def available() -> bool:
    return _kernel() is not None


def driver(name: str, parallel: bool) -> Any:
    """Kernel `name` of `cpu_kernels_numba`: its parallel driver (`name_par`, Numba's workers
    matched to torch's threads first) or its serial one."""
    kernels = _kernel()
    assert kernels is not None, "Numba is not available"
    if not parallel:
        return getattr(kernels, name)
    numba_threads(torch.get_num_threads())
    return getattr(kernels, name + "_par")


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor
) -> Tensor:
    """q `[B, nh, hd]` fp32 over `k_cache`/`v_cache` `[S, nkv, hd]` -> `[B, nh * hd]`."""
    b, nh, hd = q.shape
    n_kv = k_cache.shape[1]
    # threads only pay for themselves past ~a thousand slot rows (a parallel call costs 50-100 us)
    kernel = driver("paged_decode", b > 1 and b * block_table.shape[1] >= PARALLEL_MIN_ROWS)
    qn = q.reshape(b, n_kv, nh // n_kv, hd).contiguous().numpy()  # [B, nkv, g, hd]
    out = np.empty_like(qn)
    kernel(
        qn,
        k_cache.numpy(),
        v_cache.numpy(),
        block_table.numpy(),
        seq_lens.numpy(),
        out,
        np.float32(1.0 / np.sqrt(hd)),
    )
    return torch.from_numpy(out).view(b, nh * hd)


_THREADS = threading.local()


def numba_threads(n: int) -> int:
    """Match Numba's worker count (a per-thread setting) to torch's intra-op threads `n`;
    the count set. Remembered per thread: setting and reading it cost ~5 us a call each."""
    held: tuple[int, int] | None = getattr(_THREADS, "set", None)
    if held is not None and held[0] == n:
        return held[1]
    import numba

    config: Any = numba.config
    count = max(1, min(n, config.NUMBA_NUM_THREADS))
    numba.set_num_threads(count)
    _THREADS.set = (n, count)
    return count
