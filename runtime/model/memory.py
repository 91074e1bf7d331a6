"""What a model's weights cost: resident bytes, and the bytes one decode step must read."""

from __future__ import annotations

from torch import nn

from runtime.kernels.cpu.quant import QuantMatrix
from runtime.kernels.cpu.quant_pack import LaneMatrix
from runtime.model.llama import CausalLM


def _blocks(module: nn.Module) -> list[QuantMatrix | LaneMatrix]:
    parts = list(getattr(module, "parts", ()))
    table = getattr(module, "table", None)
    return parts + ([table] if isinstance(table, QuantMatrix | LaneMatrix) else [])


def weight_bytes(model: CausalLM, per_decode_step: bool = False) -> int:
    """Parameters, packed CPU layers and quantized blocks (a block shared by the embedding and
    a tied head counted once). `per_decode_step`: leave out a dense embedding table, of which a
    decode step reads one row (a quantized table shared with the head is read whole by it)."""
    total = 0
    for name, p in model.named_parameters():
        if not (per_decode_step and name == "embed_tokens.weight"):
            total += p.numel() * p.element_size()
    seen: set[int] = set()
    for mod in model.modules():
        blocks = _blocks(mod)
        for m in blocks:
            if id(m) not in seen:
                seen.add(id(m))
                total += m.nbytes
        if not blocks and isinstance(getattr(mod, "weight_bytes", None), int):
            total += int(mod.weight_bytes)  # type: ignore[arg-type]
    return total
