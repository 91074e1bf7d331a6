"""The CPU's Numba kernels: paged decode attention (`runtime.kernels.cpu.attention`), the one-pass
elementwise kernels (`runtime.kernels.cpu.fused`) and greedy sampling
(`runtime.kernels.cpu.sample_greedy`). Import through those modules, which pick Numba's threading
layer first.

All in one module, at module level: Numba's on-disk cache works only for module-level functions
(anything defined inside another function is recompiled in every process: seconds at start-up),
and it notices edits to a cached function's own file only, so callers and callees live together.
Elementwise kernels make one pass over their rows where the torch path makes several (RMSNorm: 6
ops; rotary + K/V store: ~8; SiLU * up: 3). fp32 throughout; sums in fp32 like torch."""

# mypy: ignore-errors

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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
    # qkv [T, (nh + 2 nkv) hd]; cos, sin [T, hd] (rotate-half tables: the first half is read);
    # out_slots [T]; k_cache, v_cache [S, nkv, hd]; q_out [T, nh, hd]. Rotate-half rope of q
    # (-> q_out) and k (-> k_cache[slot]); v -> v_cache.
    for t in range(qkv.shape[0]):
        _rope_store_row(qkv[t], cos[t], sin[t], out_slots[t], k_cache, v_cache, q_out[t])


@numba.njit(parallel=True, **_ROW)
def rope_store_par(qkv, cos, sin, out_slots, k_cache, v_cache, q_out):  # type: ignore[no-untyped-def]
    for t in numba.prange(qkv.shape[0]):
        _rope_store_row(qkv[t], cos[t], sin[t], out_slots[t], k_cache, v_cache, q_out[t])


_AHEAD_ROWS = 6  # slot rows prefetched ahead of the one being read
# the intrinsic's pointer-type suffix: opaque pointers from LLVM 15 on, typed i8* before
_PREFETCH = "llvm.prefetch.p0" if llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"


