"""Paged decode attention for the CPU: reads K/V through the slot table, no gathered copies.

The torch path gathers every sequence's K and V (`index_select`) into a padded batch before SDPA;
at batch 64 that copy costs as much as the layer's matmuls. This Numba kernel walks the slot table
directly, one (sequence, kv head) per work item, scoring all the GQA group's queries against
each key as it is read. Semantics equal the torch path (masked by `seq_lens`, softmax in fp32).
Set `NURSERVE_CPU_ATTENTION=torch` to turn it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor


@functools.cache
def _kernel() -> Any:
    """Compile (or load from Numba's cache) the kernel; None when Numba is unavailable."""
    if os.environ.get("NURSERVE_CPU_ATTENTION", "numba") != "numba":
        return None
    try:
        import numba
    except ImportError:
        return None
    config: Any = numba.config
    if config.THREADING_LAYER == "default":
        config.THREADING_LAYER = "workqueue"  # plain pthreads: no second OpenMP runtime

    # Inner loops index 1-D row views with `range` indices only: LLVM vectorises those (an index
    # such as `row[off + i]` may be negative to Numba, and its wrap-around check stops that).
    @numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False)
    def one_head(qs, k, v, trow, n, h, out, scale):  # type: ignore[no-untyped-def]
        # qs [g, hd] queries of one kv head; k, v [S, nkv, hd]; trow [L] slots; out [g, hd]
        g, hd = qs.shape
        probs = np.empty((g, n), dtype=np.float32)
        for t in range(n):  # scores: each key row is read once for the whole GQA group
            kr = k[trow[t], h]
            for j in range(g):
                qj = qs[j]
                d = np.float32(0.0)
                for i in range(hd):
                    d += qj[i] * kr[i]
                probs[j, t] = d * scale
        for j in range(g):  # softmax in place
            pj = probs[j]
            m = pj[0]
            for t in range(1, n):
                m = max(m, pj[t])
            tot = np.float32(0.0)
            for t in range(n):
                e = np.exp(pj[t] - m)
                pj[t] = e
                tot += e
            inv = np.float32(1.0) / tot
            for t in range(n):
                pj[t] *= inv
        # P @ V, three queries per pass over the value rows, each with a private accumulator
        # (past g the last query repeats and its row is written twice, harmlessly)
        for j0 in range(0, g, 3):
            j1 = min(j0 + 1, g - 1)
            j2 = min(j0 + 2, g - 1)
            a0 = np.zeros(hd, dtype=np.float32)
            a1 = np.zeros(hd, dtype=np.float32)
            a2 = np.zeros(hd, dtype=np.float32)
            for t in range(n):
                vr = v[trow[t], h]
                p0 = probs[j0, t]
                p1 = probs[j1, t]
                p2 = probs[j2, t]
                for i in range(hd):
                    x = vr[i]
                    a0[i] += p0 * x
                    a1[i] += p1 * x
                    a2[i] += p2 * x
            out[j0] = a0
            out[j1] = a1
            out[j2] = a2

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
    def paged_decode(q, k, v, table, seq_lens, out, scale):  # type: ignore[no-untyped-def]
        # q [B, nkv, g, hd]; k, v [S, nkv, hd]; table [B, L]; seq_lens [B]; out [B, nkv, g, hd]
        n_b, n_kv = q.shape[0], q.shape[1]
        for item in numba.prange(n_b * n_kv):  # one (sequence, kv head) per work item
            b = item // n_kv
            h = item % n_kv
            one_head(q[b, h], k, v, table[b], seq_lens[b], h, out[b, h], scale)

    return paged_decode


def available() -> bool:
    return _kernel() is not None


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor
) -> Tensor:
    """q `[B, nh, hd]` fp32 over `k_cache`/`v_cache` `[S, nkv, hd]` -> `[B, nh * hd]`."""
    kernel = _kernel()
    assert kernel is not None, "Numba is not available"
    b, nh, hd = q.shape
    n_kv = k_cache.shape[1]
    numba_threads(torch.get_num_threads())
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


@functools.cache
def numba_threads(n: int) -> None:
    """Match Numba's worker count to torch's intra-op threads (once per value)."""
    import numba

    config: Any = numba.config
    numba.set_num_threads(max(1, min(n, config.NUMBA_NUM_THREADS)))
