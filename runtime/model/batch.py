"""The forward batch: one flat batch of new tokens (prefill chunks and decode tokens alike), and
its builder from per-sequence views (new tokens, positions, KV slots)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ForwardBatch:
    """One forward over a flat batch of new tokens (prefill chunks and decode tokens alike)."""

    input_ids: Tensor  # [T] int64, new tokens of all sequences, sequence-major
    positions: Tensor  # [T] int64, absolute position of each token
    out_slots: Tensor  # [T] int64, KV slot each new token's K/V is written to
    block_table: Tensor  # [B, L] int64, KV slots of each sequence's tokens (pad = pool.pad_slot)
    seq_lens: Tensor  # [B] int64, tokens per sequence after this step (cached + new)
    query_lens: list[int]  # new tokens per sequence (host ints, sum = T)
    logits_index: Tensor  # [B] int64, the row of T whose output is wanted (the last new token)

    @property
    def is_decode(self) -> bool:
        return max(self.query_lens, default=1) == 1


@dataclass
class SeqChunk:
    """One sequence's part of a forward: `new_ids` at positions `start_pos ...` over `slots`."""

    new_ids: Sequence[int]
    start_pos: int  # tokens already in the KV pool for this sequence
    slots: Sequence[int]  # KV slots of all its tokens, cached and new (>= start_pos + new)
    want_logits: bool = True  # False for a prefill chunk that is not the prompt's last


def make_forward_batch(
    chunks: Sequence[SeqChunk],
    pad_slot: int,
    device: torch.device | str = "cpu",
    all_logits: bool = False,
    block_len: int | None = None,
) -> ForwardBatch:
    """Pack `chunks` into flat tensors; `all_logits` asks for every new token's row (tests)."""
    ids: list[int] = []
    pos: list[int] = []
    out_slots: list[int] = []
    q_lens: list[int] = []
    seq_lens: list[int] = []
    rows: list[int] = []
    l_max = block_len or max(c.start_pos + len(c.new_ids) for c in chunks)
    table: list[list[int]] = []
    for c in chunks:
        n = len(c.new_ids)
        end = c.start_pos + n
        ids.extend(c.new_ids)
        pos.extend(range(c.start_pos, end))
        out_slots.extend(c.slots[c.start_pos : end])
        q_lens.append(n)
        seq_lens.append(end)
        if all_logits:
            rows.extend(range(len(ids) - n, len(ids)))
        elif c.want_logits:
            rows.append(len(ids) - 1)
        table.append(list(c.slots[:end]) + [pad_slot] * (l_max - end))

    def t(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return ForwardBatch(
        input_ids=t(ids),  # [T]
        positions=t(pos),  # [T]
        out_slots=t(out_slots),  # [T]
        block_table=t(table),  # [B, L]
        seq_lens=t(seq_lens),  # [B]
        query_lens=q_lens,
        logits_index=t(rows),  # [B'] rows that get logits
    )
