"""A model whose projections, LM head and embedding table stay in the GGUF's block formats.

Quantized tensors of a supported format (`runtime.kernels.cpu.quant.FORMATS`) become
`QuantLinear` layers and a `QuantEmbedding` over the file's bytes (q/k rows un-permuted, still
quantized); everything else (norms, and tensors of other formats) is read as fp32. The weights'
memory is then about the file's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from runtime.kernels.cpu.quant import FORMATS, GGML_TYPE, QuantMatrix, dequantize, quantize
from runtime.kernels.cpu.quant_linear import QuantEmbedding, QuantLinear, lane_layout
from runtime.kernels.cpu.quant_pack import LaneMatrix
from runtime.loading.gguf_file import hf_name, open_gguf, unpermute_qk
from runtime.model.config import CheckpointError, ModelConfig
from runtime.model.llama import CausalLM, DecoderLayer, rope_inv_freq

_FORMAT_OF_TYPE = {v: k for k, v in GGML_TYPE.items()}
Weight = QuantMatrix | Tensor  # a quantized matrix, or an fp32 tensor


class QuantEmbeddingModule(nn.Module):
    """`nn.Embedding`'s place in the model for a quantized table (rows decoded on lookup)."""

    def __init__(self, table: QuantMatrix | LaneMatrix) -> None:
        super().__init__()
        self.table = table
        self._lookup = QuantEmbedding(table)

    def forward(self, ids: Tensor) -> Tensor:
        return self._lookup(ids)  # [T, hidden] fp32