@intrinsic
def prefetch_row(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Prefetch every cache line of `arr[idx]` (a row of a C-contiguous array) for reading.

    A sequence's slots are not contiguous (decode steps hand out one slot per sequence in
    turn), so the hardware prefetcher cannot follow a slot-table walk: software prefetch of
    the next rows measured 1.3-1.5x on the batch-64 decode attention here."""
    sig = types.void(arr, idx)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        i64, i32 = ir.IntType(64), ir.IntType(32)
        row_bytes = builder.extract_value(ary.strides, 0)
        addr = builder.add(builder.ptrtoint(ary.data, i64), builder.mul(args[1], row_bytes))
        i8p = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, _PREFETCH)
        n_lines = builder.udiv(row_bytes, ir.Constant(i64, 64))
        with cgutils.for_range(builder, n_lines) as loop:
            line = builder.add(addr, builder.mul(loop.index, ir.Constant(i64, 64)))
            rw, locality, data = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
            builder.call(fn, [builder.inttoptr(line, i8p), rw, locality, data])
        return context.get_dummy_value()

    return sig, codegen


# Inner loops index 1-D row views with `range` indices only: LLVM vectorises those (an index
# such as `row[off + i]` may be negative to Numba, and its wrap-around check stops that).
@numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
def one_seq(qb, k, v, trow, n, out, scale, probs, acc, bits):  # type: ignore[no-untyped-def]
    # qb [nkv, g, hd]; k, v [S, nkv, hd]; trow [L] slots; out, acc [nkv, g, hd]; probs [nkv*g, L];
    # bits [L] int32 scratch
    nkv, g, hd = qb.shape
    for t in range(min(_AHEAD_ROWS, n)):
        prefetch_row(k, trow[t])
    for t in range(n):  # scores: each key row (all kv heads) is read once, in slot order
        if t + _AHEAD_ROWS < n:
            prefetch_row(k, trow[t + _AHEAD_ROWS])
        elif t + _AHEAD_ROWS - n < n:  # the first value rows, while the last keys are read
            prefetch_row(v, trow[t + _AHEAD_ROWS - n])
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
        row = pr[:n]
        for t in range(n):
            row[t] = m - row[t]
        exp_neg_rows(row, row, bits)  # in place: exp(score - max)
        tot = np.float32(0.0)
        for t in range(n):
            tot += row[t]
        inv = np.float32(1.0) / tot
        for t in range(n):
            pr[t] *= inv
    acc[:] = 0.0
    for t in range(n):  # P @ V: one pass over the value rows, every head and query
        if t + _AHEAD_ROWS < n:
            prefetch_row(v, trow[t + _AHEAD_ROWS])
        vs = v[trow[t]]
        for h in range(nkv):
            vr = vs[h]
            for j in range(g):
                p = probs[h * g + j, t]
                a = acc[h, j]
                for i in range(hd):
                    a[i] += p * vr[i]
    out[:] = acc


@numba.njit(fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy")
def paged_decode(q, k, v, table, seq_lens, out, scale):  # type: ignore[no-untyped-def]
    # q [B, nkv, g, hd]; k, v [S, nkv, hd]; table [B, L]; seq_lens [B]; out [B, nkv, g, hd]
    n_kv, g = q.shape[1], q.shape[2]
    probs = np.empty((n_kv * g, table.shape[1]), dtype=np.float32)
    acc = np.empty((n_kv, g, q.shape[3]), dtype=np.float32)
    bits = np.empty(table.shape[1], dtype=np.int32)
    for b in range(q.shape[0]):
        one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs, acc, bits)


@numba.njit(
    parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy"
)
def paged_decode_par(q, k, v, table, seq_lens, out, scale):  # type: ignore[no-untyped-def]
    n_kv, g = q.shape[1], q.shape[2]
    for b in numba.prange(q.shape[0]):  # one sequence per work item: its slots' rows read whole
        probs = np.empty((n_kv * g, table.shape[1]), dtype=np.float32)
        acc = np.empty((n_kv, g, q.shape[3]), dtype=np.float32)
        bits = np.empty(table.shape[1], dtype=np.int32)
        one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs, acc, bits)


# ---- greedy sampling (runtime.kernels.cpu.sample_greedy) -------------------------------------
# No fastmath: NaN and inf keep their IEEE meaning (torch's argmax / logsumexp semantics).
_GREEDY = dict(fastmath=False, cache=True, nogil=True, boundscheck=False, error_model="numpy")
_BLOCK = 2048  # values per block: 8 KiB, read from memory once and again from L1
_LO = np.float32(-87.0)  # e^z for z below this is taken as e^-87
_NEG_INF = np.float32(-np.inf)


@numba.njit(**_GREEDY)
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


@numba.njit(**_GREEDY)
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


@numba.njit(**_GREEDY)
def _first_index(x, v):  # type: ignore[no-untyped-def]
    # x [n] fp32 -> the first i with x[i] == v (v is in x)
    for i in range(x.shape[0]):
        if x[i] == v:
            return i
    return 0


@numba.njit(**_GREEDY)
def _torch_argmax(x):  # type: ignore[no-untyped-def]
    # x [n] fp32 -> torch.argmax(x): the first NaN, else the first maximum
    best = 0
    for i in range(x.shape[0]):
        if x[i] != x[i]:
            return i
        if x[i] > x[best]:
            best = i
    return best


@numba.njit(**_GREEDY)
def _greedy_row(x, e, bits):  # type: ignore[no-untyped-def]
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


@numba.njit(**_GREEDY)
def greedy_logprob(logits):  # type: ignore[no-untyped-def]
    # logits [B, V] fp32 -> (tokens [B] int64, logprob [B] fp32), one row after another
    b = logits.shape[0]
    tokens = np.empty(b, dtype=np.int64)
    logprob = np.empty(b, dtype=np.float32)
    e = np.empty(_BLOCK, dtype=np.float32)
    bits = np.empty(_BLOCK, dtype=np.int32)
    for r in range(b):
        tokens[r], logprob[r] = _greedy_row(logits[r], e, bits)
    return tokens, logprob


@numba.njit(parallel=True, **_GREEDY)
def greedy_logprob_par(logits):  # type: ignore[no-untyped-def]
    # as `greedy_logprob`, rows spread over Numba's threads
    b = logits.shape[0]
    tokens = np.empty(b, dtype=np.int64)
    logprob = np.empty(b, dtype=np.float32)
    for r in numba.prange(b):
        e = np.empty(_BLOCK, dtype=np.float32)
        bits = np.empty(_BLOCK, dtype=np.int32)
        tokens[r], logprob[r] = _greedy_row(logits[r], e, bits)
    return tokens, logprob
