"""Numba kernels over GGUF block-quantized weights (`runtime.kernels.cpu.quant`): few-row GEMMs
that read each weight block once for all rows, and dequantization into fp32 (prefill scratch,
embedding rows). Import through `runtime.kernels.cpu.quant_linear`, which picks Numba's
threading layer first.

All in one module, at module level: Numba's disk cache notices edits to a function's own file
only. Formats are small ints (`quant.FMT_ID`); a driver branches on them once per chunk of rows, so
every format shares one compiled driver. fp16 fields are read through a 65536-entry fp32 table
(`f16`, built by the caller), which keeps the kernels free of float16 arithmetic.

Plain loops that LLVM vectorises for the host (AVX2 or AVX-512); no intrinsics.
"""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np
from numba import prange

# dots may reassociate (fastmath); dequantization keeps fp32 rounding bit-equal to the twin
_DOT = dict(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
_DQ = dict(fastmath=False, cache=True, nogil=True, boundscheck=False, error_model="numpy")


@numba.njit(**_DQ, inline="always")
def _i8(c):  # a uint8 byte read as int8, in int32
    v = np.int32(c)
    return v - ((v >> 7) << 8)


@numba.njit(**_DQ, inline="always")
def _scale_min_k4(w, o, p, j):  # get_scale_min_k4: 6-bit (scale, min) of Q4_K sub-block j
    if j < 4:
        return np.int32(w[o, p + j]) & 63, np.int32(w[o, p + j + 4]) & 63
    s = (np.int32(w[o, p + j + 4]) & 0xF) | ((np.int32(w[o, p + j - 4]) >> 6) << 4)
    m = (np.int32(w[o, p + j + 4]) >> 4) | ((np.int32(w[o, p + j]) >> 6) << 4)
    return s, m


# ---- per-block decoding into a scratch of fp32 q values (scales applied by the caller) ----


@numba.njit(**_DQ, inline="always")
def _unpack_q4(w, o, p, q, offset):  # 16 bytes -> 32 nibbles (low first), minus `offset`
    for j in range(16):
        c = np.int32(w[o, p + j])
        q[j] = np.float32((c & 15) - offset)
        q[j + 16] = np.float32((c >> 4) - offset)


@numba.njit(**_DQ, inline="always")
def _unpack_q4_k(w, o, p, q):  # 128 bytes -> 256 nibbles: per 64, low nibbles then high
    for g in range(4):
        for j in range(32):
            c = np.int32(w[o, p + g * 32 + j])
            q[g * 64 + j] = np.float32(c & 15)
            q[g * 64 + 32 + j] = np.float32(c >> 4)


@numba.njit(**_DQ, inline="always")
def _unpack_q6_k(w, o, p, q):  # ql[128], qh[64] -> 256 values q - 32
    for h in range(2):
        for j in range(32):
            hb = np.int32(w[o, p + 128 + h * 32 + j])
            a = np.int32(w[o, p + h * 64 + j])
            b = np.int32(w[o, p + h * 64 + 32 + j])
            q[h * 128 + j] = np.float32(((a & 15) | ((hb & 3) << 4)) - 32)
            q[h * 128 + 32 + j] = np.float32(((b & 15) | (((hb >> 2) & 3) << 4)) - 32)
            q[h * 128 + 64 + j] = np.float32(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32)
            q[h * 128 + 96 + j] = np.float32(((b >> 4) | (((hb >> 6) & 3) << 4)) - 32)


# ---- exact mode: fp32 activations times the block's q values, scaled per block ----
# Sums go into 32 lanes per activation row (`lanes [T, 32]`) and are reduced once per output
# row: a horizontal sum per block would cost more than the block's multiply-adds.


@numba.njit(**_DOT, inline="always")
def _axpy(lanes, t, l0, scale, x, k0, q, q0, n):  # lanes[t, l0 + j] += scale x[t, k0 + j] q[q0 + j]
    for j in range(n):
        lanes[t, l0 + j] += (scale * x[t, k0 + j]) * q[q0 + j]


@numba.njit(**_DOT, inline="always")
def _exact_row_32(fmt, w, o, x, xs, f16, lanes, mins, q):  # q4_0 / q4_1 / q8_0: row o
    # bytes are decoded inside the loop over rows t: a q scratch between them blocks vectorising
    for b in range(x.shape[1] // 32):
        k0 = b * 32
        if fmt == 2:
            p = b * 34
            d = f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)]
            for t in range(x.shape[0]):
                for j in range(32):
                    lanes[t, j] += (d * x[t, k0 + j]) * np.float32(_i8(w[o, p + 2 + j]))
            continue
        off = 0 if fmt == 1 else 8
        p = b * 20 if fmt == 1 else b * 18
        d = f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)]
        m = (
            f16[np.int64(w[o, p + 2]) | (np.int64(w[o, p + 2 + 1]) << 8)]
            if fmt == 1
            else np.float32(0.0)
        )
        p += 4 if fmt == 1 else 2
        for t in range(x.shape[0]):
            for j in range(16):
                c = np.int32(w[o, p + j])
                lanes[t, j] += (d * x[t, k0 + j]) * np.float32((c & 15) - off)
                lanes[t, j + 16] += (d * x[t, k0 + 16 + j]) * np.float32((c >> 4) - off)
            mins[t] += m * xs[t, b]


