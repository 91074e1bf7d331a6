"""Token-slot allocator of the KV pool (no torch: the scheduler owns it)."""

from __future__ import annotations


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
