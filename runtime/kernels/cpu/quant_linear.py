"""Linear layers and embeddings over GGUF block-quantized weights, kept quantized in memory.

Few-token calls (decode) run a Numba GEMV that reads each weight block once for all rows:
`quant_lanes` over the lane layout of `quant_pack` (q4_0/q4_1/q8_0 in exact mode, repacked at
load), `quant_numba` over the GGUF blocks as shipped (the K formats, and fast mode). Lane parts
at 9-32 tokens (batched decode) are decoded a chunk of row groups at a time in lane order, then
multiplied with one small GEMM per group (`_staged`). Many-token calls (prefill) dequantize the
weight with a parallel Numba kernel, a cache-sized chunk of rows at a time into one reused fp32
scratch, and hand each chunk to MKL. Modes:
"exact" dots fp32 activations with the dequantized blocks (equal to
`x @ quant.dequantize(W).T` up to summation order); "fast" quantizes each activation row to int8
per 32 elements first (llama.cpp's way; ~1e-3 relative error), for q4_0/q4_1/q8_0 parts
(K-format parts run exact in either mode).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention
from runtime.kernels.cpu import quant_pack
from runtime.kernels.cpu.linear import CpuLinear
from runtime.kernels.cpu.quant import FMT_ID, QuantMatrix
from runtime.kernels.cpu.quant_pack import LaneMatrix

Part = QuantMatrix | LaneMatrix

GEMV_MAX_TOKENS = 8  # GGUF-block parts: more rows than this go through dequantize + MKL
# lane parts: the lane GEMV up to LANE_GEMV_MAX_TOKENS rows, staged batched GEMMs up to
# STAGED_MAX_TOKENS, dequantize + MKL past it (profiling/README.md, session 8)
LANE_GEMV_MAX_TOKENS = 8
STAGED_MAX_TOKENS = 32
# A parallel Numba call costs 50-100 us of thread wake-up: below this many weight elements x rows
# one thread is faster
PARALLEL_MIN_WORK = 1 << 16
MODES = ("exact", "int16", "fast")
INT16_FORMATS = ("q4_0", "q4_1", "q8_0")  # int16 mode's integer GEMV; K formats multiply fp32
# int16 mode: the integer GEMV up to this many rows, dequantize + MKL past it. A token's GEMV
# result is the same bits in any batch, so decode batches up to 64 are batch-invariant to the
# bit; past ~32 rows the vector dequantize + MKL is faster, by up to 1.3x at 64 (profiling/
# README.md, session 9)
INT16_GEMV_MAX_TOKENS = 64
_TILE_FOR = (1, 1, 2, 4, 4, 8)  # int16 GEMV's token tile for T rows (8 from 5 up)


def int16_tile(n_tokens: int) -> int:
    """The int16 GEMV's token tile for `n_tokens` rows."""
    return _TILE_FOR[min(n_tokens, len(_TILE_FOR) - 1)]


# prefill dequantizes this many weight elements at a time (4 MB of fp32: stays in cache for MKL)
PREFILL_CHUNK_ELEMS = 1 << 20


@functools.cache
def _kernels() -> Any:
    """The Numba module (compiled, or loaded from Numba's cache, on first use)."""
    assert cpu_attention.available(), "Numba is not available"  # sets the threading layer
    from runtime.kernels.cpu import quant_numba  # module level: Numba can cache it

    return quant_numba


@functools.cache
def _lane_kernels() -> Any:
    """The lane-layout Numba module (`quant_lanes`)."""
    assert cpu_attention.available(), "Numba is not available"  # sets the threading layer
    from runtime.kernels.cpu import quant_lanes

    return quant_lanes


@functools.cache
def _int16_kernels() -> Any:
    """int16 mode's Numba module (`quant_int16`)."""
    assert cpu_attention.available(), "Numba is not available"  # sets the threading layer
    from runtime.kernels.cpu import quant_int16

    return quant_int16


