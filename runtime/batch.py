"""Turn per-sequence views (new tokens, positions, KV slots) into one `ForwardBatch`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from runtime.model import ForwardBatch


@dataclass
class SeqChunk:
    """One sequence's part of a forward: `new_ids` at positions `start_pos ...` over `slots`."""

    new_ids: Sequence[int]
    start_pos: int  # tokens already in the KV pool for this sequence
    slots: Sequence[
        int
    ]  # KV slots of all its tokens, cached and new (len >= start_pos + len(new_ids))
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
