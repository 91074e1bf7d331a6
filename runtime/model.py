"""Our Llama-family decoder: RMSNorm, rotary embeddings, GQA attention over a token-slot KV pool, SwiGLU."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime import cpu_attention, cpu_fused, cpu_linear, triton_attention
from runtime.config import ModelConfig
from runtime.kv_pool import KVPool


@dataclass
class ForwardBatch:
    """One forward over a flat batch of new tokens (prefill chunks and decode tokens alike)."""

    input_ids: Tensor  # [T] int64, new tokens of all sequences, sequence-major
    positions: Tensor  # [T] int64, absolute position of each token
    out_slots: Tensor  # [T] int64, KV slot each new token's K/V is written to
    block_table: (
        Tensor  # [B, L] int64, KV slots of all tokens of each sequence (pad = pool.pad_slot)
    )
    seq_lens: Tensor  # [B] int64, tokens per sequence after this step (cached + new)
    query_lens: list[int]  # new tokens per sequence (host ints, sum = T)
    logits_index: Tensor  # [B] int64, the row of T whose output is wanted (the last new token)

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens, default=1) == 1


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
        qkv_out = (config.num_heads + 2 * config.num_kv_heads) * hd
        # nn.Linear, or a cpu_linear.CpuLinear once `cpu_linear.pack_model` has run
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
        t, nh, nkv, hd = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        fused = cpu_fused.usable(x) and k_cache.dtype == torch.float32  # one-pass CPU kernels
        h = _rms_norm(x, self.input_layernorm, self.eps, fused)  # [T, H]
        qkv = self.qkv_proj(h)  # [T, (nh + 2 nkv) hd]
        if fused:  # rope of q and k, k and v stored at out_slots, in one pass
            q = cpu_fused.rope_store(qkv, cos, sin, meta.out_slots, k_cache, v_cache, nh)
        else:
            qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd), cos, sin)
            q, k = qk.split([nh, nkv], dim=1)  # [T, nh, hd], [T, nkv, hd]
            v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)  # [T, nkv, hd]
            k_cache.index_copy_(0, meta.out_slots, k.to(k_cache.dtype))
            v_cache.index_copy_(0, meta.out_slots, v.to(v_cache.dtype))
        attn = paged_attention(q, k_cache, v_cache, meta)  # [T, nh * hd]
        x = _linear_add(self.o_proj, attn, x)  # x + o_proj(attn)
        h = _rms_norm(x, self.post_attention_layernorm, self.eps, fused)  # [T, H]
        gate_up = self.gate_up_proj(h)  # [T, 2I]
        if fused:
            act = cpu_fused.silu_mul(gate_up)  # [T, I]
        else:
            gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
            act = F.silu(gate) * up
        return _linear_add(self.down_proj, act, x)  # x + down_proj(act)


def _rms_norm(x: Tensor, weight: Tensor, eps: float, fused: bool) -> Tensor:
    if fused:
        return cpu_fused.rms_norm(x, weight, eps)  # [T, H]
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _linear_add(linear: nn.Module, inp: Tensor, residual: Tensor) -> Tensor:
    """`residual + linear(inp)`, fused into the matmul where the packed layer can."""
    if isinstance(linear, cpu_linear.CpuLinear):
        return linear.add_to(inp, residual)
    return residual + linear(inp)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding; x `[T, heads, hd]`, cos/sin `[T, 1, hd]`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


@dataclass
class AttnGroup:
    """Sequences attended together: decodes (one query each) or prefill chunks (padded queries)."""

    block_table: Tensor  # [b, L]
    mask: Tensor  # [b, 1, Q, L] bool, True = attend
    q_index: Tensor | None  # [t] row in the padded [b * Q] query layout; None for decodes
    q_max: int
    seq_lens: Tensor | None = None  # [b], decode groups only


@dataclass
class AttnMeta:
    """Per-forward attention indexing, computed once and shared by every layer."""

    out_slots: Tensor  # [T]
    num_decode_tokens: int  # the leading sequences with one new token each
    decode: AttnGroup | None
    prefill: AttnGroup | None


def build_attn_meta(batch: ForwardBatch) -> AttnMeta:
    """Split the batch into its leading decode sequences and the prefill chunks after them."""
    n_dec = 0
    while n_dec < len(batch.query_lens) and batch.query_lens[n_dec] == 1:
        n_dec += 1
    if n_dec == len(batch.query_lens):
        return AttnMeta(
            batch.out_slots, n_dec, _decode_group(batch.block_table, batch.seq_lens), None
        )
    dec = _decode_group(batch.block_table[:n_dec], batch.seq_lens[:n_dec]) if n_dec else None
    pre = _prefill_group(
        batch.block_table[n_dec:], batch.seq_lens[n_dec:], batch.query_lens[n_dec:]
    )
    return AttnMeta(batch.out_slots, n_dec, dec, pre)


def _decode_group(table: Tensor, seq_lens: Tensor) -> AttnGroup:
    key_pos = torch.arange(table.shape[1], device=table.device)  # [L]
    mask = key_pos[None, :] < seq_lens[:, None]  # [b, L]
    return AttnGroup(table, mask[:, None, None, :], None, 1, seq_lens)


def _prefill_group(table: Tensor, seq_lens: Tensor, query_lens: list[int]) -> AttnGroup:
    device = table.device
    b, l_max = table.shape
    q_max = max(query_lens)
    key_pos = torch.arange(l_max, device=device)  # [L]
    q_lens = torch.tensor(query_lens, device=device)  # [b]
    qi = torch.arange(q_max, device=device)  # [Q]
    q_pos = (seq_lens - q_lens)[:, None] + qi[None, :]  # [b, Q], absolute query positions
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # [b, Q, L]
    mask &= key_pos[None, None, :] < seq_lens[:, None, None]
    mask |= (qi[None, :] >= q_lens[:, None])[:, :, None] & (key_pos == 0)  # padded queries: any key
    seq_of_token = torch.repeat_interleave(torch.arange(b, device=device), q_lens)  # [t]
    starts = torch.cumsum(q_lens, 0) - q_lens  # [b]
    within = torch.arange(sum(query_lens), device=device) - starts[seq_of_token]  # [t]
    return AttnGroup(table, mask[:, None], seq_of_token * q_max + within, q_max)


def _gather_kv(cache: Tensor, table: Tensor) -> Tensor:
    b, l_max = table.shape
    out = cache.index_select(0, table.reshape(-1)).view(b, l_max, cache.shape[1], cache.shape[2])
    return out.transpose(1, 2)  # [b, nkv, L, hd]


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, grp: AttnGroup) -> Tensor:
    """q `[t, nh, hd]` of one group -> `[t, nh * hd]`."""
    if (
        grp.q_index is None
        and grp.seq_lens is not None
        and q.is_cuda
        and triton_attention.available()
    ):
        return triton_attention.decode_attention(q, k_cache, v_cache, grp.block_table, grp.seq_lens)
    if (
        grp.q_index is None
        and grp.seq_lens is not None
        and not q.is_cuda
        and q.dtype == k_cache.dtype == torch.float32
        and cpu_attention.available()
    ):
        return cpu_attention.paged_decode_attention(
            q, k_cache, v_cache, grp.block_table, grp.seq_lens
        )
    t, nh, hd = q.shape
    n_kv = k_cache.shape[1]
    b = grp.block_table.shape[0]
    k = _gather_kv(k_cache, grp.block_table)  # [b, nkv, L, hd]
    v = _gather_kv(v_cache, grp.block_table)  # [b, nkv, L, hd]
    if grp.q_index is None:  # decode: fold the GQA group into the query axis
        qd = q.view(b, n_kv, nh // n_kv, hd).to(k.dtype)  # [b, nkv, g, hd]
        out = F.scaled_dot_product_attention(qd, k, v, attn_mask=grp.mask)  # [b, nkv, g, hd]
        return out.reshape(t, nh * hd).to(q.dtype)
    qp = q.new_zeros(b * grp.q_max, nh, hd).index_copy_(0, grp.q_index, q)  # [b*Q, nh, hd]
    qp = qp.view(b, grp.q_max, nh, hd).transpose(1, 2).to(k.dtype)  # [b, nh, Q, hd]
    out = F.scaled_dot_product_attention(qp, k, v, attn_mask=grp.mask, enable_gqa=nh != n_kv)
    out = out.transpose(1, 2).reshape(b * grp.q_max, nh * hd)  # [b*Q, nh*hd]
    return out.index_select(0, grp.q_index).to(q.dtype)  # [t, nh*hd]


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttnMeta) -> Tensor:
    """Attention of the new tokens over each sequence's slots; q `[T, nh, hd]` -> `[T, nh * hd]`."""
    n = meta.num_decode_tokens
    if meta.prefill is None:
        assert meta.decode is not None
        return _attend(q, k_cache, v_cache, meta.decode)
    pre = _attend(q[n:], k_cache, v_cache, meta.prefill)
    if meta.decode is None:
        return pre
    return torch.cat([_attend(q[:n], k_cache, v_cache, meta.decode), pre], 0)


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
        self.packed_lm_head: nn.Module | None = None  # CPU-packed head (cpu_linear.pack_model)
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def decoder_layers(self) -> list[DecoderLayer]:
        """The layers, typed (nn.ModuleList iterates as plain Modules)."""
        return self._decoder_layers

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return emb.cos()[:, None, :].to(self.dtype), emb.sin()[:, None, :].to(self.dtype)

    @torch.inference_mode()
    def hidden_rows(self, batch: ForwardBatch, pool: KVPool) -> Tensor:
        """The decoder stack's output for every new token, before the final norm: `[T, H]`."""
        x = self.embed_tokens(batch.input_ids)  # [T, H]
        cos, sin = self._rope(batch.positions)
        meta = build_attn_meta(batch)
        for i, layer in enumerate(self.decoder_layers()):
            x = layer(x, cos, sin, pool.k[i], pool.v[i], meta)
        return x

    @torch.inference_mode()
    def hidden(self, batch: ForwardBatch, pool: KVPool) -> Tensor:
        """Final-normed hidden state of each sequence's `logits_index` token: `[B, H]`."""
        x = self.hidden_rows(batch, pool).index_select(0, batch.logits_index)  # [B, H]
        return _rms_norm(x, self.norm, self.config.rms_norm_eps, cpu_fused.usable(x))

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
