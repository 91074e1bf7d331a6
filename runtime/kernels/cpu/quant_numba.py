"""Numba kernels over GGUF block-quantized weights (`runtime.kernels.cpu.quant`): few-row GEMMs
that read each weight block once for all rows, and dequantization into fp32 (prefill scratch,
embedding rows). Import through `runtime.kernels.cpu.quant_linear`, which picks Numba's
threading layer first.

All in one module, at module level: Numba's disk cache notices edits to a function's own file
only. Formats are small ints (`FMT_ID`); a driver branches on them once per chunk of rows, so
every format shares one compiled driver. fp16 fields are read through a 65536-entry fp32 table
(`f16`, built by the caller), which keeps the kernels free of float16 arithmetic.

Plain loops that LLVM vectorises for the host (AVX2 or AVX-512); no intrinsics.
"""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np
from numba import prange

FMT_ID = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 3, "q6_k": 4}

# dots may reassociate (fastmath); dequantization keeps fp32 rounding bit-equal to the twin
_DOT = dict(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
_DQ = dict(fastmath=False, cache=True, nogil=True, boundscheck=False, error_model="numpy")


@numba.njit(**_DQ, inline="always")
def _h(row, p, f16):  # the fp16 at bytes p, p + 1 of a row, as fp32
    return f16[np.int64(row[p]) | (np.int64(row[p + 1]) << 8)]


@numba.njit(**_DQ, inline="always")
def _i8(c):  # a uint8 byte read as int8, in int32
    v = np.int32(c)
    return v - ((v >> 7) << 8)


@numba.njit(**_DQ, inline="always")
def _scale_min_k4(sc_bytes, j):  # get_scale_min_k4: 6-bit (scale, min) of Q4_K sub-block j
    if j < 4:
        return np.int32(sc_bytes[j]) & 63, np.int32(sc_bytes[j + 4]) & 63
    s = (np.int32(sc_bytes[j + 4]) & 0xF) | ((np.int32(sc_bytes[j - 4]) >> 6) << 4)
    m = (np.int32(sc_bytes[j + 4]) >> 4) | ((np.int32(sc_bytes[j]) >> 6) << 4)
    return s, m


# ---- per-block decoding into a scratch of fp32 q values (scales applied by the caller) ----


@numba.njit(**_DQ, inline="always")
def _unpack_q4(row, p, q, offset):  # 16 bytes -> 32 nibbles (low first), minus `offset`
    for j in range(16):
        c = np.int32(row[p + j])
        q[j] = np.float32((c & 15) - offset)
        q[j + 16] = np.float32((c >> 4) - offset)


@numba.njit(**_DQ, inline="always")
def _unpack_q4_k(row, p, q):  # 128 bytes -> 256 nibbles: per 64, low nibbles then high
    for g in range(4):
        for j in range(32):
            c = np.int32(row[p + g * 32 + j])
            q[g * 64 + j] = np.float32(c & 15)
            q[g * 64 + 32 + j] = np.float32(c >> 4)


@numba.njit(**_DQ, inline="always")
def _unpack_q6_k(row, p, q):  # ql[128], qh[64] -> 256 values q - 32
    for h in range(2):
        for j in range(32):
            hb = np.int32(row[p + 128 + h * 32 + j])
            a = np.int32(row[p + h * 64 + j])
            b = np.int32(row[p + h * 64 + 32 + j])
            q[h * 128 + j] = np.float32(((a & 15) | ((hb & 3) << 4)) - 32)
            q[h * 128 + 32 + j] = np.float32(((b & 15) | (((hb >> 2) & 3) << 4)) - 32)
            q[h * 128 + 64 + j] = np.float32(((a >> 4) | (((hb >> 4) & 3) << 4)) - 32)
            q[h * 128 + 96 + j] = np.float32(((b >> 4) | (((hb >> 6) & 3) << 4)) - 32)


# ---- exact mode: fp32 activations, q dotted per block, scales and mins applied per block ----


@numba.njit(**_DOT)
def _dot(x, t, k0, q, q0, n):  # sum_j x[t, k0 + j] * q[q0 + j]
    s = np.float32(0.0)
    for j in range(n):
        s += x[t, k0 + j] * q[q0 + j]
    return s


@numba.njit(**_DOT)
def _exact_row_32(fmt, row, x, xs, f16, acc, q):  # q4_0 / q4_1 / q8_0: one output row
    nb = x.shape[1] // 32
    for b in range(nb):
        if fmt == 2:
            p = b * 34
            d = _h(row, 0 + p, f16)
            for j in range(32):
                q[j] = np.float32(_i8(row[p + 2 + j]))
            m = np.float32(0.0)
        elif fmt == 1:
            p = b * 20
            d, m = _h(row, p, f16), _h(row, p + 2, f16)
            _unpack_q4(row, p + 4, q, 0)
        else:
            p = b * 18
            d, m = _h(row, p, f16), np.float32(0.0)
            _unpack_q4(row, p + 2, q, 8)
        for t in range(x.shape[0]):
            acc[t] += d * _dot(x, t, b * 32, q, 0, 32) + m * xs[t, b]


@numba.njit(**_DOT)
def _exact_row_k(fmt, row, x, xs, f16, acc, q):  # q4_k / q6_k: one output row
    nb = x.shape[1] // 256
    for b in range(nb):
        if fmt == 3:
            p = b * 144
            d, dmin = _h(row, p, f16), _h(row, p + 2, f16)
            _unpack_q4_k(row, p + 16, q)
            for sub in range(8):
                sc, mn = _scale_min_k4(row[p + 4 : p + 16], sub)
                ds, dm = d * np.float32(sc), dmin * np.float32(mn)
                for t in range(x.shape[0]):
                    s = _dot(x, t, b * 256 + sub * 32, q, sub * 32, 32)
                    acc[t] += ds * s - dm * xs[t, b * 8 + sub]
        else:
            p = b * 210
            d = _h(row, p + 208, f16)
            _unpack_q6_k(row, p, q)
            for sub in range(16):
                ds = d * np.float32(_i8(row[p + 192 + sub]))
                for t in range(x.shape[0]):
                    acc[t] += ds * _dot(x, t, b * 256 + sub * 16, q, sub * 16, 16)


# ---- fast mode: activations as int8 per 32-block (scale xd, scaled sum xs), integer dots ----


@numba.njit(**_DOT)
def _idot(xq, t, k0, qi):  # sum_j xq[t, k0 + j] * qi[j] over 32, in int32
    s = np.int32(0)
    for j in range(32):
        s += np.int32(xq[t, k0 + j]) * np.int32(qi[j])
    return s


@numba.njit(**_DOT)
def _fast_row_32(fmt, row, xq, xd, xs, f16, acc, qi):  # q4_0 / q4_1 / q8_0: one output row
    nb = xq.shape[1] // 32
    for b in range(nb):
        if fmt == 2:
            p = b * 34
            d, m = _h(row, p, f16), np.float32(0.0)
            for j in range(32):
                qi[j] = np.int8(_i8(row[p + 2 + j]))
        else:
            off = 0 if fmt == 1 else 8
            p = b * 20 if fmt == 1 else b * 18
            d = _h(row, p, f16)
            m = _h(row, p + 2, f16) if fmt == 1 else np.float32(0.0)
            p += 4 if fmt == 1 else 2
            for j in range(16):
                c = np.int32(row[p + j])
                qi[j] = np.int8((c & 15) - off)
                qi[j + 16] = np.int8((c >> 4) - off)
        for t in range(xq.shape[0]):
            acc[t] += d * xd[t, b] * np.float32(_idot(xq, t, b * 32, qi)) + m * xs[t, b]


@numba.njit(**_DOT)
def _gemv_rows(fmt, fast, w, x, xq, xd, xs, f16, out, col0, accumulate, r0, r1):
    """Output rows [r0, r1) of `out[:, col0 + o] (+)= x . W[o]`."""
    n_t = x.shape[0]
    acc = np.zeros(n_t, np.float32)
    q = np.empty(256, np.float32)
    qi = np.empty(32, np.int8)
    for o in range(r0, r1):
        acc[:] = 0
        row = w[o]
        if fast and fmt < 3:
            _fast_row_32(fmt, row, xq, xd, xs, f16, acc, qi)
        elif fmt < 3:
            _exact_row_32(fmt, row, x, xs, f16, acc, q)
        else:
            _exact_row_k(fmt, row, x, xs, f16, acc, q)
        for t in range(n_t):
            if accumulate:
                out[t, col0 + o] += acc[t]
            else:
                out[t, col0 + o] = acc[t]


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


@numba.njit(**_DQ)
def _dequant_row(fmt, row, f16, o, q):  # one row of blocks -> o [cols] fp32
    if fmt < 3:
        for b in range(o.shape[0] // 32):
            if fmt == 2:
                p = b * 34
                d = _h(row, p, f16)
                for j in range(32):
                    o[b * 32 + j] = np.float32(_i8(row[p + 2 + j])) * d
            else:
                p = b * 20 if fmt == 1 else b * 18
                d = _h(row, p, f16)
                m = _h(row, p + 2, f16) if fmt == 1 else np.float32(0.0)
                _unpack_q4(row, p + 4 if fmt == 1 else p + 2, q, 0 if fmt == 1 else 8)
                for j in range(32):
                    o[b * 32 + j] = d * q[j] + m if fmt == 1 else d * q[j]
        return
    for b in range(o.shape[0] // 256):
        if fmt == 3:
            p = b * 144
            d, dmin = _h(row, p, f16), _h(row, p + 2, f16)
            _unpack_q4_k(row, p + 16, q)
            for sub in range(8):
                sc, mn = _scale_min_k4(row[p + 4 : p + 16], sub)
                ds, dm = d * np.float32(sc), dmin * np.float32(mn)
                for j in range(32):
                    o[b * 256 + sub * 32 + j] = ds * q[sub * 32 + j] - dm
        else:
            p = b * 210
            d = _h(row, p + 208, f16)
            _unpack_q6_k(row, p, q)
            for sub in range(16):
                ds = d * np.float32(_i8(row[p + 192 + sub]))
                for j in range(16):
                    o[b * 256 + sub * 16 + j] = ds * q[sub * 16 + j]


@numba.njit(**_DQ)
def _dequant_range(fmt, w, ids, f16, out, r0, r1):
    q = np.empty(256, np.float32)
    for i in range(r0, r1):
        _dequant_row(fmt, w[ids[i]], f16, out[i], q)


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
