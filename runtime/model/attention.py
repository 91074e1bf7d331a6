"""Attention over the token-slot KV pool: per-forward metadata (built once, shared by every
layer) and the torch path (gather + SDPA). Decode groups go to the decode backend the model was
assembled with (`runtime.model.backends`); prefill chunks always take the torch path."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.model.batch import ForwardBatch

# q [b, nh, hd], k_cache, v_cache [S, nkv, hd], block_table [b, L], seq_lens [b] -> [b, nh * hd]
DecodeAttention = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass
class AttnGroup:
    """Sequences attended together: decodes (one query each) or prefill chunks (padded queries)."""

    block_table: Tensor  # [b, L]
    mask: Tensor  # [b, 1, Q, L] bool, True = attend
    q_index: Tensor | None  # [t] row in the padded [b * Q] query layout; None for decodes
    q_max: int
    seq_lens: Tensor  # [b] tokens per sequence after this step


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
            batch.out_slots, n_dec, decode_group(batch.block_table, batch.seq_lens), None
        )
    dec = decode_group(batch.block_table[:n_dec], batch.seq_lens[:n_dec]) if n_dec else None
    pre = _prefill_group(
        batch.block_table[n_dec:], batch.seq_lens[n_dec:], batch.query_lens[n_dec:]
    )
    return AttnMeta(batch.out_slots, n_dec, dec, pre)


def decode_group(table: Tensor, seq_lens: Tensor) -> AttnGroup:
    """The group of decode sequences (one new token each) over their slot table `[b, L]`."""
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
    return AttnGroup(table, mask[:, None], seq_of_token * q_max + within, q_max, seq_lens)


def _gather_kv(cache: Tensor, table: Tensor) -> Tensor:
    b, l_max = table.shape
    out = cache.index_select(0, table.reshape(-1)).view(b, l_max, cache.shape[1], cache.shape[2])
    return out.transpose(1, 2)  # [b, nkv, L, hd]


def sdpa_attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, grp: AttnGroup) -> Tensor:
    """The torch path for one group: gather its K/V, SDPA; q `[t, nh, hd]` -> `[t, nh * hd]`."""
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


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    meta: AttnMeta,
    decode: DecodeAttention | None = None,
) -> Tensor:
    """Attention of the new tokens over each sequence's slots; q `[T, nh, hd]` -> `[T, nh * hd]`.

    `decode` runs the decode group (None: the torch path); prefill chunks take the torch path."""

    def attend_decode(qd: Tensor, grp: AttnGroup) -> Tensor:
        if decode is None:
            return sdpa_attend(qd, k_cache, v_cache, grp)
        return decode(qd, k_cache, v_cache, grp.block_table, grp.seq_lens)

    n = meta.num_decode_tokens
    if meta.prefill is None:
        assert meta.decode is not None
        return attend_decode(q, meta.decode)
    pre = sdpa_attend(q[n:], k_cache, v_cache, meta.prefill)
    if meta.decode is None:
        return pre
    return torch.cat([attend_decode(q[:n], meta.decode), pre], 0)
