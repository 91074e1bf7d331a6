"""The fused decode layers of int16 mode: a decode step's whole decoder stack in one Numba call.

Per layer: RMSNorm, activation rounding, the qkv GEMV, rotary + K/V store, paged attention, the
o GEMV added to the residual, RMSNorm, the gate/up GEMV, SiLU * up, the down GEMV added to the
residual. Every piece is the per-op path's own Numba code (`quant_int16`'s rounding and GEMV,
`numba_kernels`' rows and attention), called in the same order on the same values, so a fused
step gives the per-op step's bits; what it removes is Python: a batch-1 step of the per-op path
makes ~300 kernel calls from Python, each with its dispatch, argument unboxing and thread
wake-up (profiling/README.md, session 10). `runtime.kernels.cpu.fused_decode` builds the
arguments once, at load.
"""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from runtime.kernels.cpu.numba_kernels import (
    _rms_norm_row,
    _rope_store_row,
    _silu_mul_row,
    one_seq,
)
from runtime.kernels.cpu.quant_int16 import _gemv_rows, _quantized

_KW = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")


@numba.njit(**_KW, inline="always")
def _linear(fmt, tile, w, x, n_pad, out, accumulate, base, n_chunks):
    """`out[:T] = (base +) x @ W.T` (x rounded first, on this thread; rows split over threads)."""
    xq, sx, xs = _quantized(x, n_pad)
    rows = w.shape[0]
    for c in prange(n_chunks):
        r0, r1 = c * rows // n_chunks, (c + 1) * rows // n_chunks
        _gemv_rows(fmt, tile, w, xq, sx, xs, x.shape[0], out, 0, accumulate, base, r0, r1)


@numba.njit(**_KW, inline="always")
def _attention(q, k, v, table, seq_lens, out, scale, parallel):
    """q, out `[T, nkv, g, hd]`: each token over its sequence's slots (`one_seq`)."""
    n_kv, g, hd = q.shape[1], q.shape[2], q.shape[3]
    if parallel:
        for b in prange(q.shape[0]):
            probs = np.empty((n_kv * g, table.shape[1]), dtype=np.float32)
            acc = np.empty((n_kv, g, hd), dtype=np.float32)
            bits = np.empty(table.shape[1], dtype=np.int32)
            one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs, acc, bits)
    else:
        probs = np.empty((n_kv * g, table.shape[1]), dtype=np.float32)
        acc = np.empty((n_kv, g, hd), dtype=np.float32)
        bits = np.empty(table.shape[1], dtype=np.int32)
        for b in range(q.shape[0]):
            one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs, acc, bits)


@numba.njit(**_KW, parallel=True)
def decode_layers(
    x, fmts, w_qkv, b_qkv, w_o, w_gu, w_down, ln_in, ln_post, eps, cos, sin, out_slots,
    k, v, table, seq_lens, scale, n_kv, tile, n_chunks, attn_parallel,
):  # fmt: skip
    """Every layer on x `[T, H]` in place (the residual stream). Per layer l: fmts[l] the four
    projections' format ids; w_* lists of GGUF blocks `[rows, row_bytes]`; b_qkv[l] the qkv
    bias (empty: none); ln_* `[L, H]`; k, v `[L, S, nkv, hd]`; cos, sin `[T, hd]`; out_slots
    `[T]`; table `[T, Lmax]`, seq_lens `[T]`; `tile` the GEMV's token tile."""
    n_t, hid = x.shape
    hd = k.shape[3]
    n_qkv = w_qkv[0].shape[0]
    nh = n_qkv // hd - 2 * n_kv
    inter = w_gu[0].shape[0] // 2
    n_pad = -(-n_t // tile) * tile
    h = np.empty((n_t, hid), np.float32)
    qkv = np.empty((n_t, n_qkv), np.float32)
    q = np.empty((n_t, nh, hd), np.float32)
    attn = np.empty((n_t, nh * hd), np.float32)
    gu = np.empty((n_t, 2 * inter), np.float32)
    act = np.empty((n_t, inter), np.float32)
    bits = np.empty(inter, np.int32)
    for lay in range(len(w_qkv)):
        for t in range(n_t):
            _rms_norm_row(x[t], ln_in[lay], eps, h[t])
        bias = b_qkv[lay]
        if bias.shape[0]:
            for t in range(n_t):
                qkv[t] = bias
        _linear(fmts[lay, 0], tile, w_qkv[lay], h, n_pad, qkv, bias.shape[0] > 0, qkv, n_chunks)
        for t in range(n_t):
            _rope_store_row(qkv[t], cos[t], sin[t], out_slots[t], k[lay], v[lay], q[t])
        q4 = q.reshape(n_t, n_kv, nh // n_kv, hd)
        a4 = attn.reshape(n_t, n_kv, nh // n_kv, hd)
        _attention(q4, k[lay], v[lay], table, seq_lens, a4, scale, attn_parallel)
        _linear(fmts[lay, 1], tile, w_o[lay], attn, n_pad, x, True, x, n_chunks)
        for t in range(n_t):
            _rms_norm_row(x[t], ln_post[lay], eps, h[t])
        _linear(fmts[lay, 2], tile, w_gu[lay], h, n_pad, gu, False, gu, n_chunks)
        for t in range(n_t):
            _silu_mul_row(gu[t], act[t], bits)
        _linear(fmts[lay, 3], tile, w_down[lay], act, n_pad, x, True, x, n_chunks)
