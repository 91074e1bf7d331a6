"""Our Llama-family decoder: RMSNorm, rotary embeddings, GQA attention over a token-slot KV pool,
SwiGLU. The layers call the `Backends` the model was assembled with (`use_backends`, once, when
it loads); their projections are `nn.Linear` until `backends.pack_linears` swaps packed ones in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.kernels.cpu import attention as cpu_attention
from runtime.kernels.cpu import fused as cpu_fused
from runtime.kernels.cpu.fused_decode import FusedDecode
from runtime.kernels.cpu.linear import CpuLinear
from runtime.model.attention import AttnMeta, build_attn_meta, paged_attention
from runtime.model.backends import TORCH, Backends
from runtime.model.batch import ForwardBatch
from runtime.model.config import ModelConfig
from runtime.model.kv_pool import KVPool


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse frequencies `[head_dim // 2]` with plain, linear or Llama-3 scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "linear":
        inv_freq = inv_freq / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind not in ("default", "dynamic"):  # dynamic NTK equals default within max_position
        raise ValueError(f"unsupported rope_scaling type {kind!r}")
    return inv_freq.float()


class DecoderLayer(nn.Module):
    """One pre-norm block; q/k/v and gate/up projections are fused into one matmul each."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        h, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv, self.head_dim = config.num_heads, config.num_kv_heads, hd
        self.eps = config.rms_norm_eps
        self.ops: Backends = TORCH
        qkv_out = (config.num_heads + 2 * config.num_kv_heads) * hd
        # nn.Linear, or a kernels.cpu.linear.CpuLinear once `pack_linears` has run
        self.qkv_proj: nn.Module = nn.Linear(h, qkv_out, bias=config.qkv_bias, dtype=dtype)
        self.o_proj: nn.Module = nn.Linear(
            config.num_heads * hd, h, bias=config.o_bias, dtype=dtype
        )
        self.gate_up_proj: nn.Module = nn.Linear(
            h, 2 * config.intermediate_size, bias=config.mlp_bias, dtype=dtype
        )
        self.down_proj: nn.Module = nn.Linear(
            config.intermediate_size, h, bias=config.mlp_bias, dtype=dtype
        )
        self.input_layernorm = nn.Parameter(torch.ones(h, dtype=dtype))
        self.post_attention_layernorm = nn.Parameter(torch.ones(h, dtype=dtype))

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttnMeta
    ) -> Tensor:
        ops = self.ops
        h = ops.rms_norm(x, self.input_layernorm, self.eps)  # [T, H]
        qkv = self.qkv_proj(h)  # [T, (nh + 2 nkv) hd]
        # rotary of q and k, k and v stored at out_slots
        q = ops.rope_store(qkv, cos, sin, meta.out_slots, k_cache, v_cache, self.n_heads)
        attn = paged_attention(q, k_cache, v_cache, meta, ops.decode_attention)  # [T, nh * hd]
        x = _linear_add(self.o_proj, attn, x)  # x + o_proj(attn)
        h = ops.rms_norm(x, self.post_attention_layernorm, self.eps)  # [T, H]
        act = ops.silu_mul(self.gate_up_proj(h))  # [T, I]
        return _linear_add(self.down_proj, act, x)  # x + down_proj(act)


def _linear_add(linear: nn.Module, inp: Tensor, residual: Tensor) -> Tensor:
    """`residual + linear(inp)`, fused into the matmul where the packed layer can."""
    if isinstance(linear, CpuLinear):
        return linear.add_to(inp, residual)
    return residual + linear(inp)