@numba.njit(**_DOT, inline="always")
def _exact_row_k(fmt, w, o, x, xs, f16, lanes, mins, q):  # q4_k / q6_k: row o
    for b in range(x.shape[1] // 256):
        if fmt == 3:
            p = b * 144
            d, dmin = (
                f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)],
                f16[np.int64(w[o, p + 2]) | (np.int64(w[o, p + 2 + 1]) << 8)],
            )
            for sub in range(8):
                sc, mn = _scale_min_k4(w, o, p + 4, sub)
                ds, dm = d * np.float32(sc), dmin * np.float32(mn)
                pq, shift, k0 = p + 16 + (sub >> 1) * 32, (sub & 1) * 4, b * 256 + sub * 32
                for t in range(x.shape[0]):
                    for j in range(32):
                        v = np.float32((np.int32(w[o, pq + j]) >> shift) & 15)
                        lanes[t, j] += (ds * x[t, k0 + j]) * v
                    mins[t] -= dm * xs[t, b * 8 + sub]
        else:
            p = b * 210
            d = f16[np.int64(w[o, p + 208]) | (np.int64(w[o, p + 208 + 1]) << 8)]
            _unpack_q6_k(w, o, p, q)
            for sub in range(16):
                ds = d * np.float32(_i8(w[o, p + 192 + sub]))
                for t in range(x.shape[0]):
                    _axpy(lanes, t, (sub & 1) * 16, ds, x, b * 256 + sub * 16, q, sub * 16, 16)


# ---- fast mode: activations as int8 per 32-block (scale xd, scaled sum xs), integer products
# per pair of elements, scaled into 16 fp32 lanes ----


@numba.njit(**_DOT, inline="always")
def _fast_row_32(fmt, w, o, xq, xd, xs, f16, lanes, mins):  # q4_0 / q4_1 / q8_0: row o
    for b in range(xq.shape[1] // 32):
        k0 = b * 32
        if fmt == 2:
            p = b * 34
            d = f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)]
            for t in range(xq.shape[0]):
                dd = d * xd[t, b]
                for j in range(16):
                    pair = _i8(w[o, p + 2 + j]) * np.int32(xq[t, k0 + j]) + _i8(
                        w[o, p + 18 + j]
                    ) * np.int32(xq[t, k0 + 16 + j])
                    lanes[t, j] += dd * np.float32(pair)
            continue
        off = 0 if fmt == 1 else 8
        p = b * 20 if fmt == 1 else b * 18
        d = f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)]
        m = (
            f16[np.int64(w[o, p + 2]) | (np.int64(w[o, p + 2 + 1]) << 8)]
            if fmt == 1
            else np.float32(0.0)
        )
        p += 4 if fmt == 1 else 2
        for t in range(xq.shape[0]):
            dd = d * xd[t, b]
            for j in range(16):
                c = np.int32(w[o, p + j])
                pair = ((c & 15) - off) * np.int32(xq[t, k0 + j]) + ((c >> 4) - off) * np.int32(
                    xq[t, k0 + 16 + j]
                )
                lanes[t, j] += dd * np.float32(pair)
            mins[t] += m * xs[t, b]


@numba.njit(**_DOT, inline="always")
def _gemv_rows(fmt, fast, w, x, xq, xd, xs, f16, out, col0, accumulate, r0, r1):
    """Output rows [r0, r1) of `out[:, col0 + o] (+)= x . W[o]`."""
    n_t = x.shape[0]
    lanes = np.zeros((n_t, 32), np.float32)
    mins = np.zeros(n_t, np.float32)
    q = np.empty(256, np.float32)
    for o in range(r0, r1):
        lanes[:] = 0
        mins[:] = 0
        if fast and fmt < 3:
            _fast_row_32(fmt, w, o, xq, xd, xs, f16, lanes, mins)
        elif fmt < 3:
            _exact_row_32(fmt, w, o, x, xs, f16, lanes, mins, q)
        else:
            _exact_row_k(fmt, w, o, x, xs, f16, lanes, mins, q)
        for t in range(n_t):
            s = mins[t]
            for j in range(32):
                s += lanes[t, j]
            if accumulate:
                out[t, col0 + o] += s
            else:
                out[t, col0 + o] = s


@numba.njit(**_DOT)
def gemv(fmt, fast, w, x, xq, xd, xs, f16, out, col0, accumulate, n_chunks):  # type: ignore[no-untyped-def]
    """`out[:, col0:col0 + rows] (+)= x @ W.T` in one thread. x `[T, K]` fp32; for fast mode
    xq `[T, K]` int8, xd `[T, K/32]` scales; xs `[T, K/32]` block sums (exact: of x; fast:
    xd * sum xq). `n_chunks` is unused (the parallel driver's split)."""
    _gemv_rows(fmt, fast, w, x, xq, xd, xs, f16, out, col0, accumulate, 0, w.shape[0])


