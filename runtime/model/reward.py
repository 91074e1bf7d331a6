"""Reward heads on our model: the score head's tensors as kernel inputs, and scoring a batch
through `cuda.reward_head` (the CuPy kernel on CUDA, its torch twin elsewhere)."""

from __future__ import annotations

import torch
from torch import Tensor

from cuda import reward_head
from runtime.model.batch import ForwardBatch
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM


def head_tensors(model: CausalLM, label: int = 0) -> dict[str, Tensor]:
    """The model's score head as kernel inputs (views, no copies).

    Dot kinds: {"weight": [H]} (row `label` of a multi-label classifier);
    "qwen2_reward": {"w1": [H, H], "b1": [H], "w2": [H], "b2": [1]}.
    """
    kind, head = model.config.head_kind, model.score_head
    if head is None or kind not in reward_head.KINDS:
        raise ValueError(f"not a reward model (head kind {kind!r})")
    if kind in reward_head.DOT_KINDS:
        assert isinstance(head, torch.nn.Linear)
        return {"weight": head.weight.detach()[label]}
    assert isinstance(head, torch.nn.Sequential)
    l1, l2 = head[0], head[2]
    assert isinstance(l1, torch.nn.Linear) and isinstance(l2, torch.nn.Linear)
    return {
        "w1": l1.weight.detach(),
        "b1": l1.bias.detach(),
        "w2": l2.weight.detach().reshape(-1),
        "b2": l2.bias.detach().reshape(-1),
    }


@torch.inference_mode()
def score_batch(
    model: CausalLM, batch: ForwardBatch, pool: KVPool, use_kernel: bool = True
) -> Tensor:
    """Reward scores `[B']` fp32 of the batch's `logits_index` rows (label 0 of a classifier);
    the kernel gathers the rows and applies the final norm itself."""
    rows = model.hidden_rows(batch, pool)  # [T, H], before the final norm
    cfg = model.config
    return reward_head.reward_scores(
        rows,
        batch.logits_index,
        model.norm,
        cfg.rms_norm_eps,
        head_tensors(model),
        cfg.head_kind,
        use_kernel,
    )
