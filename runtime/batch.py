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
    slots: Sequence[int]  # KV slots of all its tokens, cached and new (len = start_pos + len(new_ids))


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
    last: list[int] = []
    l_max = block_len or max(len(c.slots) for c in chunks)
    table = torch.full((len(chunks), l_max), pad_slot, dtype=torch.int64)
    for b, c in enumerate(chunks):
        n = len(c.new_ids)
        ids.extend(c.new_ids)
        pos.extend(range(c.start_pos, c.start_pos + n))
        out_slots.extend(c.slots[c.start_pos : c.start_pos + n])
        q_lens.append(n)
        seq_lens.append(c.start_pos + n)
        last.append(len(ids) - 1)
        table[b, : len(c.slots)] = torch.as_tensor(c.slots, dtype=torch.int64)
    logits_index = list(range(len(ids))) if all_logits else last
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(pos, dtype=torch.int64, device=device),
        out_slots=torch.tensor(out_slots, dtype=torch.int64, device=device),
        block_table=table.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        query_lens=q_lens,
        logits_index=torch.tensor(logits_index, dtype=torch.int64, device=device),
    )
