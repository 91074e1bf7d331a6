"""One rank's shard of a Llama-family model, Megatron-style: q/k/v and gate/up column-parallel,
o and down row-parallel (one all-reduce each), the embedding and the LM head vocab-parallel.

Heads are split by KV-head group: rank r holds a contiguous run of KV heads and exactly the query
heads that read them (GQA maps query head i to KV head i // (nh / nkv)), so attention needs no
communication and the KV pool of a rank holds its KV heads only. The split may be uneven: the
default SmolLM2-135M (9 query heads, 3 KV heads) at `--tp 2` gives rank 0 KV heads 0-1 with query
heads 0-5 and rank 1 KV head 2 with query heads 6-8; the MLP and the vocabulary split into
near-equal halves. `tp` may be any value up to the number of KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.loading.hf_folder import load_model
from runtime.model.assemble import assemble
from runtime.model.backends import BackendSettings
from runtime.model.batch import ForwardBatch
from runtime.model.config import CheckpointError, ModelConfig
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """The `index`-th of `parts` contiguous near-equal ranges of `range(n)` (the first ones
    get the remainder)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class ShardSpec:
    """What rank `rank` of `world` holds: half-open ranges of heads, MLP columns, vocab rows."""

    rank: int
    world: int
    kv_heads: tuple[int, int]
    q_heads: tuple[int, int]
    inter: tuple[int, int]
    vocab: tuple[int, int]
    vocab_widths: tuple[int, ...]  # every rank's vocab rows (the logits gather pads to the max)
    local_config: ModelConfig  # the shard's shapes (heads, intermediate size, vocab rows)

    @classmethod
    def for_rank(cls, cfg: ModelConfig, rank: int, world: int) -> ShardSpec:
        """The shard of `cfg` for `rank`; raises CheckpointError when `world` cannot split it."""
        if world > cfg.num_kv_heads or cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(
                f"--tp {world}: the model has {cfg.num_kv_heads} KV heads for {cfg.num_heads} "
                "query heads; tensor parallelism splits by KV-head group, so --tp may be at most "
                "the number of KV heads"
            )
        group = cfg.num_heads // cfg.num_kv_heads
        kv0, kv1 = split_range(cfg.num_kv_heads, world, rank)
        inter = split_range(cfg.intermediate_size, world, rank)
        vocab = split_range(cfg.vocab_size, world, rank)
        local = replace(
            cfg,
            num_heads=(kv1 - kv0) * group,
            num_kv_heads=kv1 - kv0,
            intermediate_size=inter[1] - inter[0],
            vocab_size=vocab[1] - vocab[0],
        )
        widths = tuple(
            hi - lo for lo, hi in (split_range(cfg.vocab_size, world, r) for r in range(world))
        )
        return cls(rank, world, (kv0, kv1), (kv0 * group, kv1 * group), inter, vocab, widths, local)


class Collectives:
    """The all-reduce and the logits gather of one rank over the default process group."""

    def __init__(self, spec: ShardSpec) -> None:
        self.spec = spec

    def all_reduce_(self, x: Tensor) -> Tensor:
        """Sum `x` over the ranks, in place (every rank gets the same bits)."""
        if self.spec.world > 1:
            dist.all_reduce(x)
        return x

    def gather_logits(self, local: Tensor) -> Tensor | None:
        """Rank 0: the full `[B, V]` logits from every rank's `[B, V_r]`; other ranks: None."""
        spec = self.spec
        if spec.world == 1:
            return local
        b, v_r = local.shape
        padded = F.pad(local, (0, max(spec.vocab_widths) - v_r)).contiguous()  # [B, V_max]
        parts = [torch.empty_like(padded) for _ in range(spec.world)] if spec.rank == 0 else None
        dist.gather(padded, parts, dst=0)
        if parts is None:
            return None
        pieces = zip(parts, spec.vocab_widths, strict=True)
        return torch.cat([p[:, :width] for p, width in pieces], 1)  # [B, V]


class VocabParallelEmbedding(nn.Embedding):
    """Rows `[start, start + n)` of the embedding table: ids outside look up zeros, and the
    all-reduce sums the one rank's row that holds each id."""

    def __init__(self, weight: Tensor, start: int, coll: Collectives) -> None:
        super().__init__(weight.shape[0], weight.shape[1], _weight=weight, _freeze=True)
        self.start = start
        self.coll = coll

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 (nn.Embedding's name)
        local = input - self.start
        outside = (local < 0) | (local >= self.num_embeddings)  # [T]
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)  # [T, H]
        return self.coll.all_reduce_(rows.masked_fill_(outside[:, None], 0.0))


