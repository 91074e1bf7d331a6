"""int16 mode's GEMV: q4_0 / q4_1 / q8_0 GGUF blocks, as shipped, dotted with activations
quantized to int16 per 32-block, in integer multiply-adds (`pmaddwd`).

Numba has no integer dot: its integer arithmetic widens to int64, so LLVM never matches
`pmaddwd` (profiling/README.md, session 8). The block dot is therefore written as LLVM IR
through `numba.extending.intrinsic`, in portable vector IR (sign-extend, multiply, add the
even and odd lanes) that LLVM's x86 backend lowers to `vpmaddwd` on AVX2 and AVX-512 hosts,
and to plain vector code elsewhere. One call of a dot intrinsic runs one weight row over all
its blocks for a tile of 1, 2, 4 or 8 tokens: each block's nibbles are split once, into
registers, for every token of the tile; per token and block the int32 sums are converted once
and scaled by `d * sx` with one FMA (no fastmath: the order of every sum is fixed, so a token's
result does not depend on the tile or the batch it runs in).

Activations (`act_quantize`): per token and 32-block, `sx = max|x| / 32767`, `xq = floor(x / sx + 1/2)`
(|error| <= sx / 2, about 1.5e-5 of the block's largest value) and `xs = sx * sum xq` for q4
mins, so the GEMV computes `x~ . W` for x~ = sx * xq (`act_round`), which the fp32 paths
(prefill, K formats) multiply: every path agrees to fp32 rounding. Scales and sums are stored block-major (`[blocks, tokens]`) so a block's
values for a tile of tokens are one vector load.

All kernels in this one module (Numba's disk cache watches a function's own file).
"""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

TILES = (1, 2, 4, 8)  # tokens per dot call
_I8, _I16, _I32, _F16, _F32 = (
    ir.IntType(8),
    ir.IntType(16),
    ir.IntType(32),
    ir.HalfType(),
    ir.FloatType(),
)
# block bytes and offset of the values, by format id (quant.FMT_ID: q4_0, q4_1, q8_0)
_LAYOUT = {0: (18, 2), 1: (20, 4), 2: (34, 2)}
# weights are read this far ahead of the block being dotted: with 8 tokens a block takes ~20
# cycles, and the out-of-order window alone keeps too few lines in flight
PREFETCH_BYTES = 1024
LANES = 8  # fp32 lanes of each token's accumulator (a 256-bit vector)
# activation rounding: reductions may reorder (max, and sums of integers, are exact in any
# order) but nothing contracts, so act_quantize and act_round round every value alike
_ACT_FLAGS = {"nnan", "ninf", "nsz", "reassoc"}
_KW = dict(cache=True, nogil=True, boundscheck=False, error_model="numpy")


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const(t: ir.Type, v):  # type: ignore[no-untyped-def]
    return ir.Constant(t, v)


def _data(context, builder, ty, val, elt):  # type: ignore[no-untyped-def]
    """An array argument's data pointer, as `elt*`."""
    arr = context.make_array(ty)(context, builder, val)
    return builder.bitcast(arr.data, elt.as_pointer())


def _load(builder, base, off, ty, align):  # type: ignore[no-untyped-def]
    return builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), align=align)


def _splat(builder, val, n):  # type: ignore[no-untyped-def]
    v = builder.insert_element(_const(_vec(val.type, n), ir.Undefined), val, _const(_I32, 0))
    return builder.shuffle_vector(v, v, _const(_vec(_I32, n), [0] * n))


def _fma(builder, a, b, c):  # type: ignore[no-untyped-def]
    """a * b + c, one rounding (`llvm.fma`; llvmlite's `fma` takes scalars only)."""
    t = a.type
    name = f"llvm.fma.v{t.count}f32"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t, t]), name)
    return builder.call(fn, [a, b, c])


