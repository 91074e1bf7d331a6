"""Paged decode attention for the CPU: reads K/V through the slot table, no gathered copies.

The torch path gathers every sequence's K and V (`index_select`) into a padded batch before SDPA;
at batch 64 that copy costs as much as the layer's matmuls. This Numba kernel walks the slot table
directly, one sequence per work item, scoring all of its queries against each key row as it
is read (items of a whole sequence read whole slot rows: 1.6-2x faster here than items of one
(sequence, kv head)). Semantics equal the torch path (masked by `seq_lens`, softmax in fp32).
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
    def one_seq(qb, k, v, trow, n, out, scale, probs):  # type: ignore[no-untyped-def]
        # qb [nkv, g, hd]; k, v [S, nkv, hd]; trow [L] slots; out [nkv, g, hd]; probs [nkv*g, L]
        nkv, g, hd = qb.shape
        for t in range(n):  # scores: each key row (all kv heads) is read once, in slot order
            s = trow[t]
            for h in range(nkv):
                kr = k[s, h]
                for j in range(g):
                    qj = qb[h, j]
                    d = np.float32(0.0)
                    for i in range(hd):
                        d += qj[i] * kr[i]
                    probs[h * g + j, t] = d * scale
        for r in range(nkv * g):  # softmax in place
            pr = probs[r]
            m = pr[0]
            for t in range(1, n):
                m = max(m, pr[t])
            tot = np.float32(0.0)
            for t in range(n):
                e = np.exp(pr[t] - m)
                pr[t] = e
                tot += e
            inv = np.float32(1.0) / tot
            for t in range(n):
                pr[t] *= inv
        # P @ V, three queries of a kv head per pass over its value rows, each with a private
        # accumulator (past g the last query repeats and its row is written twice, harmlessly)
        for h in range(nkv):
            for j0 in range(0, g, 3):
                j1 = min(j0 + 1, g - 1)
                j2 = min(j0 + 2, g - 1)
                p0r = probs[h * g + j0]
                p1r = probs[h * g + j1]
                p2r = probs[h * g + j2]
                a0 = np.zeros(hd, dtype=np.float32)
                a1 = np.zeros(hd, dtype=np.float32)
                a2 = np.zeros(hd, dtype=np.float32)
                for t in range(n):
                    vr = v[trow[t], h]
                    p0 = p0r[t]
                    p1 = p1r[t]
                    p2 = p2r[t]
                    for i in range(hd):
                        x = vr[i]
                        a0[i] += p0 * x
                        a1[i] += p1 * x
                        a2[i] += p2 * x
                out[h, j0] = a0
                out[h, j1] = a1
                out[h, j2] = a2

    @numba.njit(parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False)
    def paged_decode(q, k, v, table, seq_lens, out, scale):  # type: ignore[no-untyped-def]
        # q [B, nkv, g, hd]; k, v [S, nkv, hd]; table [B, L]; seq_lens [B]; out [B, nkv, g, hd]
        n_b, n_kv, g = q.shape[0], q.shape[1], q.shape[2]
        for b in numba.prange(n_b):  # one sequence per work item: its slots' rows read whole
            probs = np.empty((n_kv * g, table.shape[1]), dtype=np.float32)
            one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs)

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
