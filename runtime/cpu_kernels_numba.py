"""Numba kernels of `runtime.cpu_fused`, at module level so Numba's on-disk cache works. Import
through `cpu_fused._kernels()`, which picks the threading layer first.

Each kernel is one pass over its rows where the torch path makes several (RMSNorm: 6 ops; rotary
+ K/V store: ~8; SiLU * up: 3), parallel over rows. fp32 throughout; sums in fp32 like torch."""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO (Cody-Waite range reduction)
_LN2_LO = np.float32(-2.12194440e-4)


@numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False, inline="always")
def _exp_poly(r):  # e^r for |r| <= ln(2)/2: Cephes' expf polynomial (error ~1 ulp)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0)


@numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
def exp_neg_rows(x, out, bits):  # type: ignore[no-untyped-def]
    """out = exp(-x) elementwise on a 1-D row, vectorisable (no SVML here: `np.exp` is a libm
    call per element). e^z = 2^k e^r, k = round(z / ln 2); 2^k is built from its exponent bits."""
    n = x.shape[0]
    for i in range(n):
        z = min(max(-x[i], np.float32(-87.0)), np.float32(88.0))
        k = np.floor(z * _LOG2E + np.float32(0.5))
        r = (z - k * _LN2_HI) - k * _LN2_LO
        out[i] = _exp_poly(r)
        bits[i] = (np.int32(k) + np.int32(127)) << 23
    scale = bits.view(np.float32)
    for i in range(n):
        out[i] *= scale[i]


_ROW = dict(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")


@numba.njit(**_ROW)
def _rms_norm_row(row, w, eps, o):  # type: ignore[no-untyped-def]
    h = row.shape[0]
    ss = np.float32(0.0)
    for i in range(h):
        ss += row[i] * row[i]
    inv = np.float32(1.0) / np.sqrt(ss / np.float32(h) + eps)
    for i in range(h):
        o[i] = row[i] * inv * w[i]


@numba.njit(**_ROW)
def _silu_mul_row(gu, o, bits):  # type: ignore[no-untyped-def]
    n = o.shape[0]
    g = gu[:n]
    u = gu[n:]
    exp_neg_rows(g, o, bits)  # o = exp(-g)
    for i in range(n):
        o[i] = g[i] / (np.float32(1.0) + o[i]) * u[i]


@numba.njit(**_ROW)
def _rope_store_row(row, c, s, slot, k_cache, v_cache, q_row):  # type: ignore[no-untyped-def]
    nh, hd = q_row.shape
    nkv = k_cache.shape[1]
    half = hd // 2
    for h in range(nh + nkv):
        src = row[h * hd : (h + 1) * hd]
        dst = q_row[h] if h < nh else k_cache[slot, h - nh]
        x1 = src[:half]
        x2 = src[half:]
        d1 = dst[:half]
        d2 = dst[half:]
        for i in range(half):
            d1[i] = x1[i] * c[i] - x2[i] * s[i]
            d2[i] = x2[i] * c[i] + x1[i] * s[i]
    for h in range(nkv):
        src = row[(nh + nkv + h) * hd : (nh + nkv + h + 1) * hd]
        dst = v_cache[slot, h]
        for i in range(hd):
            dst[i] = src[i]


# Each kernel in two drivers: serial, and parallel over rows. A parallel call costs ~50-100 us
# of thread wake-up here, more than a decode step's rows take in one thread, so the wrappers in
# `cpu_fused` pick the serial one for small inputs.


@numba.njit(**_ROW)
def rms_norm(x, w, eps, out):  # type: ignore[no-untyped-def]
    # x [T, H]; w [H]; out [T, H]:  out = x / sqrt(mean(x^2) + eps) * w
    for t in range(x.shape[0]):
        _rms_norm_row(x[t], w, eps, out[t])


@numba.njit(parallel=True, **_ROW)
def rms_norm_par(x, w, eps, out):  # type: ignore[no-untyped-def]
    for t in numba.prange(x.shape[0]):
        _rms_norm_row(x[t], w, eps, out[t])


@numba.njit(**_ROW)
def silu_mul(gate_up, out):  # type: ignore[no-untyped-def]
    # gate_up [T, 2I] (gate | up); out [T, I]:  out = gate * sigmoid(gate) * up
    bits = np.empty(out.shape[1], dtype=np.int32)
    for t in range(out.shape[0]):
        _silu_mul_row(gate_up[t], out[t], bits)


@numba.njit(parallel=True, **_ROW)
def silu_mul_par(gate_up, out):  # type: ignore[no-untyped-def]
    for t in numba.prange(out.shape[0]):
        bits = np.empty(out.shape[1], dtype=np.int32)
        _silu_mul_row(gate_up[t], out[t], bits)


@numba.njit(**_ROW)
def rope_store(qkv, cos, sin, out_slots, k_cache, v_cache, q_out):  # type: ignore[no-untyped-def]
    # qkv [T, (nh + 2 nkv) hd]; cos, sin [T, hd/2]; out_slots [T]; k_cache, v_cache [S, nkv, hd];
    # q_out [T, nh, hd]. Rotate-half rope of q (-> q_out) and k (-> k_cache[slot]); v -> v_cache.
    for t in range(qkv.shape[0]):
        _rope_store_row(qkv[t], cos[t], sin[t], out_slots[t], k_cache, v_cache, q_out[t])


@numba.njit(parallel=True, **_ROW)
def rope_store_par(qkv, cos, sin, out_slots, k_cache, v_cache, q_out):  # type: ignore[no-untyped-def]
    for t in numba.prange(qkv.shape[0]):
        _rope_store_row(qkv[t], cos[t], sin[t], out_slots[t], k_cache, v_cache, q_out[t])
