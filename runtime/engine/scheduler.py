"""Continuous-batching scheduler: waiting -> running -> finished. Imports no torch.

Each step mixes one decode token for every running sequence with prefill chunks (of running
sequences still prefilling, then of newly admitted ones) up to `batch_max_tokens`. Admission uses
LightLLM's peak-KV estimate (LightLLM §10, DESIGN.md); if the optimistic estimate is wrong and the pool runs dry,
the youngest running sequence is preempted and recomputed later.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from runtime.engine.api import LoadFigures
from runtime.engine.slots import SlotAllocator


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
    payload: object = None  # the engine's per-sequence state (sampling, detokenizer, request)

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


class Scheduler:
    """Owns the waiting queue, the running batch and the slot allocator."""

    def __init__(self, cfg: SchedulerConfig) -> None:
        self.cfg = cfg
        self.allocator = SlotAllocator(cfg.capacity_tokens)
        self.waiting: deque[Seq] = deque()
        self.running: list[Seq] = []
        self._dynamic_load = 0.0

    # ---- queue operations -------------------------------------------------------------
    def add(self, seq: Seq) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Seq) -> None:
        """Finished or aborted: free its slots at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.allocator.free(seq.slots)
        seq.slots = []
        seq.status = SeqStatus.FINISHED

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- the LightLLM estimate --------------------------------------------------------
    def _busy(self) -> bool:
        return self.allocator.num_used >= self.cfg.router_token_ratio * self.cfg.capacity_tokens

    def _need(self, seq: Seq, busy: bool) -> tuple[int, int]:
        """(resident tokens a, remaining tokens b) of LightLLM §10 (DESIGN.md)."""
        out = len(seq.output_ids)
        a = max(seq.num_tokens + 1, len(seq.slots) + 1)
        if seq.score_only:
            return a, 0
        if busy or seq.ignore_eos:
            b = seq.max_new_tokens - out
        else:
            guess = max(math.ceil(1.1 * out), self.cfg.router_max_new_token_len)
            b = min(seq.max_new_tokens, guess) - out
        return a, max(b, 0) + 6

    def peak_tokens(self, seqs: Iterable[Seq], busy: bool) -> int:
        """max_i (b_i (i + 1) + sum_{j<=i} a_j) with b sorted descending."""
        needs = sorted((self._need(s, busy) for s in seqs), key=lambda ab: -ab[1])
        peak, acc = 0, 0
        for i, (a, b) in enumerate(needs):
            acc += a
            peak = max(peak, b * (i + 1) + acc)
        return peak

    def load(self) -> LoadFigures:
        cap = self.cfg.capacity_tokens
        return LoadFigures(
            current_load=self.allocator.num_used / cap,
            logical_max_load=self._dynamic_load,
            dynamic_max_load=self._dynamic_load,
            running_reqs=len(self.running),
            waiting_reqs=len(self.waiting),
        )

    # ---- one step ---------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step; allocates the slots its tokens need."""
        decode: list[ScheduledChunk] = []
        prefill: list[ScheduledChunk] = []
        budget = self.cfg.batch_max_tokens
        self._make_room_for_decode()
        for seq in self.running:
            if not seq.prefilling:
                seq.slots.extend(self.allocator.alloc(1))
                decode.append(ScheduledChunk(seq, seq.num_computed, 1, True))
                budget -= 1
        for seq in self.running:  # unfinished chunked prefills first
            if seq.prefilling and budget > 0:
                budget -= self._plan_prefill(seq, budget, prefill)
        busy = self._busy()
        while self.waiting and budget > 0 and len(self.running) < self.cfg.running_max_req_size:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                continue
            peak = self.peak_tokens([*self.running, seq], busy)
            if peak >= self.cfg.capacity_tokens and self.running:
                break
            if seq.num_tokens + 1 > self.allocator.num_free:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            budget -= self._plan_prefill(seq, budget, prefill)
        self._dynamic_load = self.peak_tokens(self.running, busy) / self.cfg.capacity_tokens
        return StepPlan(decode + prefill, len(decode))

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

    def _make_room_for_decode(self) -> None:
        """Preempt the youngest running sequences while the pool cannot give every decode a slot."""
        while self.running:
            need = sum(1 for s in self.running if not s.prefilling)
            if need <= self.allocator.num_free:
                return
            victim = self.running.pop()
            self.allocator.free(victim.slots)
            victim.slots = []
            victim.num_computed = 0  # recompute prompt + output on readmission
            victim.status = SeqStatus.WAITING
            self.waiting.appendleft(victim)

    def commit(self, plan: StepPlan) -> None:
        """After the forward: the planned tokens' K/V are now in the pool."""
        for c in plan.chunks:
            c.seq.num_computed = c.start + c.length
