"""One-pass greedy sampling for the CPU: each row's argmax and its log-softmax in one read.

The torch path (`Sampler.sample`, greedy batches) makes an argmax pass, then logsumexp's max,
subtract-exp-sum and log passes over the [B, V] logits. Here each row is read once, in blocks of
`_BLOCK` values: the block's max, then (still in L1) its sum of e^(x - running max), and the
running sum is rescaled when the max grows (an online logsumexp). Lanes of `_LANES` values keep
every loop vectorisable without fastmath (so NaN and inf keep their IEEE meaning), and e^z is a
polynomial (no SVML here: `np.exp` is a libm call per element); sums in fp64.

Semantics equal torch's `argmax` (first index on ties; NaN counts as the max) and
`x[argmax] - logsumexp(x)`, up to rounding (~1e-6): rows with a NaN or +inf, and rows that are
all -inf, get torch's token and torch's NaN logprob. Values more than 87 below the row's max add
e^-87 (~2e-38) each, below the resolution of a sum >= 1. Import through `runtime.kernels.cpu`'s
`attention` (the parallel driver's threading layer is picked there; the wrapper does so).
"""

# Numba's disk cache notices edits to a cached function's own file only: callers and callees
# live together, at module level.

from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention

# Two rows or more go parallel: with OpenMP's workers spinning (runtime/__init__.py) a parallel
# call costs less than one 49,152-value row (~50 us); profiling/README.md has the figures.
PARALLEL_MIN_ROWS = 2

_LANES = 16  # one AVX-512 register of fp32 (two AVX2 ones)
_BLOCK = 2048  # values per block: 8 KiB, read from memory once and again from L1
_LO = np.float32(-87.0)  # e^z for z below this is taken as e^-87
_NEG_INF = np.float32(-np.inf)
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO (Cody-Waite range reduction)
_LN2_LO = np.float32(-2.12194440e-4)

_K: dict[str, Any] = dict(
    fastmath=False, cache=True, nogil=True, boundscheck=False, error_model="numpy"
)


@numba.njit(**_K, inline="always")
def _exp_poly(r):  # type: ignore[no-untyped-def]
    # e^r for |r| <= ln(2)/2: Cephes' expf polynomial (error ~1 ulp)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    return p * r * r + r + np.float32(1.0)


@numba.njit(**_K)
def _block_max(xi):  # type: ignore[no-untyped-def]
    # xi [n] int32, fp32 bits -> max as fp32, on order-preserving int keys (an integer max
    # vectorises without fastmath); a NaN of either sign shows up in the exp sum instead
    mk = np.int32(-(1 << 31))
    for i in range(xi.shape[0]):
        k = xi[i] ^ ((xi[i] >> 31) & np.int32(0x7FFFFFFF))  # fp32 order as int32 order
        mk = k if k > mk else mk
    out = np.empty(1, dtype=np.int32)
    out[0] = mk ^ ((mk >> 31) & np.int32(0x7FFFFFFF))
    return out.view(np.float32)[0]


@numba.njit(fastmath={"reassoc"}, cache=True, nogil=True, boundscheck=False)
def _sum64(e):  # type: ignore[no-untyped-def]
    # e [n] fp32 -> sum in fp64, in vector lanes (reassociation only: NaN still propagates)
    s = 0.0
    for i in range(e.shape[0]):
        s += np.float64(e[i])
    return s


@numba.njit(**_K)
def _block_exp_sum(x, m, e, bits):  # type: ignore[no-untyped-def]
    # x [n] fp32, m its running max; e [_BLOCK] fp32, bits [_BLOCK] int32 scratch ->
    # sum(e^(x - m)) in fp64; NaN when some x - m is NaN (x NaN, or x = m = +-inf)
    n = x.shape[0]
    for i in range(n):
        z = x[i] - m
        zk = z if z > _LO else _LO  # NaN and -inf -> _LO: the exponent stays in range
        zr = _LO if z < _LO else z  # ... while NaN carries on into the polynomial
        k = np.floor(zk * _LOG2E + np.float32(0.5))
        e[i] = _exp_poly((zr - k * _LN2_HI) - k * _LN2_LO)
        bits[i] = (np.int32(k) + np.int32(127)) << 23  # 2^k, k in [-126, 0]
    scale = bits.view(np.float32)
    for i in range(n):
        e[i] *= scale[i]
    return _sum64(e[:n])


@numba.njit(**_K)
def _first_index(x, v):  # type: ignore[no-untyped-def]
    # x [n] fp32 -> the first i with x[i] == v (v is in x)
    for i in range(x.shape[0]):
        if x[i] == v:
            return i
    return 0


@numba.njit(**_K)
def _torch_argmax(x):  # type: ignore[no-untyped-def]
    # x [n] fp32 -> torch.argmax(x): the first NaN, else the first maximum
    best = 0
    for i in range(x.shape[0]):
        if x[i] != x[i]:
            return i
        if x[i] > x[best]:
            best = i
    return best


@numba.njit(**_K)
def _row(x, e, bits):  # type: ignore[no-untyped-def]
    # x [V] fp32 -> (argmax, x[argmax] - logsumexp(x)) in one pass of blocks
    n = x.shape[0]
    xi = x.view(np.int32)
    m = _NEG_INF
    best = 0
    s = 0.0
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        blk = x[lo:hi]
        bm = _block_max(xi[lo:hi])
        if bm > m:  # strictly: an equal max later on keeps the first index
            best = lo + _first_index(blk, bm)
            s *= math.exp(np.float64(m) - np.float64(bm))
            m = bm
        s += _block_exp_sum(blk, m, e, bits)
    if s != s:  # a NaN or +inf in the row, or all of it -inf: torch's logprob is NaN too
        return _torch_argmax(x), np.float32(np.nan)
    return best, np.float32(-math.log(s))


@numba.njit(**_K)
def greedy_logprob(logits):  # type: ignore[no-untyped-def]
    # logits [B, V] fp32 -> (tokens [B] int64, logprob [B] fp32), one row after another
    b = logits.shape[0]
    tokens = np.empty(b, dtype=np.int64)
    logprob = np.empty(b, dtype=np.float32)
    e = np.empty(_BLOCK, dtype=np.float32)
    bits = np.empty(_BLOCK, dtype=np.int32)
    for r in range(b):
        tokens[r], logprob[r] = _row(logits[r], e, bits)
    return tokens, logprob


@numba.njit(parallel=True, **_K)
def greedy_logprob_par(logits):  # type: ignore[no-untyped-def]
    # as `greedy_logprob`, rows spread over Numba's threads
    b = logits.shape[0]
    tokens = np.empty(b, dtype=np.int64)
    logprob = np.empty(b, dtype=np.float32)
    for r in numba.prange(b):
        e = np.empty(_BLOCK, dtype=np.float32)
        bits = np.empty(_BLOCK, dtype=np.int32)
        tokens[r], logprob[r] = _row(logits[r], e, bits)
    return tokens, logprob


def greedy_logprob_torch(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax [B] int64, logprob of it [B] fp32) of contiguous fp32 CPU `logits` [B, V]."""
    x = logits.detach().numpy()  # [B, V], no copy
    if x.shape[0] >= PARALLEL_MIN_ROWS and cpu_attention.available():  # threading layer first
        cpu_attention.numba_threads(torch.get_num_threads())
        tokens, logprob = greedy_logprob_par(x)  # [B], [B]
    else:
        tokens, logprob = greedy_logprob(x)  # [B], [B]
    return torch.from_numpy(tokens), torch.from_numpy(logprob)
