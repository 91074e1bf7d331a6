"""GGUF -> HF-format Llama checkpoint: config dict, fp32 state dict, tokenizer.json, chat template.

Only `general.architecture == "llama"` is supported (SmolLM2, Llama 2/3). Quantized tensors are
dequantized to fp32 with `gguf.quants.dequantize`; llama.cpp's Q/K row permutation is undone so
the weights match the HF layout exactly. The tokenizer is rebuilt with the `tokenizers` library
from the `tokenizer.ggml.*` metadata (byte-level BPE "gpt2" and sentencepiece-BPE "llama").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.loading.gguf_tokenizer import req_key as _req
from runtime.loading.gguf_tokenizer import tokenizer_files
from runtime.progress import progress as progress_bar

__all__ = ["GGUFCheckpoint", "load_gguf", "read_gguf_metadata", "unpermute_qk"]

# llama.cpp tensor name (within a block) -> HF name (within a layer).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


@dataclass
class GGUFCheckpoint:
    """An HF-format checkpoint converted from a GGUF file."""

    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    tokenizer_json: str
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]

    def save(self, folder: str | Path) -> None:
        """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
        generation_config.json into `folder` (created if needed)."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, obj in (
            ("config.json", self.config),
            ("tokenizer_config.json", self.tokenizer_config),
            ("generation_config.json", self.generation_config),
        ):
            (out / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        (out / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        weights = out / "model.safetensors"
        save_file(self.state_dict, str(weights), metadata={"format": "pt"})
        os.chmod(weights, (out / "config.json").stat().st_mode & 0o777)  # umask, not 0600


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's `permute(w, n_head, n_head_kv)` on Q/K rows (or biases)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(v: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (9.99e-06 -> 1e-05)."""
    return float(str(np.float32(v)))


def open_gguf(path: str | Path) -> Any:
    import gguf

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"GGUF file not found: {p}")
    try:
        return gguf.GGUFReader(p)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ...
        raise ValueError(f"{p}: not a valid GGUF file ({type(e).__name__}: {e})") from e


def read_gguf_metadata(reader: Any, path: str | Path) -> dict[str, Any]:
    """All key/value fields of an open `gguf.GGUFReader` as Python values."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise ValueError(f"{path}: malformed GGUF field {key!r} ({e})") from e
    return meta


def _rope_scaling(
    meta: dict[str, Any], rope_freqs: np.ndarray | None, theta: float, head_dim: int, path: Path
) -> dict[str, Any] | None:
    """HF `rope_scaling` from `llama.rope.scaling.*` keys or a `rope_freqs` tensor (Llama 3.1)."""
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor") or meta.get("llama.rope.scale_linear")
    if kind is None and factor:
        kind = "linear"
    if kind in ("linear", "yarn") and factor:
        out: dict[str, Any] = {"rope_type": kind, "factor": _f32(factor)}
        orig = meta.get("llama.rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    if kind not in (None, "none"):
        raise ValueError(f"{path}: unsupported rope scaling type {kind!r}")
    if rope_freqs is None:
        return None
    # llama.cpp stores Llama 3 rope scaling as per-frequency factors: fit Llama 3.x's parameters.
    factors = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    factor, low, high, orig = float(factors.max()), 1.0, 4.0, 8192
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    smooth = (orig / wavelen - low) / (high - low)
    expect = np.where(wavelen < orig / high, 1.0, 1 / ((1 - smooth) / factor + smooth))
    expect = np.where(wavelen > orig / low, factor, expect)
    if expect.shape != factors.shape or not np.allclose(expect, factors, rtol=1e-4):
        raise ValueError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": orig,
    }


def _build_config(meta: dict[str, Any], n_vocab: int, tied: bool, path: Path) -> dict[str, Any]:
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: 'llama')")
    hidden = int(_req(meta, "llama.embedding_length", path))
    n_head = _req(meta, "llama.attention.head_count", path)
    if not isinstance(n_head, int) or n_head <= 0:
        raise ValueError(f"{path}: unsupported llama.attention.head_count {n_head!r}")
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_head))
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_req(meta, "llama.feed_forward_length", path)),
        "num_hidden_layers": int(_req(meta, "llama.block_count", path)),
        "num_attention_heads": int(n_head),
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta.get("llama.context_length", 4096)),
        "vocab_size": n_vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
    }
    return cfg


def hf_name(name: str, path: Path) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK_NAMES:
        return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"{path}: unsupported tensor {name!r} for architecture 'llama'")


def load_gguf(path: str | Path, *, progress: bool = False) -> GGUFCheckpoint:
    """Read one GGUF file into an HF-format checkpoint (fp32 weights, HF tensor names).

    Raises `ValueError` naming the file when it is missing, malformed or not supported.
    """
    from gguf.quants import dequantize

    path = Path(path)
    reader = open_gguf(path)
    meta = read_gguf_metadata(reader, path)
    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ValueError(f"{path}: no token_embd.weight tensor")
    n_vocab = int(by_name["token_embd.weight"].shape[-1])  # ne = [hidden, vocab]
    config = _build_config(meta, n_vocab, tied="output.weight" not in by_name, path=path)
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    rope_freqs = None
    state: dict[str, torch.Tensor] = {}
    for t in progress_bar(list(reader.tensors), "GGUF -> fp32", "tensor", progress):
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize {t.name} ({e})") from e
        shape = tuple(int(d) for d in reversed(t.shape))  # ne lists dims innermost first
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape(shape)
        if t.name == "rope_freqs.weight":
            rope_freqs = arr
            continue
        name = hf_name(t.name, path)
        if ".self_attn.q_proj." in name:
            arr = unpermute_qk(arr, n_head)
        elif ".self_attn.k_proj." in name:
            arr = unpermute_qk(arr, n_kv)
        if not arr.flags.writeable:
            arr = arr.copy()  # detach from the reader's read-only memmap
        state[name] = torch.from_numpy(arr)
    config["attention_bias"] = any(k.endswith("self_attn.q_proj.bias") for k in state)
    config["mlp_bias"] = any(k.endswith("mlp.up_proj.bias") for k in state)
    scaling = _rope_scaling(meta, rope_freqs, config["rope_theta"], config["head_dim"], path)
    if scaling is not None:
        config["rope_scaling"] = scaling
    tok_json, tok_cfg, gen_cfg, special_cfg = tokenizer_files(meta, path)
    config.update(special_cfg)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in state]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    return GGUFCheckpoint(config, state, tok_json, tok_cfg, gen_cfg)