def _pmadd(builder, a, b):  # type: ignore[no-untyped-def]
    """<n x i16> a, b -> <n/2 x i32> sums of adjacent products (LLVM: `vpmaddwd`)."""
    n = a.type.count
    p = builder.mul(builder.sext(a, _vec(_I32, n)), builder.sext(b, _vec(_I32, n)))
    even = builder.shuffle_vector(p, p, _const(_vec(_I32, n // 2), list(range(0, n, 2))))
    odd = builder.shuffle_vector(p, p, _const(_vec(_I32, n // 2), list(range(1, n, 2))))
    return builder.add(even, odd)


def _token_sum(builder, lo, hi, xb, it):  # type: ignore[no-untyped-def]
    """One token's block dot, <8 x i32>: two 256-bit `vpmaddwd` and an add (512-bit vectors
    and VNNI's `vpdpwssd` measured no faster: profiling/README.md, session 9)."""
    xl = _load(builder, xb, _const(it, 0), _vec(_I16, 16), 2)
    xh = _load(builder, xb, _const(it, 16), _vec(_I16, 16), 2)
    return builder.add(_pmadd(builder, lo, xl), _pmadd(builder, hi, xh))


def _block_values(builder, fmt, blk, it):  # type: ignore[no-untyped-def]
    """A block's 32 values as two <16 x i16> halves (elements 0-15, 16-31), and its fp32 d."""
    _, q0 = _LAYOUT[fmt]
    d = builder.fpext(_load(builder, blk, _const(it, 0), _F16, 1), _F32)
    if fmt == 2:  # q8_0: int8 values
        q = builder.sext(_load(builder, blk, _const(it, q0), _vec(_I8, 32), 1), _vec(_I16, 32))
        lo = builder.shuffle_vector(q, q, _const(_vec(_I32, 16), list(range(16))))
        hi = builder.shuffle_vector(q, q, _const(_vec(_I32, 16), list(range(16, 32))))
        return lo, hi, d
    q = _load(builder, blk, _const(it, q0), _vec(_I8, 16), 1)  # low nibbles: 0-15, high: 16-31
    lo = builder.zext(builder.and_(q, _const(_vec(_I8, 16), [15] * 16)), _vec(_I16, 16))
    hi = builder.zext(builder.lshr(q, _const(_vec(_I8, 16), [4] * 16)), _vec(_I16, 16))
    return lo, hi, d


def _prefetch(builder, ptr):  # type: ignore[no-untyped-def]
    """Prefetch the line at `ptr` into L1 (read, high locality)."""
    fnty = ir.FunctionType(ir.VoidType(), [_I8.as_pointer(), _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
    builder.call(fn, [ptr, _const(_I32, 0), _const(_I32, 3), _const(_I32, 1)])


def _block_min(builder, fmt, blk, it, d):  # type: ignore[no-untyped-def]
    """q4_1's stored min, or q4_0's -8 d (its offset of 8)."""
    if fmt == 1:
        return builder.fpext(_load(builder, blk, _const(it, 2), _F16, 1), _F32)
    return builder.fmul(d, _const(_F32, -8.0))


def _dot_codegen(fmt: int, nt: int):  # type: ignore[no-untyped-def]
    """IR for one weight row (at byte `woff` of `w`) against `nt` tokens: res[t] =
    sum_b d_b sx[b, t] (q_b . xq_t,b) + m_b xs[b, t]."""
    bb, _ = _LAYOUT[fmt]

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        w, woff, xq, xoff, xstride, sx, xs, soff, sstride, nb, res = args
        ta = sig.args
        it = woff.type
        wp = builder.gep(_data(context, builder, ta[0], w, _I8), [woff])
        xp = builder.gep(_data(context, builder, ta[2], xq, _I16), [xoff])
        sp = builder.gep(_data(context, builder, ta[5], sx, _F32), [soff])
        mp = builder.gep(_data(context, builder, ta[6], xs, _F32), [soff])
        zero = _const(_vec(_F32, LANES), [0.0] * LANES)
        accs = [cgutils.alloca_once_value(builder, zero) for _ in range(nt)]
        acc_min = cgutils.alloca_once_value(builder, _const(_vec(_F32, nt), [0.0] * nt))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            blk = builder.gep(wp, [builder.mul(b, _const(it, bb))])
            _prefetch(builder, builder.gep(blk, [_const(it, PREFETCH_BYTES)]))
            lo, hi, d = _block_values(builder, fmt, blk, it)
            srow = builder.mul(b, sstride)
            scales = builder.fmul(
                _load(builder, sp, srow, _vec(_F32, nt), 4), _splat(builder, d, nt)
            )
            if fmt != 2:
                m = _splat(builder, _block_min(builder, fmt, blk, it, d), nt)
                xsv = _load(builder, mp, srow, _vec(_F32, nt), 4)
                builder.store(_fma(builder, xsv, m, builder.load(acc_min)), acc_min)
            xrow = builder.mul(b, _const(it, 32))
            for t in range(nt):
                xb = builder.gep(xp, [builder.add(xrow, builder.mul(_const(it, t), xstride))])
                s = _token_sum(builder, lo, hi, xb, it)  # <LANES x i32>
                sc = _splat(builder, builder.extract_element(scales, _const(_I32, t)), LANES)
                acc = _fma(builder, builder.sitofp(s, _vec(_F32, LANES)), sc, builder.load(accs[t]))
                builder.store(acc, accs[t])
        rp = _data(context, builder, ta[10], res, _F32)
        mins = builder.load(acc_min)
        for t in range(nt):
            v = builder.load(accs[t])
            tot = builder.extract_element(mins, _const(_I32, t)) if fmt != 2 else _const(_F32, 0.0)
            for k in range(LANES):
                tot = builder.fadd(tot, builder.extract_element(v, _const(_I32, k)))
            builder.store(tot, builder.gep(rp, [_const(it, t)]))
        return context.get_dummy_value()

    return codegen


def _make_dot(fmt: int, nt: int):  # type: ignore[no-untyped-def]
    @intrinsic
    def dot(typingctx, w, woff, xq, xoff, xstride, sx, xs, soff, sstride, nb, res):  # type: ignore[no-untyped-def]
        sig = types.void(w, woff, xq, xoff, xstride, sx, xs, soff, sstride, nb, res)
        return sig, _dot_codegen(fmt, nt)

    return dot


# module globals, so the drivers below reference them by name (and Numba can cache them)
_q4_0_t1, _q4_0_t2, _q4_0_t4, _q4_0_t8 = (_make_dot(0, n) for n in TILES)
_q4_1_t1, _q4_1_t2, _q4_1_t4, _q4_1_t8 = (_make_dot(1, n) for n in TILES)
_q8_0_t1, _q8_0_t2, _q8_0_t4, _q8_0_t8 = (_make_dot(2, n) for n in TILES)


def _dequant_codegen(fmt: int):  # type: ignore[no-untyped-def]
    """IR for one row's blocks (at byte `woff` of `w`) -> fp32 at element `ooff` of `out`, 32
    values a block in vector stores, in gguf's operation order (q4_0: d (q - 8); q4_1:
    d q + m; q8_0: q d; no contraction): bit-equal to `quant.dequantize`."""
    bb, _ = _LAYOUT[fmt]

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        w, woff, out, ooff, nb = args
        it = woff.type
        wp = builder.gep(_data(context, builder, sig.args[0], w, _I8), [woff])
        op = builder.gep(_data(context, builder, sig.args[2], out, _F32), [ooff])
        v32 = _vec(_F32, 32)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            blk = builder.gep(wp, [builder.mul(b, _const(it, bb))])
            lo, hi, d = _block_values(builder, fmt, blk, it)  # <16 x i16> halves
            q = builder.shuffle_vector(lo, hi, _const(_vec(_I32, 32), list(range(32))))
            if fmt == 0:
                q = builder.sub(q, _const(_vec(_I16, 32), [8] * 32))
            val = builder.fmul(_splat(builder, d, 32), builder.sitofp(q, v32))
            if fmt == 1:
                val = builder.fadd(val, _splat(builder, _block_min(builder, fmt, blk, it, d), 32))
            dst = builder.gep(op, [builder.mul(b, _const(it, 32))])
            builder.store(val, builder.bitcast(dst, v32.as_pointer()), align=4)
        return context.get_dummy_value()

    return codegen


def _make_dequant(fmt: int):  # type: ignore[no-untyped-def]
    @intrinsic
    def dequant_row(typingctx, w, woff, out, ooff, nb):  # type: ignore[no-untyped-def]
        return types.void(w, woff, out, ooff, nb), _dequant_codegen(fmt)

    return dequant_row


_dq_q4_0, _dq_q4_1, _dq_q8_0 = (_make_dequant(f) for f in (0, 1, 2))


@numba.njit(**_KW, inline="always")
def _dequant_rows(fmt, w, r0, r1, out, first):  # rows [r0, r1) of W -> out[r - first]
    cols = out.shape[1]
    for r in range(r0, r1):
        woff, ooff = r * w.shape[1], (r - first) * cols
        if fmt == 0:
            _dq_q4_0(w, woff, out, ooff, cols // 32)
        elif fmt == 1:
            _dq_q4_1(w, woff, out, ooff, cols // 32)
        else:
            _dq_q8_0(w, woff, out, ooff, cols // 32)


@numba.njit(**_KW)
def dequant(fmt, w, r0, r1, out, n_chunks):  # type: ignore[no-untyped-def]
    """out `[r1 - r0, cols]` fp32 = rows [r0, r1) of the GGUF blocks `w`, one thread (the
    prefill's scratch; vector stores, ~10x the scalar `quant_numba.dequant`)."""
    _dequant_rows(fmt, w, r0, r1, out, r0)


@numba.njit(**_KW, parallel=True)
def dequant_par(fmt, w, r0, r1, out, n_chunks):  # type: ignore[no-untyped-def]
    """`dequant` with the rows split into `n_chunks` even chunks (one per Numba thread)."""
    n = r1 - r0
    n_chunks = max(1, min(n, n_chunks))
    for c in prange(n_chunks):
        _dequant_rows(fmt, w, r0 + c * n // n_chunks, r0 + (c + 1) * n // n_chunks, out, r0)


@numba.njit(**_KW, inline="always")
def _dot(fmt, tile, w, woff, xq, xoff, k, sx, xs, t0, nb, res):
    ss = sx.shape[1]
    if fmt == 0:
        if tile == 1:
            _q4_0_t1(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
        elif tile == 2:
            _q4_0_t2(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
        elif tile == 4:
            _q4_0_t4(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
        else:
            _q4_0_t8(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
    elif fmt == 1:
        if tile == 1:
            _q4_1_t1(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
        elif tile == 2:
            _q4_1_t2(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
        elif tile == 4:
            _q4_1_t4(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
        else:
            _q4_1_t8(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
    elif tile == 1:
        _q8_0_t1(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
    elif tile == 2:
        _q8_0_t2(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
    elif tile == 4:
        _q8_0_t4(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)
    else:
        _q8_0_t8(w, woff, xq, xoff, k, sx, xs, t0, ss, nb, res)


@numba.njit(**_KW, inline="always")
def _gemv_rows(fmt, tile, w, xq, sx, xs, n_t, out, col0, accumulate, base, r0, r1):
    """Output rows [r0, r1) of `out[:n_t, col0 + o] = (base[:n_t, col0 + o] +) x . W[o]`."""
    k = xq.shape[1]
    nb = k // 32
    res = np.empty(8, np.float32)
    for o in range(r0, r1):
        woff = o * w.shape[1]
        for t0 in range(0, n_t, tile):
            _dot(fmt, tile, w, woff, xq, t0 * k, k, sx, xs, t0, nb, res)
            for t in range(min(tile, n_t - t0)):
                if accumulate:
                    out[t0 + t, col0 + o] = base[t0 + t, col0 + o] + res[t]
                else:
                    out[t0 + t, col0 + o] = res[t]


@numba.njit(**_KW, fastmath=_ACT_FLAGS, inline="always")
def _block_scale(x, t, b):  # max|x| / 32767 of block b of row t, and its reciprocal (0 if tiny)
    amax = np.float32(0.0)
    for j in range(32):
        amax = max(amax, abs(x[t, b * 32 + j]))
    if not amax > np.float32(1e-30):  # all zero (or NaN): the block quantizes to 0
        return np.float32(0.0), np.float32(0.0)
    d = amax / np.float32(32767.0)
    return d, np.float32(1.0) / d


@numba.njit(**_KW, fastmath=_ACT_FLAGS, inline="always")
def _rounded(v, inv):  # v / sx to the nearest integer, halves up (rint does not vectorise)
    return np.floor(v * inv + np.float32(0.5))


@numba.njit(**_KW, inline="always")
def _quantized(x, n_pad):  # act_quantize into fresh buffers
    n_t, k = x.shape
    xq = np.empty((n_pad, k), np.int16)
    sx = np.empty((k // 32, n_pad), np.float32)
    xs = np.empty((k // 32, n_pad), np.float32)
    act_quantize(x, xq, sx, xs)
    return xq, sx, xs


@numba.njit(**_KW)
def linear(fmt, tile, w, x, n_pad, out, col0, accumulate, base, n_chunks):  # type: ignore[no-untyped-def]
    """`out[:T, col0:col0 + rows] = x @ W.T` (`accumulate`: plus `base`'s same cells, which
    may be `out`'s) in one thread: x `[T, K]` fp32 rounded by `act_quantize` (padded to
    `n_pad` rows, a multiple of `tile`), then the GEMV over w `[rows, row_bytes]` GGUF blocks.
    One call a part: the rounding is not worth a call of its own (~3 us of Python and
    dispatch), and a linear rarely has more than one int16 part. `n_chunks` is unused (the
    parallel driver's split)."""
    xq, sx, xs = _quantized(x, n_pad)
    _gemv_rows(fmt, tile, w, xq, sx, xs, x.shape[0], out, col0, accumulate, base, 0, w.shape[0])


@numba.njit(**_KW, parallel=True)
def linear_par(fmt, tile, w, x, n_pad, out, col0, accumulate, base, n_chunks):  # type: ignore[no-untyped-def]
    """`linear` with the GEMV's output rows split into `n_chunks` even chunks (the rounding
    runs first, on the calling thread)."""
    xq, sx, xs = _quantized(x, n_pad)
    rows = w.shape[0]
    n_chunks = max(1, min(rows, n_chunks))
    for c in prange(n_chunks):
        r0, r1 = c * rows // n_chunks, (c + 1) * rows // n_chunks
        _gemv_rows(fmt, tile, w, xq, sx, xs, x.shape[0], out, col0, accumulate, base, r0, r1)


@numba.njit(**_KW, fastmath=_ACT_FLAGS)
def act_quantize(x, xq, sx, xs):  # type: ignore[no-untyped-def]
    """x `[T, K]` fp32 -> xq `[T', K]` int16 (rows past T zero), sx and xs `[K / 32, T']`:
    per 32-block scale max|x| / 32767 and the block sum of the rounded values, sx * sum xq
    (so the q4 min term is that of `act_round`'s x~, and every path computes x~ . W)."""
    n_t, k = x.shape
    xq[n_t:] = 0
    sx[:, n_t:] = 0
    xs[:, n_t:] = 0
    for t in range(n_t):
        for b in range(k // 32):
            d, inv = _block_scale(x, t, b)
            qsum = np.float32(0.0)  # exact: |sum| <= 32 * 32767 < 2^24
            for j in range(32):
                q = _rounded(x[t, b * 32 + j], inv)
                xq[t, b * 32 + j] = np.int16(q)
                qsum += q
            sx[b, t] = d
            xs[b, t] = d * qsum


@numba.njit(**_KW, fastmath=_ACT_FLAGS)
def act_round(x, out):  # type: ignore[no-untyped-def]
    """out = x~ = sx * xq, the activations `act_quantize` encodes (for the paths that multiply
    fp32: K-format GEMVs and prefill), bit-equal to its values."""
    n_t, k = x.shape
    for t in range(n_t):
        for b in range(k // 32):
            d, inv = _block_scale(x, t, b)
            for j in range(32):
                q = _rounded(x[t, b * 32 + j], inv)
                out[t, b * 32 + j] = np.float32(np.int16(q)) * d