def read_weights(path: Path, cfg: ModelConfig) -> dict[str, Weight]:
    """HF-named weights of a GGUF file: QuantMatrix where the format is ours, else fp32."""
    reader = open_gguf(path)
    out: dict[str, Weight] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue
        name = hf_name(t.name, path)
        shape = tuple(int(d) for d in reversed(t.shape))  # ne lists dims innermost first
        fmt = _FORMAT_OF_TYPE.get(int(t.tensor_type))
        heads = _qk_heads(name, cfg)
        if fmt in FORMATS and len(shape) == 2:
            raw = np.array(t.data, dtype=np.uint8).reshape(shape[0], -1)  # a private copy
            m = QuantMatrix(fmt, raw, shape[0], shape[1])
            if heads:
                m = m.take_rows(unpermute_qk(np.arange(shape[0])[:, None], heads)[:, 0])
            out[name] = m
        else:
            from gguf.quants import dequantize as gguf_dequantize

            arr = np.asarray(gguf_dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
            out[name] = torch.from_numpy(np.array(unpermute_qk(arr, heads) if heads else arr))
    return out


def _qk_heads(name: str, cfg: ModelConfig) -> int:
    if ".self_attn.q_proj." in name:
        return cfg.num_heads
    if ".self_attn.k_proj." in name:
        return cfg.num_kv_heads
    return 0


def _parts(weights: dict[str, Weight], names: list[str], fmt: str | None) -> list[QuantMatrix]:
    """The named matrices as QuantMatrix parts (dense ones quantized to `fmt`, or q8_0)."""
    parts = []
    for n in names:
        w = weights.pop(n)
        parts.append(w if isinstance(w, QuantMatrix) else quantize(w.float(), fmt or "q8_0"))
    return parts


def _bias(weights: dict[str, Weight], names: list[str]) -> Tensor | None:
    if names[0] not in weights:
        return None
    return torch.cat([_dense(weights.pop(n)) for n in names])


def _dense(w: Weight) -> Tensor:
    return dequantize(w) if isinstance(w, QuantMatrix) else w.float()


def _layer(layer: DecoderLayer, w: dict[str, Weight], p: str, mode: str, fmt: str | None) -> None:
    qkv = [p + f"self_attn.{x}_proj." for x in "qkv"]
    gate_up = [p + "mlp.gate_proj.", p + "mlp.up_proj."]
    specs = {
        "qkv_proj": qkv,
        "o_proj": [p + "self_attn.o_proj."],
        "gate_up_proj": gate_up,
        "down_proj": [p + "mlp.down_proj."],
    }
    for attr, prefixes in specs.items():
        parts = _parts(w, [x + "weight" for x in prefixes], fmt)
        bias = _bias(w, [x + "bias" for x in prefixes])
        setattr(layer, attr, QuantLinear(parts, bias, mode))
    layer.input_layernorm = nn.Parameter(_dense(w.pop(p + "input_layernorm.weight")))
    layer.post_attention_layernorm = nn.Parameter(
        _dense(w.pop(p + "post_attention_layernorm.weight"))
    )


def build_quantized(
    cfg: ModelConfig, weights: dict[str, Weight], mode: str, fmt: str | None = None
) -> CausalLM:
    """The model over `weights`; dense matrices among them are quantized to `fmt` (q8_0 if
    None). `mode`: the kernels' arithmetic ("exact" or "fast")."""
    if cfg.is_reward_model:
        raise CheckpointError("quantized weights serve causal LMs only (use --quant_type none)")
    with torch.device("meta"):
        model = CausalLM(cfg, torch.float32)
    for i, layer in enumerate(model.decoder_layers()):
        _layer(layer, weights, f"model.layers.{i}.", mode, fmt)
    (block_table,) = _parts(weights, ["model.embed_tokens.weight"], fmt)
    table: QuantMatrix | LaneMatrix = block_table
    if mode == "exact":  # the layout the tied head's GEMV reads, shared by the lookups
        table = lane_layout(table)
    model.embed_tokens = QuantEmbeddingModule(table)  # type: ignore[assignment]
    head: list[QuantMatrix | LaneMatrix] = [table]
    if "lm_head.weight" in weights:
        head = list(_parts(weights, ["lm_head.weight"], fmt))
    model.lm_head = None
    model.packed_lm_head = QuantLinear(head, None, mode)  # a tied head shares the table
    model.norm = nn.Parameter(_dense(weights.pop("model.norm.weight")))
    model.inv_freq = rope_inv_freq(cfg)
    return model


def quantize_dense(model: CausalLM, fmt: str, mode: str) -> CausalLM:
    """A dense (HF) model's projections, head and embedding quantized to `fmt` at load."""
    weights: dict[str, Weight] = {k: v.detach().float() for k, v in _hf_state(model).items()}
    return build_quantized(model.config, weights, mode, fmt)


def _hf_state(model: CausalLM) -> dict[str, Tensor]:
    """HF-named tensors of a dense model, its fused projections split back."""
    cfg, hd = model.config, model.config.head_dim
    nq, nkv, inter = cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.intermediate_size
    sd: dict[str, Tensor] = {"model.embed_tokens.weight": model.embed_tokens.weight}
    sd["model.norm.weight"] = model.norm
    if model.lm_head is not None:
        sd["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.decoder_layers()):
        p = f"model.layers.{i}."
        for attr, names, sizes in (
            (
                "qkv_proj",
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                [nq, nkv, nkv],
            ),
            ("o_proj", ["self_attn.o_proj"], [cfg.hidden_size]),
            ("gate_up_proj", ["mlp.gate_proj", "mlp.up_proj"], [inter, inter]),
            ("down_proj", ["mlp.down_proj"], [cfg.hidden_size]),
        ):
            lin = getattr(layer, attr)
            assert isinstance(lin, nn.Linear), "quantize before packing"
            for n, wpart in zip(names, lin.weight.split(sizes), strict=True):
                sd[f"{p}{n}.weight"] = wpart
            if lin.bias is not None:
                for n, bpart in zip(names, lin.bias.split(sizes), strict=True):
                    sd[f"{p}{n}.bias"] = bpart
        sd[p + "input_layernorm.weight"] = layer.input_layernorm
        sd[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm
    return sd
