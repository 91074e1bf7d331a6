"""Linear layers and embeddings over GGUF block-quantized weights, kept quantized in memory.

Few-token calls (decode) run the Numba GEMV of `quant_numba`, which reads each weight block once
for all rows; many-token calls (prefill) dequantize the weight into an fp32 scratch with a
parallel Numba kernel and hand it to MKL (`F.linear`), where the matmul dominates. Modes:
"exact" dots fp32 activations with the dequantized blocks (equal to
`x @ quant.dequantize(W).T` up to summation order); "fast" quantizes each activation row to int8
per 32 elements first (llama.cpp's way; ~1e-3 relative error), for q4_0/q4_1/q8_0 parts
(K-format parts run exact in either mode).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention
from runtime.kernels.cpu.linear import CpuLinear
from runtime.kernels.cpu.quant import QuantMatrix

GEMV_MAX_TOKENS = 8  # more rows than this go through dequantize + MKL
# A parallel Numba call costs 50-100 us of thread wake-up: below this many weight elements x rows
# one thread is faster
PARALLEL_MIN_WORK = 1 << 16
MODES = ("exact", "fast")


@functools.cache
def _kernels() -> Any:
    """The Numba module (compiled, or loaded from Numba's cache, on first use)."""
    assert cpu_attention.available(), "Numba is not available"  # sets the threading layer
    from runtime.kernels.cpu import quant_numba  # module level: Numba can cache it

    return quant_numba


@functools.cache
def f16_table() -> np.ndarray:
    """fp32 value of every fp16 bit pattern `[65536]` (the kernels' fp16 reader)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


def _driver(name: str, work: int) -> tuple[Any, int]:
    """Kernel `name`'s serial driver, or its parallel one for `work` (weight elements x rows)
    past `PARALLEL_MIN_WORK`, with the chunk count to pass it."""
    kernels = _kernels()
    if work < PARALLEL_MIN_WORK:
        return getattr(kernels, name), 1
    cpu_attention.numba_threads(torch.get_num_threads())
    import numba

    return getattr(kernels, name + "_par"), int(numba.get_num_threads())


def dequantize_into(m: QuantMatrix, ids: np.ndarray, out: np.ndarray) -> None:
    """out `[len(ids), cols]` fp32 = rows `ids` of `m` (Numba; bit-equal to `quant.dequantize`)."""
    kernels = _kernels()
    kernel, n_chunks = _driver("dequant", len(ids) * m.cols)
    kernel(kernels.FMT_ID[m.fmt], m.data, ids, f16_table(), out, n_chunks)


class QuantLinear(CpuLinear):
    """`x @ W.T (+ bias)` for W the parts' rows concatenated, each part a `QuantMatrix`."""

    def __init__(
        self, parts: Sequence[QuantMatrix], bias: Tensor | None = None, mode: str = "exact"
    ) -> None:
        super().__init__()
        if not parts or len({p.cols for p in parts}) != 1:
            raise ValueError("QuantLinear needs one or more parts of equal cols")
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
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

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + self(x)`, the add done in the GEMV's store (or by addmm in prefill)."""
        return self._run(x, residual)

    def _run(self, x: Tensor, residual: Tensor | None) -> Tensor:
        x = x.to(torch.float32).contiguous()  # [T, in]
        if x.shape[0] > GEMV_MAX_TOKENS:
            return self._prefill(x, residual)
        if residual is not None:
            out = residual.to(torch.float32).clone()  # [T, out]
            if self.bias is not None:
                out += self.bias
        elif self.bias is not None:
            out = self.bias.expand(x.shape[0], -1).clone()  # [T, out]
        else:
            out = x.new_empty(x.shape[0], self.out_features)  # [T, out]
        self._gemv(x.numpy(), out.numpy(), accumulate=residual is not None or self.bias is not None)
        return out

    def _gemv(self, x: np.ndarray, out: np.ndarray, accumulate: bool) -> None:
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
            fmt = kernels.FMT_ID[part.fmt]
            fast = self._fast and fmt < 3
            kernel, n_chunks = _driver("gemv", part.rows * part.cols * n_t)
            sums = xs if fast else xs_exact
            kernel(fmt, fast, part.data, x, xq, xd, sums, f16, out, col0, accumulate, n_chunks)

    def _prefill(self, x: Tensor, residual: Tensor | None) -> Tensor:
        w = torch.empty(self.out_features, self.in_features)  # [out, in] fp32 scratch
        wn = w.numpy()
        for part, r0 in zip(self.parts, self.offsets, strict=False):
            dequantize_into(part, np.arange(part.rows), wn[r0 : r0 + part.rows])
        if residual is None:
            return F.linear(x, w, self.bias)  # [T, out]
        base = residual if self.bias is None else residual + self.bias
        return torch.addmm(base, x, w.t())  # [T, out]


class QuantEmbedding:
    """Token embeddings from a quantized table `[vocab, hidden]`: only looked-up rows decoded."""

    def __init__(self, table: QuantMatrix) -> None:
        self.table = table

    def __call__(self, ids: Tensor) -> Tensor:
        idx = ids.reshape(-1).to(torch.int64).numpy()  # [T]
        out = np.empty((idx.shape[0], self.table.cols), np.float32)
        dequantize_into(self.table, idx, out)
        return torch.from_numpy(out)  # [T, hidden]