class CausalLM(nn.Module):
    """Decoder stack + output head (LM head, or a score head for reward/classification models)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        layers = [DecoderLayer(config, dtype) for _ in range(config.num_layers)]
        self.layers = nn.ModuleList(layers)
        self._decoder_layers = layers  # the same modules, typed
        self.norm = nn.Parameter(torch.ones(config.hidden_size, dtype=dtype))
        self.lm_head: nn.Linear | None = None
        if config.head_kind == "lm" and not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.score_head: nn.Module | None = None
        h = config.hidden_size
        if config.head_kind == "seq_cls":
            self.score_head = nn.Linear(h, config.num_labels, bias=False, dtype=dtype)
        elif config.head_kind == "internlm2_reward":
            self.score_head = nn.Linear(h, 1, bias=False, dtype=dtype)
        elif config.head_kind == "qwen2_reward":
            self.score_head = nn.Sequential(
                nn.Linear(h, h, dtype=dtype), nn.ReLU(), nn.Linear(h, 1, dtype=dtype)
            )
        self.packed_lm_head: nn.Module | None = None  # CPU-packed head (backends.pack_linears)
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.ops: Backends = TORCH
        # int16 mode on the CPU: decode-only batches in one call (`fuse_decode`)
        self.fused_decode: FusedDecode | None = None

    def use_backends(self, ops: Backends) -> None:
        """Assemble the layers with `ops` (called once, when the model loads)."""
        self.ops = ops
        for layer in self._decoder_layers:
            layer.ops = ops

    def fuse_decode(self) -> bool:
        """Run decode-only batches through `FusedDecode` (int16-mode projections and the
        Numba layer kernels, whose bits it repeats; called once, when the model loads); whether
        the layers qualify."""
        ops = self.ops
        if ops.rms_norm is not cpu_fused.rms_norm or ops.rope_store is not cpu_fused.rope_store:
            return False
        if ops.decode_attention is not cpu_attention.paged_decode_attention:
            return False
        layers = self.decoder_layers()
        self.fused_decode = FusedDecode.build(
            [(lay.qkv_proj, lay.o_proj, lay.gate_up_proj, lay.down_proj) for lay in layers],
            [lay.input_layernorm for lay in layers],
            [lay.post_attention_layernorm for lay in layers],
            self.config.rms_norm_eps,
            self.config.num_kv_heads,
            self.config.head_dim,
        )
        return self.fused_decode is not None

    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers, typed (nn.ModuleList iterates as plain Modules)."""
        return self._decoder_layers

    def rope_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate-half cos/sin tables `[T, 1, hd]` for `positions` `[T]`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return emb.cos()[:, None, :].to(self.dtype), emb.sin()[:, None, :].to(self.dtype)

    @torch.inference_mode()
    def hidden_rows(self, batch: ForwardBatch, pool: KVPool) -> Tensor:
        """The decoder stack's output for every new token, before the final norm: `[T, H]`."""
        x = self.embed_tokens(batch.input_ids)  # [T, H]
        cos, sin = self.rope_tables(batch.positions)
        fused = self.fused_decode
        if fused is not None and fused.applies(batch.query_lens):
            table, lens = batch.block_table, batch.seq_lens  # [T, L], [T]
            return fused(x, cos, sin, batch.out_slots, pool.k, pool.v, table, lens)
        meta = build_attn_meta(batch)
        for i, layer in enumerate(self.decoder_layers()):
            x = layer(x, cos, sin, pool.k[i], pool.v[i], meta)
        return x

    @torch.inference_mode()
    def hidden(self, batch: ForwardBatch, pool: KVPool) -> Tensor:
        """Final-normed hidden state of each sequence's `logits_index` token: `[B, H]`."""
        x = self.hidden_rows(batch, pool).index_select(0, batch.logits_index)  # [B, H]
        return self.ops.rms_norm(x, self.norm, self.config.rms_norm_eps)

    @torch.inference_mode()
    def logits_from_hidden(self, h: Tensor) -> Tensor:
        """LM head: `[B, H]` -> `[B, vocab]` fp32."""
        if self.packed_lm_head is not None:
            return self.packed_lm_head(h)  # [B, V] fp32
        weight = self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight
        return F.linear(h, weight).float()

    @torch.inference_mode()
    def score_from_hidden(self, h: Tensor) -> Tensor:
        """Reward / classification head: `[B, H]` -> `[B, num_labels]` fp32."""
        assert self.score_head is not None, "not a reward model"
        return self.score_head(h).float()

    def forward(self, batch: ForwardBatch, pool: KVPool) -> Tensor:
        """Logits `[B, vocab]` in fp32 for each sequence's last new token."""
        return self.logits_from_hidden(self.hidden(batch, pool))

    def score(self, batch: ForwardBatch, pool: KVPool) -> Tensor:
        """Reward / classification scores `[B, num_labels]` in fp32."""
        return self.score_from_hidden(self.hidden(batch, pool))