@functools.cache
def f16_table() -> np.ndarray:
    """fp32 value of every fp16 bit pattern `[65536]` (the kernels' fp16 reader)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _driver(name: str, work: int, lanes: bool = False, kernels: Any = None) -> tuple[Any, int]:
    """Kernel `name`'s serial driver, or its parallel one for `work` (weight elements x rows)
    past `PARALLEL_MIN_WORK`, with the chunk count to pass it (`lanes`: of `quant_lanes`;
    `kernels`: of that module)."""
    if kernels is None:
        kernels = _lane_kernels() if lanes else _kernels()
    if work < PARALLEL_MIN_WORK:
        return getattr(kernels, name), 1
    return getattr(kernels, name + "_par"), cpu_attention.numba_threads(torch.get_num_threads())


def dequantize_into(m: Part, ids: np.ndarray, out: np.ndarray) -> None:
    """out `[len(ids), cols]` fp32 = rows `ids` of `m` (Numba; bit-equal to `quant.dequantize`)."""
    if isinstance(m, LaneMatrix):
        kernel, n_chunks = _driver("dequant", len(ids) * m.cols, lanes=True)
        kernel(m.q8, m.qs, m.d, m.m, m.blocks, ids, out, n_chunks)
        return
    kernel, n_chunks = _driver("dequant", len(ids) * m.cols)
    kernel(FMT_ID[m.fmt], m.data, ids, f16_table(), out, n_chunks)


def _dequant_rows_into(m: QuantMatrix, r0: int, r1: int, out: np.ndarray) -> None:
    """out `[r1 - r0, cols]` fp32 = rows [r0, r1) of `m` (q4_0/q4_1/q8_0: `quant_int16`'s vector
    kernel; others: `quant_numba`'s; both bit-equal to `quant.dequantize`)."""
    if m.fmt not in INT16_FORMATS:
        dequantize_into(m, np.arange(r0, r1), out)
        return
    k16 = _int16_kernels()
    kernel, n_chunks = _driver("dequant", (r1 - r0) * m.cols, kernels=k16)
    kernel(FMT_ID[m.fmt], m.data, r0, r1, out, n_chunks)


class QuantLinear(CpuLinear):
    """`x @ W.T (+ bias)` for W the parts' rows concatenated. Exact mode repacks the parts that
    have a lane layout (`quant_pack.can_pack`); fast mode keeps the GGUF blocks."""

    def __init__(
        self, parts: Sequence[Part], bias: Tensor | None = None, mode: str = "exact"
    ) -> None:
        super().__init__()
        if not parts or len({p.cols for p in parts}) != 1:
            raise ValueError("QuantLinear needs one or more parts of equal cols")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        if mode == "exact":  # lane layout, adjacent parts of one format in one matrix (one call)
            parts = quant_pack.merge_adjacent([lane_layout(p) for p in parts])
        elif any(isinstance(p, LaneMatrix) for p in parts):
            raise ValueError(f"{mode} mode runs on GGUF blocks, not the lane layout")
        if mode == "int16":  # adjacent parts of one format in one matrix (one call)
            parts = merge_blocks(parts)
        self.parts = tuple(parts)
        self.mode = mode
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        self.weight_bytes = sum(p.nbytes for p in parts)
        self.offsets = np.cumsum([0] + [p.rows for p in parts]).tolist()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous()
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias {tuple(self.bias.shape)} != ({self.out_features},)")
        self._fast = mode == "fast"
        self._int16 = mode == "int16"
        self._int16_parts = [  # (format id, blocks, first output column, weight elements)
            (FMT_ID[p.fmt], p.data, c, p.rows * p.cols)
            for p, c in zip(self.parts, self.offsets, strict=False)
            if isinstance(p, QuantMatrix) and p.fmt in INT16_FORMATS
        ]
        self._fp32_blocks = any(p.fmt not in INT16_FORMATS for p in self.parts)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + self(x)`, the add done in the GEMV's store (or by addmm in prefill)."""
        return self._run(x, residual)

    def _run(self, x: Tensor, residual: Tensor | None) -> Tensor:
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()  # [T, in]
        if self._int16:
            return self._run_int16(x, residual)
        n_t = x.shape[0]
        lane_path = _lane_path(n_t)
        block_gemv = n_t <= GEMV_MAX_TOKENS
        has_lanes = any(isinstance(p, LaneMatrix) for p in self.parts)
        has_blocks = any(isinstance(p, QuantMatrix) for p in self.parts)
        # every path but the GEMVs adds its products into `out`
        adds = (has_lanes and lane_path != "gemv") or (has_blocks and not block_gemv)
        out, accumulate = self._out(x, residual, adds)
        if has_lanes:
            if lane_path == "gemv":
                self._gemv_lanes(x.numpy(), out.numpy(), accumulate)
            elif lane_path == "staged":
                self._staged(x, out)
            else:
                self._prefill(x, out, LaneMatrix)
        if has_blocks:
            if block_gemv:
                self._gemv_blocks(x.numpy(), out.numpy(), accumulate)
            else:
                self._prefill(x, out, QuantMatrix)
        return out

    def _out(self, x: Tensor, residual: Tensor | None, adds: bool) -> tuple[Tensor, bool]:
        """The output `[T, out]`, holding residual + bias where there are any (or zeros where
        the products are added), and whether the kernels add into it."""
        n_t = x.shape[0]
        if residual is not None:
            out = residual.to(torch.float32).clone()  # [T, out]
            if self.bias is not None:
                out += self.bias
        elif self.bias is not None:
            out = self.bias.expand(n_t, -1).clone()  # [T, out]
        elif adds:
            out = x.new_zeros(n_t, self.out_features)  # [T, out]
        else:  # the GEMVs store their sums
            return torch.from_numpy(np.empty((n_t, self.out_features), np.float32)), False
        return out, True

    def _run_int16(self, x: Tensor, residual: Tensor | None) -> Tensor:
        """int16 mode: the integer GEMV for q4_0/q4_1/q8_0 parts up to
        `INT16_GEMV_MAX_TOKENS` rows; K-format parts and prefill multiply the same rounded
        activations x~ in fp32."""
        k16 = _int16_kernels()
        n_t = x.shape[0]
        gemv = n_t <= INT16_GEMV_MAX_TOKENS
        base: np.ndarray | None = None  # what the GEMV adds its sums to (None: `out` itself)
        if gemv and residual is not None and self.bias is None and not self._fp32_blocks:
            base = residual.to(torch.float32).contiguous().numpy()  # [T, out], added in the store
            out, accumulate = torch.from_numpy(np.empty_like(base)), True
        else:
            out, accumulate = self._out(x, residual, not gemv)
        if not gemv or self._fp32_blocks:
            xr = torch.empty_like(x)  # [T, in] x~
            k16.act_round(x.numpy(), xr.numpy())
            if not gemv:
                self._prefill(xr, out, QuantMatrix)
                return out
            self._gemv_blocks(xr.numpy(), out.numpy(), accumulate, skip=INT16_FORMATS)
        tile = int16_tile(n_t)
        n_pad = -(-n_t // tile) * tile
        o = out.numpy()
        if base is None:
            base = o
        for fmt, data, col0, size in self._int16_parts:  # rounding and GEMV in one call
            kernel, n_chunks = _driver("linear", size * n_t, kernels=k16)
            kernel(fmt, tile, data, x.numpy(), n_pad, o, col0, accumulate, base, n_chunks)
        return out

    def _gemv_lanes(self, x: np.ndarray, out: np.ndarray, accumulate: bool) -> None:
        kernels = _lane_kernels()
        n_t, k = x.shape
        nb = k // 32
        xl = np.empty((n_t, 32, quant_pack.LANE_ROWS * nb), np.float32)  # x laid out in lanes
        xs = np.empty((n_t, nb), np.float32)  # per-32 block sums
        kernels.lay_out(x, nb, xl, xs)
        for part, col0 in zip(self.parts, self.offsets, strict=False):
            if isinstance(part, LaneMatrix):
                kernel, n_chunks = _driver("gemv", part.rows * part.cols * n_t, lanes=True)
                kernel(
                    part.q8, part.qs, part.d, part.m, xl, xs, nb, out, col0, accumulate, n_chunks
                )

    def _gemv_blocks(
        self, x: np.ndarray, out: np.ndarray, accumulate: bool, skip: Sequence[str] = ()
    ) -> None:
        kernels = _kernels()
        n_t, k = x.shape
        xs = np.empty((n_t, k // 32), np.float32)  # per-32 block sums
        xd = np.empty((n_t, k // 32), np.float32)  # fast mode's activation scales
        xq = np.empty((n_t, k if self._fast else 0), np.int8)  # fast mode's int8 activations
        if self._fast:
            kernels.act_quantize(x, xq, xd, xs)
            xs_exact = np.empty_like(xs)
            if any(p.fmt in ("q4_k", "q6_k") for p in self.parts):
                kernels.act_block_sums(x, xs_exact)
        else:
            kernels.act_block_sums(x, xs)
            xs_exact = xs
        f16 = f16_table()
        for part, col0 in zip(self.parts, self.offsets, strict=False):
            if not isinstance(part, QuantMatrix) or part.fmt in skip:
                continue
            fmt = FMT_ID[part.fmt]
            fast = self._fast and fmt < 3
            kernel, n_chunks = _driver("gemv", part.rows * part.cols * n_t)
            sums = xs if fast else xs_exact
            kernel(fmt, fast, part.data, x, xq, xd, sums, f16, out, col0, accumulate, n_chunks)

    def _staged(self, x: Tensor, out: Tensor) -> None:
        """`out += x @ W.T` for the lane parts, a cache-sized chunk of row groups at a time:
        each chunk decoded in lane order (`quant_lanes.stage`: contiguous, vectorised; the
        transposed scratch of `_prefill` costs ~4x more to write), then one small GEMM per
        group (`bmm`) against the activations permuted to the stage's column order."""
        n_t, cols = x.shape
        nb = cols // 32
        xp = x.view(n_t, nb, 32).transpose(1, 2).reshape(n_t, cols)  # [T, in], k' = 32-j-major
        lanes = quant_pack.LANE_ROWS * nb
        step_groups = max(1, PREFILL_CHUNK_ELEMS // (quant_pack.LANE_ROWS * cols))
        scratch = _scratch(step_groups * 32 * lanes)
        for part, col0 in zip(self.parts, self.offsets, strict=False):
            if not isinstance(part, LaneMatrix):
                continue
            n_g = part.rows // quant_pack.LANE_ROWS
            for g0 in range(0, n_g, step_groups):
                g1 = min(n_g, g0 + step_groups)
                st = scratch[: (g1 - g0) * 32 * lanes].view(g1 - g0, 32, lanes)  # lane order
                kernel, n_chunks = _driver("stage", (g1 - g0) * 32 * lanes, lanes=True)
                kernel(part.q8, part.qs, part.d, part.m, g0, g1, st.numpy(), n_chunks)
                y = torch.bmm(xp.expand(g1 - g0, n_t, cols), st.view(g1 - g0, cols, -1))
                rows = slice(col0 + g0 * quant_pack.LANE_ROWS, col0 + g1 * quant_pack.LANE_ROWS)
                out[:, rows] += y.transpose(0, 1).reshape(n_t, -1)  # [T, 8 (g1 - g0)]

    def _prefill(self, x: Tensor, out: Tensor, kind: type) -> None:
        """`out += x @ W.T` for the parts of `kind`: rows of W dequantized a cache-sized chunk
        at a time into one reused scratch (no fp32 copy of a whole matrix, no page faults per
        call), each chunk's product by MKL."""
        cols = self.in_features
        step_rows = max(8, (PREFILL_CHUNK_ELEMS // cols) // 8 * 8)
        scratch = _scratch(step_rows * cols)
        for part, col0 in zip(self.parts, self.offsets, strict=False):
            if not isinstance(part, kind):
                continue
            for r0 in range(0, part.rows, step_rows):
                r1 = min(part.rows, r0 + step_rows)
                n = r1 - r0
                if isinstance(part, LaneMatrix):  # transposed: contiguous writes, 8 rows a time
                    wt = scratch[: n * cols].view(cols, n)  # [in, rows] fp32
                    kernel, n_chunks = _driver("dequant_t", n * cols, lanes=True)
                    g0, g1 = r0 // quant_pack.LANE_ROWS, r1 // quant_pack.LANE_ROWS
                    kernel(
                        part.q8, part.qs, part.d, part.m, part.blocks, g0, g1, wt.numpy(), n_chunks
                    )
                else:
                    wt = scratch[: n * cols].view(n, cols).t()  # [in, rows] fp32
                    _dequant_rows_into(part, r0, r1, wt.t().numpy())
                out[:, col0 + r0 : col0 + r1].addmm_(x, wt)  # [T, rows]


def _lane_path(n_tokens: int) -> str:
    """How lane parts multiply `n_tokens` rows: "gemv", "staged" or "prefill"."""
    if n_tokens <= LANE_GEMV_MAX_TOKENS:
        return "gemv"
    return "staged" if n_tokens <= STAGED_MAX_TOKENS else "prefill"


_SCRATCH = threading.local()


def _scratch(n_elems: int) -> Tensor:
    """This thread's reused fp32 scratch, of at least `n_elems`."""
    held: Tensor | None = getattr(_SCRATCH, "buf", None)
    if held is None or held.numel() < n_elems:
        held = _SCRATCH.buf = torch.empty(n_elems)
    return held


class QuantEmbedding:
    """Token embeddings from a quantized table `[vocab, hidden]`: only looked-up rows decoded."""

    def __init__(self, table: Part) -> None:
        self.table = table

    def __call__(self, ids: Tensor) -> Tensor:
        idx = ids.reshape(-1).to(torch.int64).numpy()  # [T]
        out = np.empty((idx.shape[0], self.table.cols), np.float32)
        dequantize_into(self.table, idx, out)
        return torch.from_numpy(out)  # [T, hidden]


def merge_blocks(parts: Sequence[Part]) -> list[Part]:
    """Runs of adjacent GGUF-block parts of one format as one matrix (their rows stacked)."""
    out: list[Part] = []
    for p in parts:
        last = out[-1] if out else None
        if isinstance(p, QuantMatrix) and isinstance(last, QuantMatrix) and last.fmt == p.fmt:
            data = np.concatenate([last.data, p.data])
            out[-1] = QuantMatrix(p.fmt, data, last.rows + p.rows, p.cols)
        else:
            out.append(p)
    return out


def lane_layout(m: Part) -> Part:
    """`m` in the lane layout where it has one (`quant_pack.can_pack`), else as it is."""
    if isinstance(m, QuantMatrix) and quant_pack.can_pack(m):
        return quant_pack.pack(m)
    return m
