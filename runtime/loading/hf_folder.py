"""Load HF checkpoints (one or sharded safetensors) into `CausalLM`, mapping each family's names."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from runtime.model.config import CheckpointError, ModelConfig
from runtime.model.llama import CausalLM, DecoderLayer, rope_inv_freq

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`--data_type`: default bf16 on a GPU; fp16 on the CPU (fp16-stored weights with fp32
    arithmetic: the fastest CPU mode that meets the quality bar, profiling/README.md)."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float16
    if name not in DTYPES:
        raise ValueError(f"--data_type must be one of fp32, bf16, fp16 (got {name!r})")
    return DTYPES[name]


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's safetensors files (single, or the shards listed in the index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from e
        files = sorted({model_dir / name for name in weight_map.values()})
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the index but missing")
    return files


def read_state_dict(model_dir: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint (memory-mapped by safetensors)."""
    out: dict[str, Tensor] = {}
    for f in safetensors_files(model_dir):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - safe_open has no __iter__
                    out[name] = fh.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from e
    return out


def _internlm2_to_canonical(sd: Mapping[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """InternLM2's packed `wqkv` and own names -> our canonical (HF Llama) names."""
    out: dict[str, Tensor] = {}
    groups = cfg.num_heads // cfg.num_kv_heads
    hd = cfg.head_dim
    rename = {
        "model.tok_embeddings.weight": "model.embed_tokens.weight",
        "model.norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "v_head.weight": "score.weight",
    }
    for name, t in sd.items():
        if name in rename:
            out[rename[name]] = t
            continue
        parts = name.split(".")
        if parts[:2] != ["model", "layers"]:
            out[name] = t
            continue
        pre = ".".join(parts[:3])
        rest = ".".join(parts[3:])
        if rest.startswith("attention.wqkv."):
            kind = parts[-1]
            w = t.reshape(cfg.num_kv_heads, groups + 2, hd, *t.shape[1:])  # [nkv, g+2, hd, (H)]
            q = w[:, :groups].reshape(cfg.num_heads * hd, *t.shape[1:])
            k = w[:, groups].reshape(cfg.num_kv_heads * hd, *t.shape[1:])
            v = w[:, groups + 1].reshape(cfg.num_kv_heads * hd, *t.shape[1:])
            out[f"{pre}.self_attn.q_proj.{kind}"] = q
            out[f"{pre}.self_attn.k_proj.{kind}"] = k
            out[f"{pre}.self_attn.v_proj.{kind}"] = v
            continue
        sub = {
            "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj",
            "feed_forward.w3": "mlp.up_proj",
            "feed_forward.w2": "mlp.down_proj",
            "attention_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
        }
        for old, new in sub.items():
            if rest.startswith(old + "."):
                out[f"{pre}.{new}.{rest[len(old) + 1 :]}"] = t
                break
        else:
            out[name] = t
    return out


def _take(sd: dict[str, Tensor], name: str, shape: tuple[int, ...], source: str) -> Tensor:
    if name not in sd:
        raise CheckpointError(f"{source}: missing tensor {name!r}")
    t = sd.pop(name)
    if tuple(t.shape) != shape:
        raise CheckpointError(
            f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected {shape}"
        )
    return t


def load_into_model(
    model: CausalLM, state_dict: Mapping[str, Tensor], source: str = "checkpoint"
) -> CausalLM:
    """Copy an HF-named state dict into `model` (fusing q/k/v and gate/up); checks every shape."""
    cfg = model.config
    sd = dict(state_dict)
    if cfg.family == "internlm2":
        sd = _internlm2_to_canonical(sd, cfg)
    h = cfg.hidden_size
    with torch.no_grad():
        model.embed_tokens.weight.copy_(
            _take(sd, "model.embed_tokens.weight", (cfg.vocab_size, h), source)
        )
        model.norm.copy_(_take(sd, "model.norm.weight", (h,), source))
        for i, layer in enumerate(model.decoder_layers()):
            _load_layer(layer, sd, f"model.layers.{i}.", cfg, source)
        if model.lm_head is not None:
            model.lm_head.weight.copy_(_take(sd, "lm_head.weight", (cfg.vocab_size, h), source))
        else:
            sd.pop("lm_head.weight", None)
        _load_score_head(model, sd, source)
    return model


def _load_layer(
    layer: DecoderLayer, sd: dict[str, Tensor], p: str, cfg: ModelConfig, source: str
) -> None:
    """One decoder layer's weights (prefix `p`), q/k/v and gate/up fused."""
    h, hd, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    nq, nkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    qkv = [
        _take(sd, p + "self_attn.q_proj.weight", (nq, h), source),
        _take(sd, p + "self_attn.k_proj.weight", (nkv, h), source),
        _take(sd, p + "self_attn.v_proj.weight", (nkv, h), source),
    ]
    _dense(layer.qkv_proj).weight.copy_(torch.cat(qkv, 0))
    if cfg.qkv_bias:
        biases = [
            _take(sd, p + "self_attn.q_proj.bias", (nq,), source),
            _take(sd, p + "self_attn.k_proj.bias", (nkv,), source),
            _take(sd, p + "self_attn.v_proj.bias", (nkv,), source),
        ]
        _dense(layer.qkv_proj).bias.copy_(torch.cat(biases, 0))
    _dense(layer.o_proj).weight.copy_(_take(sd, p + "self_attn.o_proj.weight", (h, nq), source))
    if cfg.o_bias:
        _dense(layer.o_proj).bias.copy_(_take(sd, p + "self_attn.o_proj.bias", (h,), source))
    gate = _take(sd, p + "mlp.gate_proj.weight", (inter, h), source)
    up = _take(sd, p + "mlp.up_proj.weight", (inter, h), source)
    _dense(layer.gate_up_proj).weight.copy_(torch.cat([gate, up], 0))
    _dense(layer.down_proj).weight.copy_(_take(sd, p + "mlp.down_proj.weight", (h, inter), source))
    if cfg.mlp_bias:
        _dense(layer.gate_up_proj).bias.copy_(
            torch.cat(
                [
                    _take(sd, p + "mlp.gate_proj.bias", (inter,), source),
                    _take(sd, p + "mlp.up_proj.bias", (inter,), source),
                ]
            )
        )
        _dense(layer.down_proj).bias.copy_(_take(sd, p + "mlp.down_proj.bias", (h,), source))
    layer.input_layernorm.copy_(_take(sd, p + "input_layernorm.weight", (h,), source))
    layer.post_attention_layernorm.copy_(
        _take(sd, p + "post_attention_layernorm.weight", (h,), source)
    )
    sd.pop(p + "self_attn.rotary_emb.inv_freq", None)


def _load_score_head(model: CausalLM, sd: dict[str, Tensor], source: str) -> None:
    cfg, h = model.config, model.config.hidden_size
    head = model.score_head
    if cfg.head_kind == "seq_cls":
        assert isinstance(head, torch.nn.Linear)
        head.weight.copy_(_take(sd, "score.weight", (cfg.num_labels, h), source))
    elif cfg.head_kind == "internlm2_reward":
        assert isinstance(head, torch.nn.Linear)
        head.weight.copy_(_take(sd, "score.weight", (1, h), source))
    elif cfg.head_kind == "qwen2_reward":
        assert isinstance(head, torch.nn.Sequential)
        l1, l2 = head[0], head[2]
        assert isinstance(l1, torch.nn.Linear) and isinstance(l2, torch.nn.Linear)
        l1.weight.copy_(_take(sd, "score.0.weight", (h, h), source))
        l1.bias.copy_(_take(sd, "score.0.bias", (h,), source))
        l2.weight.copy_(_take(sd, "score.2.weight", (1, h), source))
        l2.bias.copy_(_take(sd, "score.2.bias", (1,), source))


def _dense(module: nn.Module) -> nn.Linear:
    """A projection as loaded (packing for oneDNN happens after loading)."""
    assert isinstance(module, nn.Linear), "weights load into dense layers only"
    return module


def load_model(
    model_dir: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build a `CausalLM` from an HF checkpoint folder."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    cfg = ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = CausalLM(cfg, dtype)
    model = model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # meta buffers hold no values
    return load_into_model(model, read_state_dict(path), str(path))
