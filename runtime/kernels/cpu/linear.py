"""oneDNN-packed fp32 linear layers for the CPU.

`F.linear` on the CPU hands MKL the weight as stored and MKL re-packs it on every call; with the
small token counts of decode steps that packing is a large part of each matmul. `PackedLinear`
packs each weight once into oneDNN's blocked layout (what PyTorch's own CPU freezing pass does);
`Fp16WeightLinear` keeps fbgemm fp16 weights with fp32 activations. Results equal `F.linear` up
to summation order (and, for fp16, the weights' rounding). Speed-ups: profiling/README.md.
`runtime.model.backends.pack_linears` swaps them into a model; `--cpu_linear aten` keeps
`F.linear`.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

_BATCH_HINT_TOKENS = 64  # the row count oneDNN tunes the packed layout for; any count works


@functools.cache
def onednn_available() -> bool:
    """oneDNN is built in and its packing ops exist."""
    ops: Any = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


class CpuLinear(nn.Module):
    """An inference-only stand-in for `nn.Linear` on the CPU, its weight packed once."""

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + self(x)`; subclasses may fuse the add into the matmul."""
        return residual + self(x)  # [T, out]


class PackedLinear(CpuLinear):
    """fp32 weight in oneDNN's packed layout."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        ops: Any = torch.ops.mkldnn
        self.packed = ops._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT_TOKENS)
        self.weight_bytes = weight.numel() * 4
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        ops: Any = torch.ops.mkldnn
        return ops._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + self(x)` in one oneDNN call (the add is a post-op of the matmul)."""
        ops: Any = torch.ops.mkldnn
        out = ops._linear_pointwise.binary(x.contiguous(), residual, self.packed, self.bias, "add")
        return out  # [T, out]


@functools.cache
def fp16_weights_available() -> bool:
    """fbgemm's fp16-weight GEMM is built in (x86 CPU builds of PyTorch)."""
    ops: Any = torch.ops.quantized
    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and hasattr(ops, "linear_prepack_fp16")
        and hasattr(ops, "linear_dynamic_fp16")
    )


class Fp16WeightLinear(CpuLinear):
    """fp32 activations times an fp16-stored weight (fbgemm converts it on the fly; fp32 sums).

    What `--data_type fp16` means on a CPU: half the weight bytes read per token; outputs differ
    from fp32 by the weights' fp16 rounding (~1e-3 relative).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        ops: Any = torch.ops.quantized
        w32 = weight.detach().float().contiguous()
        b32 = None if bias is None else bias.detach().float().contiguous()
        self.packed = ops.linear_prepack_fp16(w32, b32)
        self.weight_bytes = weight.numel() * 2

    def forward(self, x: Tensor) -> Tensor:
        ops: Any = torch.ops.quantized
        return ops.linear_dynamic_fp16(x.contiguous(), self.packed)  # [T, out] fp32
