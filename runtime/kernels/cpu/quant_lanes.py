"""Numba kernels over q4_0 / q4_1 / q8_0 weights repacked into lanes (`quant.LaneMatrix`).

A lane is one (row r of a group of `LANE_ROWS` output rows, block b) pair; the group's lanes
are contiguous for each byte position j of a block, so the innermost loop runs over
`LANE_ROWS * blocks` lanes with unit stride in the weights and in the activations, which are
laid out the same way once per call (`lay_out`): `xl[t, j, 8 b + r] = x[t, 32 b + j]`
(lane `8 b + r`: block b of row r).
Each lane sums its 32 products without scales; scales and mins apply once per block at the
end. No gathers, no horizontal sums per block: LLVM vectorises the lane loop for the host's
SIMD width. q4 nibbles are split in the float domain (`hi = floor(q / 16)`, `lo = q - 16 hi`),
which avoids the int64 widening Numba's integer arithmetic forces.

All kernels in this one module (Numba's disk cache watches a function's own file).
"""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np
from numba import prange

LANE_ROWS = 8

_DOT = dict(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
_DQ = dict(fastmath=False, cache=True, nogil=True, boundscheck=False, error_model="numpy")


@numba.njit(**_DOT)
def lay_out(x, nb, xl, xs):  # type: ignore[no-untyped-def]
    """x `[T, K]` -> xl `[T, 32, LANE_ROWS * nb]` (see the module docstring), xs `[T, nb]`
    block sums (the min terms)."""
    for t in range(x.shape[0]):
        for j in range(32):
            for b in range(nb):
                v = x[t, b * 32 + j]
                for r in range(LANE_ROWS):
                    xl[t, j, b * LANE_ROWS + r] = v
        for b in range(nb):
            s = np.float32(0.0)
            for j in range(32):
                s += x[t, b * 32 + j]
            xs[t, b] = s


@numba.njit(**_DOT, inline="always")
def _lane_sums_q4(qs, g, xl, acc, lo, hi):  # acc[t, i] = sum_j xl[t, j, i] q[j, i], nibbles of qs
    n_lanes = qs.shape[2]
    for j in range(16):
        if xl.shape[0] == 1:  # one token: split the nibbles in registers
            for i in range(n_lanes):
                f = np.float32(qs[g, j, i])
                h = np.floor(f * np.float32(0.0625))
                acc[0, i] += xl[0, j, i] * (f - np.float32(16.0) * h) + xl[0, j + 16, i] * h
            continue
        for i in range(n_lanes):  # several: split them once into L1, then every token
            f = np.float32(qs[g, j, i])
            h = np.floor(f * np.float32(0.0625))
            hi[i] = h
            lo[i] = f - np.float32(16.0) * h
        for t in range(xl.shape[0]):
            for i in range(n_lanes):
                acc[t, i] += xl[t, j, i] * lo[i] + xl[t, j + 16, i] * hi[i]


@numba.njit(**_DOT, inline="always")
def _lane_sums_q8(qs, g, xl, acc):  # acc[t, i] = sum_j xl[t, j, i] q[j, i], int8 qs
    n_lanes = qs.shape[2]
    for j in range(32):
        for t in range(xl.shape[0]):
            for i in range(n_lanes):
                acc[t, i] += xl[t, j, i] * np.float32(qs[g, j, i])


@numba.njit(**_DOT, inline="always")
def _groups(q8, qs, d, m, xl, xs, nb, out, col0, accumulate, g0, g1):
    n_t = xl.shape[0]
    acc = np.empty((n_t, qs.shape[2]), np.float32)
    lo = np.empty(qs.shape[2], np.float32)
    hi = np.empty(qs.shape[2], np.float32)
    s = np.empty(LANE_ROWS, np.float32)
    for g in range(g0, g1):
        acc[:] = 0
        if q8:
            _lane_sums_q8(qs, g, xl, acc)
        else:
            _lane_sums_q4(qs, g, xl, acc, lo, hi)
        for t in range(n_t):
            s[:] = 0
            for b in range(nb):
                for r in range(LANE_ROWS):
                    i = b * LANE_ROWS + r
                    s[r] += d[g, i] * acc[t, i] + m[g, i] * xs[t, b]
            o = col0 + g * LANE_ROWS
            for r in range(LANE_ROWS):
                if accumulate:
                    out[t, o + r] += s[r]
                else:
                    out[t, o + r] = s[r]


@numba.njit(**_DOT)
def gemv(q8, qs, d, m, xl, xs, nb, out, col0, accumulate, n_chunks):  # type: ignore[no-untyped-def]
    """`out[:, col0:col0 + rows] (+)= x @ W.T` in one thread, x laid out by `lay_out`.
    q8: qs is int8 `[groups, 32, lanes]` (m unused, zeros); else q4 bytes `[groups, 16, lanes]`
    (low nibble: element j, high: j + 16), value d q + m."""
    _groups(q8, qs, d, m, xl, xs, nb, out, col0, accumulate, 0, qs.shape[0])


@numba.njit(**_DOT, parallel=True)
def gemv_par(q8, qs, d, m, xl, xs, nb, out, col0, accumulate, n_chunks):  # type: ignore[no-untyped-def]
    """`gemv` with the row groups split into `n_chunks` even chunks (one per Numba thread)."""
    n_g = qs.shape[0]
    n_chunks = max(1, min(n_g, n_chunks))
    for c in prange(n_chunks):
        g0, g1 = c * n_g // n_chunks, (c + 1) * n_g // n_chunks
        _groups(q8, qs, d, m, xl, xs, nb, out, col0, accumulate, g0, g1)


@numba.njit(**_DQ, inline="always")
def _dequant_rows(q8, qs, d, m, nb, ids, out, i0, i1):
    for i in range(i0, i1):
        g, r = ids[i] // LANE_ROWS, ids[i] % LANE_ROWS
        for b in range(nb):
            lane = b * LANE_ROWS + r
            for j in range(16 if not q8 else 32):
                if q8:
                    out[i, b * 32 + j] = d[g, lane] * np.float32(qs[g, j, lane])
                else:
                    c = np.int32(qs[g, j, lane])
                    out[i, b * 32 + j] = d[g, lane] * np.float32(c & 15) + m[g, lane]
                    out[i, b * 32 + 16 + j] = d[g, lane] * np.float32(c >> 4) + m[g, lane]


@numba.njit(**_DQ)
def dequant(q8, qs, d, m, nb, ids, out, n_chunks):  # type: ignore[no-untyped-def]
    """out[i] = the fp32 values of row ids[i], one thread."""
    _dequant_rows(q8, qs, d, m, nb, ids, out, 0, ids.shape[0])


@numba.njit(**_DQ, parallel=True)
def dequant_par(q8, qs, d, m, nb, ids, out, n_chunks):  # type: ignore[no-untyped-def]
    """`dequant` with rows split into `n_chunks` even chunks (one per Numba thread)."""
    n = ids.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        _dequant_rows(q8, qs, d, m, nb, ids, out, c * n // n_chunks, (c + 1) * n // n_chunks)


@numba.njit(**_DQ, inline="always")
def _dequant_t_groups(q8, qs, d, m, nb, g_first, wt, g0, g1):
    for g in range(g0, g1):
        c0 = (g - g_first) * LANE_ROWS
        for j in range(16 if not q8 else 32):
            for b in range(nb):
                for r in range(LANE_ROWS):
                    i = b * LANE_ROWS + r
                    if q8:
                        wt[b * 32 + j, c0 + r] = d[g, i] * np.float32(qs[g, j, i])
                    else:
                        f = np.float32(qs[g, j, i])
                        hi = np.floor(f * np.float32(0.0625))
                        wt[b * 32 + j, c0 + r] = d[g, i] * (f - np.float32(16.0) * hi) + m[g, i]
                        wt[b * 32 + 16 + j, c0 + r] = d[g, i] * hi + m[g, i]


@numba.njit(**_DQ)
def dequant_t(q8, qs, d, m, nb, g0, g1, wt, n_chunks):  # type: ignore[no-untyped-def]
    """wt `[K, 8 (g1 - g0)]` fp32 = rows of groups [g0, g1) transposed, one thread."""
    _dequant_t_groups(q8, qs, d, m, nb, g0, wt, g0, g1)


@numba.njit(**_DQ, parallel=True)
def dequant_t_par(q8, qs, d, m, nb, g0, g1, wt, n_chunks):  # type: ignore[no-untyped-def]
    """`dequant_t` with the groups split into `n_chunks` even chunks."""
    n = g1 - g0
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        a, z = g0 + c * n // n_chunks, g0 + (c + 1) * n // n_chunks
        _dequant_t_groups(q8, qs, d, m, nb, g0, wt, a, z)


@numba.njit(**_DQ, inline="always")
def _stage_groups(q8, qs, d, m, g_first, st, g0, g1):
    n_lanes = qs.shape[2]
    for g in range(g0, g1):
        s = g - g_first
        if q8:
            for j in range(32):
                for i in range(n_lanes):
                    st[s, j, i] = d[g, i] * np.float32(qs[g, j, i])
        else:
            for j in range(16):
                for i in range(n_lanes):
                    c = qs[g, j, i]
                    st[s, j, i] = d[g, i] * np.float32(c & np.uint8(15)) + m[g, i]
                    st[s, j + 16, i] = d[g, i] * np.float32(c >> np.uint8(4)) + m[g, i]


@numba.njit(**_DQ)
def stage(q8, qs, d, m, g0, g1, st, n_chunks):  # type: ignore[no-untyped-def]
    """st `[g1 - g0, 32, lanes]` fp32 = groups [g0, g1) in lane order (bit-equal to `dequant`):
    st[g, j, 8 b + r] is row 8 g + r, column 32 b + j; one thread."""
    _stage_groups(q8, qs, d, m, g0, st, g0, g1)


@numba.njit(**_DQ, parallel=True)
def stage_par(q8, qs, d, m, g0, g1, st, n_chunks):  # type: ignore[no-untyped-def]
    """`stage` with the groups split into `n_chunks` even chunks."""
    n = g1 - g0
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        a, z = g0 + c * n // n_chunks, g0 + (c + 1) * n // n_chunks
        _stage_groups(q8, qs, d, m, g0, st, a, z)
