"""Assemble a loaded model for its device: the layer backends (`runtime.model.backends`) and,
on the CPU, packed projections (`runtime.kernels.cpu.linear`) in place of `nn.Linear`."""

from __future__ import annotations

import torch
from torch import nn

from runtime.kernels.cpu import linear as cpu_linear
from runtime.model.backends import Backends, BackendSettings, select_backends
from runtime.model.llama import CausalLM


def pack_linears(model: CausalLM, cpu_linear_mode: str, weights: str = "fp32") -> int:
    """Swap the decoder's projections for packed CPU layers and pack the LM head; returns how
    many matrices were packed (0 off the CPU, for non-fp32 models, or when turned off).

    `weights="fp32"`: oneDNN's packed fp32 layout (`cpu_linear_mode="onednn"`, else nothing);
    `"fp16"`: fbgemm's fp16 weights (`Fp16WeightLinear`), and the embedding table (kept fp32 for
    the lookup) rounded to fp16 values too, so the model is exactly an fp32 model with every
    weight matrix rounded to fp16. A tied LM head costs one extra copy of the embedding matrix.
    """
    make: type[cpu_linear.PackedLinear] | type[cpu_linear.Fp16WeightLinear]
    if weights == "fp16":
        ok, make = cpu_linear.fp16_weights_available(), cpu_linear.Fp16WeightLinear
    elif weights == "fp32":
        ok = cpu_linear_mode == "onednn" and cpu_linear.onednn_available()
        make = cpu_linear.PackedLinear
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


def assemble(
    model: CausalLM, settings: BackendSettings | None = None, weights: str = "fp32"
) -> tuple[Backends, int]:
    """Pick the backends for the model's device and dtype and swap in packed CPU projections
    (`weights` as in `pack_linears`); returns the backends and the number of packed matrices."""
    settings = settings or BackendSettings()
    device = model.norm.device
    ops = select_backends(device, model.dtype, settings)
    model.use_backends(ops)
    packed = pack_linears(model, settings.cpu_linear, weights) if device.type == "cpu" else 0
    return ops, packed
