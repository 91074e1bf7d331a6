"""Model configuration read from an HF `config.json` (Llama, Mistral, Qwen2, InternLM2 and reward variants)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# architecture name -> (family, head kind); head kind "lm" = causal LM, else a score head
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "lm"),
    "MistralForCausalLM": ("llama", "lm"),
    "Qwen2ForCausalLM": ("qwen2", "lm"),
    "InternLM2ForCausalLM": ("internlm2", "lm"),
    "LlamaForSequenceClassification": ("llama", "seq_cls"),
    "MistralForSequenceClassification": ("llama", "seq_cls"),
    "Qwen2ForSequenceClassification": ("qwen2", "seq_cls"),
    "InternLM2ForRewardModel": ("internlm2", "internlm2_reward"),
    "Qwen2ForRewardModel": ("qwen2", "qwen2_reward"),
}


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or of an unsupported kind; the message names the file."""


@dataclass
class ModelConfig:
    """The shapes and constants our Llama-family forward needs."""

    architecture: str
    family: str  # "llama" | "qwen2" | "internlm2"
    head_kind: str  # "lm" | "seq_cls" | "internlm2_reward" | "qwen2_reward"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool = False
    mlp_bias: bool = False
    num_labels: int = 1
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def is_reward_model(self) -> bool:
        return self.head_kind != "lm"

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from an HF config dict; `source` names the file in error messages."""
        archs = cfg.get("architectures") or []
        if not archs:
            raise CheckpointError(f"{source}: no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise CheckpointError(
                f"{source}: unsupported architecture {arch!r} (supported: {supported})"
            )
        family, head_kind = SUPPORTED_ARCHITECTURES[arch]
        try:
            hidden = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            n_layers = int(cfg["num_hidden_layers"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: missing or malformed field {e}") from e
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        rope_theta, scaling = _rope_settings(cfg)
        qkv_bias = _qkv_bias(cfg, family)
        eos = cfg.get("eos_token_id")
        eos_ids = (
            [int(e) for e in eos] if isinstance(eos, list) else [] if eos is None else [int(eos)]
        )
        return cls(
            architecture=arch,
            family=family,
            head_kind=head_kind,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=n_layers,
            num_heads=n_heads,
            num_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=qkv_bias and family != "qwen2",  # Qwen2 has q/k/v bias only
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            # transformers saves id2label, not num_labels, in config.json
            num_labels=int(cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 1),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=cfg.get("pad_token_id"),
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found (an HF checkpoint folder needs config.json)")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: malformed JSON ({e})") from e
        return cls.from_hf_dict(cfg, str(path))


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either the classic keys or transformers 5's rope_parameters."""
    rope_params = cfg.get("rope_parameters") or {}
    rope_theta = float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or None
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = dict(rope_params)
    return rope_theta, scaling


def _qkv_bias(cfg: dict[str, Any], family: str) -> bool:
    if family == "qwen2":
        return True
    if family == "internlm2":
        return bool(cfg.get("bias", False))
    return bool(cfg.get("attention_bias", False))
