"""Preallocated token-slot KV pool and its slot allocator."""

from __future__ import annotations

import torch

from runtime.config import ModelConfig


class OutOfSlots(RuntimeError):
    """The pool has fewer free slots than asked for."""


class SlotAllocator:
    """Free list of token slots `0 .. capacity-1`; the scheduler reserves, this hands out indices.

    Slots are handed out lowest-first so a fresh request gets mostly contiguous slots.
    """

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._free: list[int] = list(range(capacity_tokens - 1, -1, -1))  # pop() gives the lowest

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity_tokens - len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfSlots(f"asked for {n} KV slots, {len(self._free)} free")
        if n == 0:
            return []
        out = self._free[-n:]
        del self._free[-n:]
        out.reverse()
        return out

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)


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
        self.allocator = SlotAllocator(capacity_tokens)

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
        elem_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * config.num_kv_heads * config.head_dim * elem_bytes

    @classmethod
    def capacity_for_budget(cls, config: ModelConfig, dtype: torch.dtype, budget_bytes: int) -> int:
        return max(0, budget_bytes // cls.bytes_per_token(config, dtype))
