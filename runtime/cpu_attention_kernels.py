"""Numba kernels of `runtime.cpu_attention`, at module level so Numba's on-disk cache works
(functions defined inside another function, or calling a closure, are recompiled in every process:
seconds at start-up). Import through `cpu_attention._kernel()`, which picks the threading layer
first."""

# mypy: ignore-errors

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from llvmlite.binding import llvm_version_info
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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
def one_seq(qb, k, v, trow, n, out, scale, probs, acc):  # type: ignore[no-untyped-def]
    # qb [nkv, g, hd]; k, v [S, nkv, hd]; trow [L] slots; out, acc [nkv, g, hd]; probs [nkv*g, L]
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
        tot = np.float32(0.0)
        for t in range(n):
            e = np.exp(pr[t] - m)
            pr[t] = e
            tot += e
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
    for b in range(q.shape[0]):
        one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs, acc)


@numba.njit(
    parallel=True, fastmath=True, cache=True, nogil=True, boundscheck=False, error_model="numpy"
)
def paged_decode_par(q, k, v, table, seq_lens, out, scale):  # type: ignore[no-untyped-def]
    n_kv, g = q.shape[1], q.shape[2]
    for b in numba.prange(q.shape[0]):  # one sequence per work item: its slots' rows read whole
        probs = np.empty((n_kv * g, table.shape[1]), dtype=np.float32)
        acc = np.empty((n_kv, g, q.shape[3]), dtype=np.float32)
        one_seq(q[b], k, v, table[b], seq_lens[b], out[b], scale, probs, acc)
