"""Token-slot allocator of the KV pool (no torch: the scheduler owns it)."""

from __future__ import annotations

from typing import Protocol


class OutOfSlots(RuntimeError):
    """The pool has fewer free slots than asked for."""


class Reclaimer(Protocol):
    """Holds slots that count as free but must be taken back first (the prefix cache)."""

    @property
    def evictable_tokens(self) -> int: ...

    def evict(self, n: int) -> list[int]: ...


class SlotAllocator:
    """Free list of token slots `0 .. capacity-1`; the scheduler reserves, this hands out indices.

    Slots are handed out lowest-first so a fresh request gets mostly contiguous slots. With a
    `reclaimer`, its evictable slots count as free (`num_free`, `num_used`: held by requests)
    and `alloc` evicts them when the free list runs short.
    """

    def __init__(self, capacity_tokens: int, reclaimer: Reclaimer | None = None) -> None:
        self.capacity_tokens = capacity_tokens
        self.reclaimer = reclaimer
        self._free: list[int] = list(range(capacity_tokens - 1, -1, -1))  # pop() gives the lowest

    @property
    def num_idle(self) -> int:
        """Slots on the free list (neither held nor cached)."""
        return len(self._free)

    @property
    def num_free(self) -> int:
        """Slots a request can get: the free list plus the cache's evictable slots."""
        extra = self.reclaimer.evictable_tokens if self.reclaimer is not None else 0
        return len(self._free) + extra

    @property
    def num_used(self) -> int:
        """Slots held by requests (cached slots no request holds are free)."""
        return self.capacity_tokens - self.num_free

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free) and self.reclaimer is not None:
            self._free.extend(self.reclaimer.evict(n - len(self._free)))
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

    def free_list(self) -> list[int]:
        """A copy of the free list (tests: slot accounting)."""
        return list(self._free)