@numba.njit(**_DOT, parallel=True)
def gemv_par(fmt, fast, w, x, xq, xd, xs, f16, out, col0, accumulate, n_chunks):  # type: ignore[no-untyped-def]
    """`gemv` with output rows split into `n_chunks` even chunks (one per Numba thread)."""
    rows = w.shape[0]
    n_chunks = max(1, min(rows, n_chunks))
    for c in prange(n_chunks):
        r0, r1 = c * rows // n_chunks, (c + 1) * rows // n_chunks
        _gemv_rows(fmt, fast, w, x, xq, xd, xs, f16, out, col0, accumulate, r0, r1)


@numba.njit(**_DOT)
def act_block_sums(x, xs):  # type: ignore[no-untyped-def]
    """xs[t, b] = sum of x[t, 32 b : 32 b + 32] (the min terms of q4_1 / q4_k)."""
    for t in range(x.shape[0]):
        for b in range(xs.shape[1]):
            s = np.float32(0.0)
            for j in range(32):
                s += x[t, b * 32 + j]
            xs[t, b] = s


@numba.njit(**_DOT)
def act_quantize(x, xq, xd, xs):  # type: ignore[no-untyped-def]
    """Q8_0-style activation rows: per 32-block scale xd = max|x| / 127, xq = round(x / xd),
    xs = xd * sum(xq) (llama.cpp's Q8_1 block sum, for the min term)."""
    for t in range(x.shape[0]):
        for b in range(xd.shape[1]):
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(x[t, b * 32 + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            isum = np.int32(0)
            for j in range(32):
                v = np.int32(np.floor(x[t, b * 32 + j] * inv + np.float32(0.5)))
                xq[t, b * 32 + j] = np.int8(v)
                isum += v
            xd[t, b] = d
            xs[t, b] = d * np.float32(isum)


# ---- dequantization to fp32 (bit-equal to quant.dequantize) ----


@numba.njit(**_DQ, inline="always")
def _dequant_row(fmt, w, o, f16, y, i, q):  # row o of W -> y[i] fp32
    if fmt < 3:
        for b in range(y.shape[1] // 32):
            if fmt == 2:
                p = b * 34
                d = f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)]
                for j in range(32):
                    y[i, b * 32 + j] = np.float32(_i8(w[o, p + 2 + j])) * d
            else:
                p = b * 20 if fmt == 1 else b * 18
                d = f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)]
                m = (
                    f16[np.int64(w[o, p + 2]) | (np.int64(w[o, p + 2 + 1]) << 8)]
                    if fmt == 1
                    else np.float32(0.0)
                )
                _unpack_q4(w, o, p + 4 if fmt == 1 else p + 2, q, 0 if fmt == 1 else 8)
                for j in range(32):
                    y[i, b * 32 + j] = d * q[j] + m if fmt == 1 else d * q[j]
        return
    for b in range(y.shape[1] // 256):
        if fmt == 3:
            p = b * 144
            d, dmin = (
                f16[np.int64(w[o, p]) | (np.int64(w[o, p + 1]) << 8)],
                f16[np.int64(w[o, p + 2]) | (np.int64(w[o, p + 2 + 1]) << 8)],
            )
            _unpack_q4_k(w, o, p + 16, q)
            for sub in range(8):
                sc, mn = _scale_min_k4(w, o, p + 4, sub)
                ds, dm = d * np.float32(sc), dmin * np.float32(mn)
                for j in range(32):
                    y[i, b * 256 + sub * 32 + j] = ds * q[sub * 32 + j] - dm
        else:
            p = b * 210
            d = f16[np.int64(w[o, p + 208]) | (np.int64(w[o, p + 208 + 1]) << 8)]
            _unpack_q6_k(w, o, p, q)
            for sub in range(16):
                ds = d * np.float32(_i8(w[o, p + 192 + sub]))
                for j in range(16):
                    y[i, b * 256 + sub * 16 + j] = ds * q[sub * 16 + j]


@numba.njit(**_DQ, inline="always")
def _dequant_range(fmt, w, ids, f16, out, r0, r1):
    q = np.empty(256, np.float32)
    for i in range(r0, r1):
        _dequant_row(fmt, w, ids[i], f16, out, i, q)


@numba.njit(**_DQ)
def dequant(fmt, w, ids, f16, out, n_chunks):  # type: ignore[no-untyped-def]
    """out[i] = the fp32 values of row ids[i] of W, one thread."""
    _dequant_range(fmt, w, ids, f16, out, 0, ids.shape[0])


@numba.njit(**_DQ, parallel=True)
def dequant_par(fmt, w, ids, f16, out, n_chunks):  # type: ignore[no-untyped-def]
    """`dequant` with rows split into `n_chunks` even chunks (one per Numba thread)."""
    n = ids.shape[0]
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        _dequant_range(fmt, w, ids, f16, out, c * n // n_chunks, (c + 1) * n // n_chunks)
