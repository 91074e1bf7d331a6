"""Preallocated token-slot KV pool (the scheduler's `SlotAllocator` hands out its slots)."""

from __future__ import annotations

import torch

from runtime.model.config import ModelConfig


class KVPool:
    """K and V for every layer, addressed by token slot: `k[layer]` is `[capacity + 1, n_kv, head_dim]`.

    Slot `capacity` (= `pad_slot`) is reserved and inert: padding rows write there and attend to
    nothing real, so its contents never matter.
    """

    def __init__(
        self,
        config: ModelConfig,
        capacity_tokens: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity_tokens = capacity_tokens
        self.pad_slot = capacity_tokens
        shape = (config.num_layers, capacity_tokens + 1, config.num_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots+1, n_kv, hd]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [layers, slots+1, n_kv, hd]

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem_bytes

    @classmethod
    def capacity_for_budget(cls, config: ModelConfig, dtype: torch.dtype, budget_bytes: int) -> int:
        return max(0, budget_bytes // cls.bytes_per_token(config, dtype))
