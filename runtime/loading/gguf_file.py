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
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how text is split before BPE.
_PRE_DIGITS = {"smollm", "starcoder", "refact"}  # Digits(individual) + GPT-2 ByteLevel regex
_PRE_GPT2 = {"default", "gpt-2", "gpt2"}  # GPT-2 ByteLevel regex only
_PRE_LLAMA3 = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe"}  # Llama 3 split regex
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type values


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


def _req(meta: dict[str, Any], key: str, path: str | Path) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: missing GGUF key {key!r}")
    return meta[key]


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


def _special_ids(meta: dict[str, Any]) -> dict[str, int]:
    """Special token ids the file names (ids outside the vocabulary are ignored)."""
    n = len(meta.get("tokenizer.ggml.tokens") or ())
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id"}
    keys |= {"pad": "padding_token_id", "eot": "eot_token_id", "eom": "eom_token_id"}
    return {
        k: int(meta[f"tokenizer.ggml.{v}"])
        for k, v in keys.items()
        if 0 <= int(meta.get(f"tokenizer.ggml.{v}", -1)) < n
    }


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    ranked by the merged token's score (as transformers' `generate_merges`)."""
    merges: list[tuple[str, str, float]] = []
    for tok, i in vocab.items():
        local = [(tok[:k], tok[k:], scores[i]) for k in range(1, len(tok))]
        local = [m for m in local if m[0] in vocab and m[1] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _gpt2_tokenizer(
    meta: dict[str, Any], vocab: dict[str, int], path: Path
) -> tuple[Any, list[Any], bool]:
    """Byte-level BPE ("gpt2"): (tokenizer, post-processors, BOS by default)."""
    from tokenizers import Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pt

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in _PRE_DIGITS:
        pre_tok: Any = pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]
        )
    elif pre in _PRE_GPT2:
        pre_tok = pt.ByteLevel(add_prefix_space=False)
    elif pre in _PRE_LLAMA3:
        pre_tok = pt.Sequence(
            [
                pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pt.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ValueError(f"{path}: unsupported tokenizer.ggml.pre {pre!r}")
    merges = [tuple(m.split(" ", 1)) for m in _req(meta, "tokenizer.ggml.merges", path)]
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _PRE_LLAMA3))
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    return tok, [processors.ByteLevel(trim_offsets=False)], pre in _PRE_LLAMA3


def _spm_tokenizer(
    meta: dict[str, Any], vocab: dict[str, int], tokens: list[str], ids: dict[str, int], path: Path
) -> tuple[Any, list[Any], bool]:
    """Sentencepiece BPE ("llama"): (tokenizer, post-processors, BOS by default)."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = list(_req(meta, "tokenizer.ggml.scores", path))
    unk = tokens[ids["unk"]] if "unk" in ids else None
    tok = Tokenizer(
        models.BPE(
            vocab, _spm_merges(vocab, scores), unk_token=unk, fuse_unk=True, byte_fallback=True
        )
    )
    space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm = [normalizers.Replace(" ", "\u2581")]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), *norm] if space else norm)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence([*dec, decoders.Strip(" ", 1, 0)] if space else dec)
    return tok, [], True


def _build_tokenizer(meta: dict[str, Any], path: Path) -> tuple[Any, bool, bool]:
    """(`tokenizers.Tokenizer`, add_bos, add_eos) from the `tokenizer.ggml.*` metadata."""
    from tokenizers import AddedToken, processors

    kind = _req(meta, "tokenizer.ggml.model", path)
    tokens = list(_req(meta, "tokenizer.ggml.tokens", path))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):  # keep ids contiguous even if the file repeats a token
        if t in vocab:
            tokens[i] = t = f"<unused_dup_{i}>"
        vocab[t] = i
    ids = _special_ids(meta)
    if kind == "gpt2":
        tok, post, add_bos_default = _gpt2_tokenizer(meta, vocab, path)
    elif kind == "llama":
        tok, post, add_bos_default = _spm_tokenizer(meta, vocab, tokens, ids, path)
    else:
        raise ValueError(
            f"{path}: unsupported tokenizer.ggml.model {kind!r} (supported: gpt2, llama)"
        )
    special = [t for t, ty in zip(tokens, types, strict=False) if ty in (_UNKNOWN, _CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types, strict=False) if ty == _USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos" in ids
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos" in ids
    if add_bos or add_eos:
        b = f"{tokens[ids['bos']]}:0 " if add_bos else ""
        e = f" {tokens[ids['eos']]}:0" if add_eos else ""
        pairs = [(tokens[ids[k]], ids[k]) for k, on in (("bos", add_bos), ("eos", add_eos)) if on]
        post.append(
            processors.TemplateProcessing(
                single=f"{b}$A:0{e}",
                pair=f"{b}$A:0{e} {b.replace(':0', ':1')}$B:1{e.replace(':0', ':1')}",
                special_tokens=pairs,
            )
        )
    if post:
        tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
    return tok, add_bos, add_eos


def _tokenizer_files(
    meta: dict[str, Any], path: Path
) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config, generation_config, config special-id entries)."""
    tok, add_bos, add_eos = _build_tokenizer(meta, path)
    ids = _special_ids(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    decoder = {
        str(i): {
            "content": a.content,
            "lstrip": a.lstrip,
            "normalized": a.normalized,
            "rstrip": a.rstrip,
            "single_word": a.single_word,
            "special": a.special,
        }
        for i, a in sorted(tok.get_added_tokens_decoder().items())
    }
    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 4096)),
        "added_tokens_decoder": decoder,
    }
    for k in ("bos", "eos", "unk", "pad"):
        if k in ids:
            tcfg[f"{k}_token"] = tokens[ids[k]]
    if "tokenizer.chat_template" in meta:
        tcfg["chat_template"] = meta["tokenizer.chat_template"]
    eos = list(dict.fromkeys(ids[k] for k in ("eos", "eot", "eom") if k in ids))
    special_cfg: dict[str, Any] = {}
    if "bos" in ids:
        special_cfg["bos_token_id"] = ids["bos"]
    if eos:
        special_cfg["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    gen = dict(special_cfg)
    if "pad" in ids:
        special_cfg["pad_token_id"] = ids["pad"]
    return tok.to_str(), tcfg, gen, special_cfg


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
    tok_json, tok_cfg, gen_cfg, special_cfg = _tokenizer_files(meta, path)
    config.update(special_cfg)
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in state]
    if missing:
        raise ValueError(f"{path}: missing tensors {missing}")
    return GGUFCheckpoint(config, state, tok_json, tok_cfg, gen_cfg)