class RowParallel(nn.Module):
    """A row-parallel projection: this rank's input columns, the partial sums all-reduced."""

    def __init__(self, inner: nn.Module, coll: Collectives) -> None:
        super().__init__()
        self.inner = inner
        self.coll = coll

    def forward(self, x: Tensor) -> Tensor:
        return self.coll.all_reduce_(self.inner(x).contiguous())  # [T, out]


def _rows(*ranges: tuple[int, int]) -> Tensor:
    """The concatenated indices of half-open `ranges`."""
    return torch.cat([torch.arange(lo, hi) for lo, hi in ranges])


@torch.no_grad()
def _copy_layer(full: nn.Module, local: nn.Module, cfg: ModelConfig, spec: ShardSpec) -> None:
    """Slice one decoder layer's weights (plain `nn.Linear`s, before packing) into `local`."""
    hd, nh, nkv, inter = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    (q0, q1), (k0, k1), (i0, i1) = spec.q_heads, spec.kv_heads, spec.inter
    qkv = _rows((q0 * hd, q1 * hd), ((nh + k0) * hd, (nh + k1) * hd))
    qkv = torch.cat([qkv, _rows(((nh + nkv + k0) * hd, (nh + nkv + k1) * hd))])
    gate_up = _rows((i0, i1), (inter + i0, inter + i1))
    column = (("qkv_proj", qkv), ("gate_up_proj", gate_up))
    row = (("o_proj", slice(q0 * hd, q1 * hd)), ("down_proj", slice(i0, i1)))
    for name, index in column:
        src, dst = getattr(full, name), getattr(local, name)
        dst.weight.copy_(src.weight[index])
        if src.bias is not None:
            dst.bias.copy_(src.bias[index])
    for name, cols in row:
        src, dst = getattr(full, name), getattr(local, name)
        dst.weight.copy_(src.weight[:, cols])
        if src.bias is not None:  # added once, after the sum: rank 0 keeps it
            dst.bias.copy_(src.bias if spec.rank == 0 else torch.zeros_like(src.bias))
    for name in ("input_layernorm", "post_attention_layernorm"):
        getattr(local, name).copy_(getattr(full, name))


@torch.no_grad()
def build_shard(full: CausalLM, spec: ShardSpec, coll: Collectives) -> CausalLM:
    """Rank `spec.rank`'s model: sliced copies of `full`'s weights (plain layers, unassembled).

    Its `config` stays the checkpoint's (the engine reads the vocabulary size and head kind
    there); its layers have the shard's shapes (`spec.local_config`)."""
    cfg = full.config
    with torch.device(full.norm.device):
        local = CausalLM(spec.local_config, full.dtype)
    v0, v1 = spec.vocab
    table = full.embed_tokens.weight[v0:v1].clone()
    local.embed_tokens = VocabParallelEmbedding(table, v0, coll)
    if full.lm_head is not None and local.lm_head is not None:
        local.lm_head.weight.copy_(full.lm_head.weight[v0:v1])
    local.norm.copy_(full.norm)
    for src, dst in zip(full.decoder_layers(), local.decoder_layers(), strict=True):
        _copy_layer(src, dst, cfg, spec)
    local.config = cfg
    return local


def load_shard(
    folder: Path,
    dtype: torch.dtype,
    weights: str,
    settings: BackendSettings,
    device: torch.device,
    spec: ShardSpec,
) -> CausalLM:
    """Load the checkpoint, keep this rank's shard, assemble its backends (packed CPU
    projections as at `--tp 1`), then make o and down row-parallel."""
    full = load_model(folder, dtype, device)
    if full.config.head_kind != "lm":
        raise CheckpointError(f"{folder}: --tp > 1 serves causal LMs only, not reward models")
    coll = Collectives(spec)
    model = build_shard(full, spec, coll)
    del full
    assemble(model, settings, weights)
    for layer in model.decoder_layers():
        layer.o_proj = RowParallel(layer.o_proj, coll)
        layer.down_proj = RowParallel(layer.down_proj, coll)
    return model


def shard_forward(
    model: CausalLM, pool: KVPool, batch: ForwardBatch, coll: Collectives
) -> tuple[Tensor, Tensor | None]:
    """One step on this rank: the final-normed hidden rows `[B', H]` (the same on every rank)
    and, when any row samples, the gathered logits `[B', V]` fp32 on rank 0 (None elsewhere).

    Every rank runs exactly this for every plan, so the collectives line up."""
    hidden = model.hidden(batch, pool)
    if hidden.shape[0] == 0:
        return hidden, None
    local = model.logits_from_hidden(hidden)  # [B', V_r] fp32
    return hidden, coll.gather_logits(local)
