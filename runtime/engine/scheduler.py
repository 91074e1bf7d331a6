"""Continuous-batching scheduler: waiting -> running -> finished. Imports no torch.

Each step mixes one decode token for every running sequence with prefill chunks (of running
sequences still prefilling, then of newly admitted ones) up to `batch_max_tokens`. Admission uses
LightLLM's peak-KV estimate (LightLLM §10, DESIGN.md); if the optimistic estimate is wrong and the pool runs dry,
the youngest running sequence is preempted and recomputed later.

With the prefix cache (`runtime.engine.prefix_cache`), an admitted sequence attaches its longest
cached prefix (at most all but its last token, whose logits it needs) and prefills the rest; the
K/V it computes is published into the tree after each prefill chunk and when it finishes, so
later requests (and its own siblings, which wait for that) share the slots.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from runtime.engine.api import Hold, LoadFigures
from runtime.engine.prefix_cache import Node, PrefixCache, common_prefix
from runtime.engine.slots import SlotAllocator

# Sequences waiting on an in-flight prefix that one step skips before it stops looking further
# down the queue (each costs a tree lookup).
MAX_WAITS_SCANNED = 64


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Seq:
    """One sequence: a prompt, the tokens generated so far, and its KV slots."""

    seq_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    ignore_eos: bool = False
    score_only: bool = False  # reward models: prefill only
    output_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the pool
    status: SeqStatus = SeqStatus.WAITING
    aborted: bool = False
    prefix_node: Node | None = None  # the prefix-cache node this sequence holds
    prefix_len: int = 0  # slots[:prefix_len] belong to the prefix cache, the rest to us
    cached_tokens: int = 0  # prompt tokens attached from the cache when the first token came
    payload: object = None  # the engine's per-sequence state (sampling, detokenizer, request)
    hold: Hold | None = None  # its consumer's switch: held sequences do not decode

    @property
    def held(self) -> bool:
        return self.hold is not None and self.hold.held

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_tokens - 1 or self.num_computed == 0


@dataclass
class ScheduledChunk:
    """`seq` computes tokens `[start, start + length)` this step; `sample` if logits are wanted."""

    seq: Seq
    start: int
    length: int
    sample: bool


@dataclass
class StepPlan:
    """What one engine step runs: decode chunks first, then prefill chunks."""

    chunks: list[ScheduledChunk]
    num_decode: int

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass
class SchedulerConfig:
    capacity_tokens: int
    batch_max_tokens: int
    running_max_req_size: int
    router_token_ratio: float = 0.9
    router_max_new_token_len: int = 1024
    prefix_cache: bool = True  # False: --disable_dynamic_prompt_cache


class Scheduler:
    """Owns the waiting queue, the running batch, the slot allocator and the prefix cache."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.cache = PrefixCache() if cfg.prefix_cache else None
        self.allocator = SlotAllocator(cfg.capacity_tokens, self.cache)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._dynamic_load = 0.0
        self.prefix_queried_tokens = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_hit_tokens = 0  # of those, found there (their prefill was skipped)

    # ---- queue operations -------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Seq) -> None:
        """Finished or aborted: publish the K/V it computed (not if aborted), free the rest."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        if not seq.aborted:
            self._publish(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    @property
    def has_work(self) -> bool:
        """Something to schedule: a waiting sequence, or a running one not held."""
        return bool(self.waiting) or any(not s.held for s in self.running)

    # ---- the prefix cache ---------------------------------------------------------------
    def _attach(self, seq: Seq) -> None:
        """Take the longest cached prefix of `seq` (all but its last token at most)."""
        if self.cache is None:
            return
        node, slots = self.cache.match(seq.all_ids, seq.num_tokens - 1)
        self.cache.lock(node)
        seq.prefix_node, seq.prefix_len = node, len(slots)
        seq.slots, seq.num_computed = slots, len(slots)

    def _publish(self, seq: Seq) -> None:
        """Hand the K/V `seq` computed (`num_computed` tokens, no more) to the tree.

        Where the tree already had those tokens (another sequence published them first), the
        tree's slots replace ours and ours go back to the free list."""
        if self.cache is None or seq.prefix_node is None or seq.num_computed <= seq.prefix_len:
            return
        lo, hi = seq.prefix_len, seq.num_computed
        node, tree_slots, dup = self.cache.insert(
            seq.prefix_node, seq.all_ids[lo:hi], seq.slots[lo:hi]
        )
        self.allocator.free(dup)
        seq.slots[lo:hi] = tree_slots
        self.cache.lock(node)
        self.cache.unlock(seq.prefix_node)
        seq.prefix_node, seq.prefix_len = node, hi

    def _release(self, seq: Seq) -> None:
        """Drop the hold on the cached prefix and free the slots the sequence owns."""
        if self.cache is not None and seq.prefix_node is not None:
            self.cache.unlock(seq.prefix_node)
        self.allocator.free(seq.slots[seq.prefix_len :])
        seq.slots, seq.prefix_node, seq.prefix_len = [], None, 0

    def _waits_for_inflight(self, seq: Seq) -> bool:
        """A running sequence is prefilling more of `seq`'s prefix than the cache holds: let it
        publish first (the n sequences of one request share their prompt's slots this way)."""
        if self.cache is None:
            return False
        ids, limit = seq.all_ids, seq.num_tokens - 1
        for other in self.running:
            if other.prefilling and other.prompt_ids[:1] == ids[:1]:
                if common_prefix(ids, other.all_ids, limit) > seq.prefix_len:
                    return True
        return False

    # ---- the LightLLM estimate --------------------------------------------------------
    def _busy(self) -> bool:
        return self.allocator.num_used >= self.cfg.router_token_ratio * self.cfg.capacity_tokens

    def _need(self, seq: Seq, busy: bool) -> tuple[int, int]:
        """(resident tokens a, remaining tokens b) of LightLLM §10 (DESIGN.md); a leaves out
        the cached prefix, which `peak_tokens` counts once for all its holders."""
        out = len(seq.output_ids)
        a = max(seq.num_tokens + 1, len(seq.slots) + 1) - seq.prefix_len
        if seq.score_only or seq.held:  # a held sequence grows only when let go (preemption
            return a, 0  # covers a pool that runs dry then): it must not keep others waiting
        if busy or seq.ignore_eos:
            b = seq.max_new_tokens - out
        else:
            guess = max(math.ceil(1.1 * out), self.cfg.router_max_new_token_len)
            b = min(seq.max_new_tokens, guess) - out
        return a, max(b, 0) + 6

    def peak_tokens(self, seqs: Iterable[Seq], busy: bool) -> int:
        """held cache slots + max_i (b_i (i + 1) + sum_{j<=i} a_j) with b sorted descending."""
        needs = sorted((self._need(s, busy) for s in seqs), key=lambda ab: -ab[1])
        peak, acc = 0, 0
        for i, (a, b) in enumerate(needs):
            acc += a
            peak = max(peak, b * (i + 1) + acc)
        return peak + (self.cache.locked_tokens if self.cache is not None else 0)

    def load(self) -> LoadFigures:
        cap = self.cfg.capacity_tokens
        return LoadFigures(
            current_load=self.allocator.num_used / cap,
            logical_max_load=self._dynamic_load,
            dynamic_max_load=self._dynamic_load,
            running_reqs=len(self.running),
            waiting_reqs=len(self.waiting),
            cached_tokens=self.cache.total_tokens if self.cache is not None else 0,
            prefix_queried_tokens=self.prefix_queried_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
        )

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step; allocates the slots its tokens need."""
        decode: list[ScheduledChunk] = []
        prefill: list[ScheduledChunk] = []
        budget = self.cfg.batch_max_tokens
        for seq in self._make_room_for_decode():
            seq.slots.extend(self.allocator.alloc(1))
            decode.append(ScheduledChunk(seq, seq.num_computed, 1, True))
            budget -= 1
        for seq in self.running:  # unfinished chunked prefills first
            if seq.prefilling and budget > 0:
                budget -= self._plan_prefill(seq, budget, prefill)
        busy = self._busy()
        waits = 0
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.cfg.running_max_req_size:
                break
            admitted = self._admit(seq, busy)
            if admitted is None:  # it waits for a running sequence to publish its prefix
                waits += 1
                if waits >= MAX_WAITS_SCANNED:
                    break
                continue
            if not admitted:
                break
            budget -= self._plan_prefill(seq, budget, prefill)
        self._dynamic_load = self.peak_tokens(self.running, busy) / self.cfg.capacity_tokens
        return StepPlan(decode + prefill, len(decode))

    def _admit(self, seq: Seq, busy: bool) -> bool | None:
        """Move `seq` to running if the estimate allows: True, False (no room), None (wait)."""
        if seq.aborted:
            self.waiting.remove(seq)
            return None
        self._attach(seq)
        if self._waits_for_inflight(seq):
            self._release(seq)
            seq.num_computed = 0
            return None
        peak = self.peak_tokens([*self.running, seq], busy)
        short = seq.num_tokens - seq.num_computed + 1 > self.allocator.num_free
        if (peak >= self.cfg.capacity_tokens and self.running) or short:
            self._release(seq)
            seq.num_computed = 0
            return False
        if self.cache is not None:
            self.prefix_queried_tokens += seq.num_tokens
            self.prefix_hit_tokens += seq.num_computed
        if not seq.output_ids:
            seq.cached_tokens = seq.num_computed
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        return True

    def _plan_prefill(self, seq: Seq, budget: int, out: list[ScheduledChunk]) -> int:
        """Schedule the next prefill chunk of `seq` within `budget` tokens; returns its length."""
        remaining = seq.num_tokens - seq.num_computed
        length = min(
            remaining, budget, self.allocator.num_free - (len(seq.slots) - seq.num_computed)
        )
        if length <= 0:
            return 0
        seq.slots.extend(self.allocator.alloc(seq.num_computed + length - len(seq.slots)))
        out.append(ScheduledChunk(seq, seq.num_computed, length, length == remaining))
        return length

    def _make_room_for_decode(self) -> list[Seq]:
        """The sequences that decode this step (not held), after preempting the youngest running
        ones while the pool cannot give each a slot.

        A victim's computed K/V goes to the prefix cache: unheld, it counts as free, and if it
        is not evicted meanwhile the victim attaches it again on readmission."""
        while True:
            decoding = [s for s in self.running if not s.prefilling and not s.held]
            if len(decoding) <= self.allocator.num_free or not self.running:
                return decoding
            victim = self.running.pop()
            self._publish(victim)
            self._release(victim)
            victim.num_computed = 0  # recompute what the cache no longer has on readmission
            victim.status = SeqStatus.WAITING
            self.waiting.appendleft(victim)

    def commit(self, plan: StepPlan) -> None:
        """After the forward: the planned tokens' K/V are in the pool; prefill chunks publish
        theirs into the prefix cache at once (decoded tokens when the sequence finishes)."""
        for i, c in enumerate(plan.chunks):
            c.seq.num_computed = c.start + c.length
            if i >= plan.num_decode:
                self._publish(c.seq)
