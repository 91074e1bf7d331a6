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


def pack_weight(weight: Tensor) -> Tensor:
    """`[out, in]` fp32 weight -> oneDNN's packed layout (an opaque mkldnn tensor)."""
    ops: Any = torch.ops.mkldnn
    return ops._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT_TOKENS)


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """`[T, in]` @ packed `[out, in]`^T (+ bias) -> `[T, out]`."""
    ops: Any = torch.ops.mkldnn
    return ops._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """Inference-only stand-in for an fp32 `nn.Linear` on the CPU, its weight packed once."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed = pack_weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.packed, self.bias)  # [T, out]

    def add_to(self, x: Tensor, residual: Tensor) -> Tensor:
        """`residual + self(x)` in one oneDNN call (the add is a post-op of the matmul)."""
        ops: Any = torch.ops.mkldnn
        out = ops._linear_pointwise.binary(x.contiguous(), residual, self.packed, self.bias, "add")
        return out  # [T, out]


def pack_model(model: CausalLM) -> int:
    """Swap the decoder's projections for packed ones and pack the LM head; returns how many
    matrices were packed (0 when the model is not fp32 on the CPU or oneDNN is unavailable).

    The dense projection weights are dropped; the embedding stays (the lookup needs it), so a
    tied LM head costs one extra copy of the embedding matrix.
    """
    if not available() or model.dtype != torch.float32 or model.norm.device.type != "cpu":
        return 0
    count = 0
    with torch.inference_mode():
        for layer in model.decoder_layers():
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                linear = getattr(layer, name)
                if isinstance(linear, nn.Linear):
                    setattr(layer, name, PackedLinear(linear))
                    count += 1
        if model.config.head_kind == "lm":
            head = model.lm_head.weight if model.lm_head is not None else model.embed_tokens.weight
            model.packed_lm_head = pack_weight(head)
            count += 1
    return count
