"""oneDNN-packed fp32 linear layers for the CPU.

`F.linear` on the CPU hands MKL the weight as stored and MKL re-packs it on every call; with the
small token counts of decode steps that packing is a large part of each matmul. Packing each
weight once into oneDNN's blocked layout (what PyTorch's own CPU freezing pass does) measured, on
the 2-core AVX2 machine this project is developed on, for the default model's layer shapes:
1.2x at 1 token, 1.6x at 8, 1.25x at 64, 1.15x at 512, and 1.9x for the 49152-wide LM head at
64 rows (`profiling/bench_offline.py` shows the end-to-end effect). Results equal `F.linear`
up to summation order. `NURSERVE_CPU_LINEAR=aten` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from runtime.model import CausalLM

_BATCH_HINT_TOKENS = 64  # the row count oneDNN tunes the packed layout for; any count works


@functools.cache
def available() -> bool:
    """oneDNN is built in, its packing ops exist, and no one asked for plain `F.linear`."""
    if os.environ.get("NURSERVE_CPU_LINEAR", "onednn") != "onednn":
        return False
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

    What `--data_type fp16` means on a CPU: half the weight bytes read per token. Measured here on
    the default model's 30 layers against `PackedLinear`: 1.98x at 1 token, 1.49x at 8, 1.36x at
    64, equal at 512; outputs differ from fp32 by the weights' fp16 rounding (~1e-3 relative).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        ops: Any = torch.ops.quantized
        w32 = weight.detach().float().contiguous()
        b32 = None if bias is None else bias.detach().float().contiguous()
        self.packed = ops.linear_prepack_fp16(w32, b32)

    def forward(self, x: Tensor) -> Tensor:
        ops: Any = torch.ops.quantized
        return ops.linear_dynamic_fp16(x.contiguous(), self.packed)  # [T, out] fp32


def pack_model(model: CausalLM, weights: str = "fp32") -> int:
    """Swap the decoder's projections for packed ones and pack the LM head; returns how many
    matrices were packed (0 when the model is not fp32 on the CPU or the backend is missing).

    `weights="fp32"`: oneDNN's packed fp32 layout; `"fp16"`: fbgemm's fp16 weights
    (`Fp16WeightLinear`), and the embedding table (kept fp32 for the lookup) rounded to fp16
    values too, so the model is exactly an fp32 model with every weight matrix rounded to fp16.
    The dense projection weights are dropped; the embedding stays (the lookup needs it), so a
    tied LM head costs one extra copy of the embedding matrix.
    """
    make: type[PackedLinear] | type[Fp16WeightLinear]
    if weights == "fp16":
        ok, make = fp16_weights_available(), Fp16WeightLinear
    elif weights == "fp32":
        ok, make = available(), PackedLinear
    else:
        raise ValueError(f"weights must be fp32 or fp16, got {weights!r}")
    if not ok or model.dtype != torch.float32 or model.norm.device.type != "cpu":
        return 0
    count = 0
    with torch.inference_mode():
        if weights == "fp16":
            table = model.embed_tokens.weight
            table.copy_(table.half().float())
        for layer in model.decoder_layers():
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                linear = getattr(layer, name)
                if isinstance(linear, nn.Linear):
                    setattr(layer, name, make(linear.weight, linear.bias))
                    count += 1
        if model.config.head_kind == "lm":
            head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
            model.packed_lm_head = make(head)
            count += 1
    return count
