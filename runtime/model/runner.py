"""The model runner: the engine hands it one step's chunks; it packs them into one
`ForwardBatch` and runs the model (through CUDA graphs where they apply) on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from runtime.model import reward
from runtime.model.batch import ForwardBatch, SeqChunk, make_forward_batch
from runtime.model.graphs import GraphRunner
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM


@dataclass
class ModelRunner:
    """Owns the model, the KV pool and the device; the engine hands it one plan per step."""

    model: CausalLM
    pool: KVPool
    device: torch.device
    max_req_total_len: int
    batch_max_tokens: int
    eos_ids: list[int]
    generation_defaults: dict[str, object] = field(default_factory=dict)
    graphs: GraphRunner | None = None
    reward_kernel: bool = True  # the CuPy reward-head kernel on CUDA (else its torch twin)

    @property
    def is_reward_model(self) -> bool:
        return self.model.config.is_reward_model

    def prepare(self, chunks: list[SeqChunk]) -> ForwardBatch:
        """One step's chunks as flat tensors (decode chunks first, as the scheduler orders them)."""
        return make_forward_batch(chunks, self.pool.pad_slot, self.device)

    def run(self, batch: ForwardBatch) -> Tensor:
        """Final-normed hidden rows `[B', H]` of the chunks that sample."""
        if self.graphs is not None and self.graphs.can_run(batch):
            return self.graphs.run(batch)
        return self.model.hidden(batch, self.pool)

    def score(self, batch: ForwardBatch) -> Tensor:
        """Reward models: scores `[B']` fp32 of the chunks that sample (prefill only)."""
        return reward.score_batch(self.model, batch, self.pool, self.reward_kernel)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.model.logits_from_hidden(hidden)  # [B', V] fp32

    def watch(self, on_failure: Callable[[BaseException], None]) -> None:
        """Call `on_failure` (from any thread) on a failure outside the steps, such as a
        tensor-parallel worker's death (`runtime.parallel.launch`); nothing to watch here."""

    def close(self) -> None:
        """Release what the runner holds besides memory (tensor-parallel workers); nothing here."""
