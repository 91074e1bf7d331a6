"""Numba kernels of `runtime.cpu_attention`, at module level so Numba's on-disk cache works
(functions defined inside another function, or calling a closure, are recompiled in every process:
seconds at start-up). Import through `cpu_attention._kernel()`, which picks the threading layer
first."""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np


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
