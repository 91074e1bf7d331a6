"""CPU twin (plain torch, any device) of the penalty + EOS-shaping step (DESIGN.md, "Sampling": steps 1-2).

The token counts of a batch of B rows come as CSR: row b owns entries
`row_ptr[b]:row_ptr[b+1]` of `token_ids`/`counts`; a token appears at most once per row.
`cuda/penalties_numba.py` implements the same semantics as a CUDA kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

MIN_TOKENS_EOS_LOGIT = -1e7  # EOS logit while fewer than min_new_tokens - 1 tokens are out


def apply_penalties_(
    logits: Tensor,  # [B, V] fp32, modified in place
    token_ids: Tensor,  # [N] int64
    counts: Tensor,  # [N] int32
    row_ptr: Tensor,  # [B+1] int64
    repetition: Tensor,  # [B] fp32
    frequency: Tensor,  # [B] fp32
    presence: Tensor,  # [B] fp32
    eos_ids: Tensor,  # [E] int64
    generated_len: Tensor,  # [B] int64
    min_new_tokens: Tensor,  # [B] int64
    decay_start: Tensor,  # [B] int64
    decay_factor: Tensor,  # [B] fp32
) -> None:
    """Apply repetition/frequency/presence penalties, then EOS shaping, in place.

    For every entry with count c > 0: l = l/rep if l > 0 else l*rep; l -= c*freq; l -= pres.
    Then for every EOS id: eos += |eos| * (factor^max(g - start, 0) - 1), and
    eos = -1e7 while g < min_new_tokens - 1. No host synchronisation.
    """
    batch = logits.shape[0]
    n = token_ids.shape[0]
    if n > 0:
        lens = row_ptr[1:] - row_ptr[:-1]  # [B]
        rows = torch.repeat_interleave(
            torch.arange(batch, device=logits.device), lens, output_size=n
        )  # [N]
        old = logits[rows, token_ids]  # [N]
        rep = repetition[rows]  # [N]
        new = torch.where(old > 0, old / rep, old * rep)  # [N]
        new = new - counts.to(torch.float32) * frequency[rows] - presence[rows]  # [N]
        new = torch.where(counts > 0, new, old)  # [N]
        logits.index_put_((rows, token_ids), new)

    if eos_ids.shape[0] > 0:
        eos = logits[:, eos_ids]  # [B, E]
        steps = (generated_len - decay_start).clamp_min(0).to(torch.float32)  # [B]
        scale = torch.pow(decay_factor, steps) - 1.0  # [B]
        eos = eos + eos.abs() * scale[:, None]  # [B, E]
        banned = (generated_len < min_new_tokens - 1)[:, None]  # [B, 1]
        eos = torch.where(banned, torch.full_like(eos, MIN_TOKENS_EOS_LOGIT), eos)  # [B, E]
        logits[:, eos_ids] = eos
