"""The engine core: a synchronous step loop (schedule -> plan -> forward -> sample -> update)
stepped on a worker thread by `runtime.engine.async_engine.AsyncEngine`."""

from __future__ import annotations

import itertools
import random
import time
from collections import deque
from dataclasses import dataclass, field
from threading import Lock

from torch import Tensor

from runtime.engine.api import (
    ErrorEvent,
    FinishReason,
    Hold,
    ModelInfo,
    ScoreEvent,
    TokenEvent,
)
from runtime.engine.args import EngineArgs
from runtime.engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, Seq, StepPlan
from runtime.model.batch import SeqChunk
from runtime.model.runner import ModelRunner
from runtime.sampling.params import SamplingParams
from runtime.sampling.sampler import RowState, Sampler, build_sampling_batch
from runtime.text.detokenizer import IncrementalDetokenizer, StopMatcher
from runtime.text.tokenizer import Tokenizer

Event = TokenEvent | ScoreEvent | ErrorEvent


@dataclass(eq=False)
class Request:
    """A client request: one prompt, n sequences (or one score-only sequence)."""

    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Seq] = field(default_factory=list)
    num_finished: int = 0
    submitted_s: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.num_finished == len(self.seqs)


@dataclass(eq=False)
class SeqState:
    """Engine-side state of one sequence, kept in `Seq.payload`."""

    req: Request
    index: int
    row: RowState
    detok: IncrementalDetokenizer | None
    stop: StopMatcher | None
    queue_s: float | None = None  # set by the first step that schedules the sequence


def _chunk(c: ScheduledChunk) -> SeqChunk:
    """A scheduled chunk as the runner's view: its new tokens over the sequence's slots."""
    return SeqChunk(c.seq.all_ids[c.start : c.start + c.length], c.start, c.seq.slots, c.sample)


def _state(seq: Seq) -> SeqState:
    st = seq.payload
    assert isinstance(st, SeqState)
    return st


class PhaseTimer:
    """Accumulated wall time per step phase (`lap(name)` charges the time since the last lap)."""

    def __init__(self) -> None:
        self.totals_s: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals_s[phase] = self.totals_s.get(phase, 0.0) + now - self._last
        self._last = now

    def reset(self) -> None:
        self.totals_s.clear()
        self._last = time.perf_counter()


class EngineCore:
    """Synchronous engine: submissions and aborts go through a locked inbox drained at each step."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, args: EngineArgs) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.args = args
        self.sampler = Sampler(greedy=runner.model.ops.greedy)
        self.eos_ids = runner.eos_ids
        self.scheduler = Scheduler(
            SchedulerConfig(
                capacity_tokens=runner.pool.capacity_tokens,
                batch_max_tokens=runner.batch_max_tokens,
                running_max_req_size=args.running_max_req_size,
                router_token_ratio=args.router_token_ratio,
                router_max_new_token_len=args.router_max_new_token_len,
                prefix_cache=not args.disable_dynamic_prompt_cache,
            )
        )
        self._inbox: deque[tuple[str, Request]] = deque()
        self._lock = Lock()
        self._seq_ids = itertools.count()
        self._rng = random.Random(args.seed)  # seeds of unseeded requests, in arrival order
        self._steps = 0
        self.timer = PhaseTimer()
        self.load_figures = self.scheduler.load()
        self.last_step_empty = False  # the last step scheduled nothing (all held, or no room)

    def model_info(self) -> ModelInfo:
        """What the server needs to know about the loaded model."""
        return ModelInfo(
            model_name=self.args.model_name,
            vocab_size=self.runner.model.config.vocab_size,
            max_req_total_len=self.runner.max_req_total_len,
            eos_ids=list(self.eos_ids),
            is_reward_model=self.runner.is_reward_model,
            generation_defaults=dict(self.runner.generation_defaults),
        )

    # ---- called from the Trio thread ---------------------------------------------------
    def submit(self, req: Request) -> None:
        with self._lock:
            self._inbox.append(("add", req))

    def abort(self, req: Request) -> None:
        with self._lock:
            self._inbox.append(("abort", req))

    def has_work(self) -> bool:
        return bool(self._inbox) or self.scheduler.has_work

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting) + len(self._inbox)

    def new_request(
        self,
        req_id: int,
        prompt_ids: list[int],
        params: SamplingParams,
        score: bool,
        hold: Hold | None = None,
    ) -> Request:
        req = Request(req_id, list(prompt_ids), params)
        default_seed = self._rng.getrandbits(63)  # drawn for every request: arrival order decides
        limit = self.runner.max_req_total_len
        max_new = params.max_new_tokens or max(1, limit - len(prompt_ids))
        for i in range(1 if score else params.n):
            seq = Seq(
                next(self._seq_ids),
                req.prompt_ids,
                max_new,
                params.ignore_eos,
                score_only=score,
                hold=hold,
            )
            detok = (
                None
                if score
                else IncrementalDetokenizer(
                    self.tokenizer,
                    req.prompt_ids[-5:],
                    skip_special_tokens=params.skip_special_tokens,
                )
            )
            stop = StopMatcher(params.stop_strings) if params.stop_strings else None
            row = RowState.start(params, req.prompt_ids, i, default_seed)
            seq.payload = SeqState(req, i, row, detok, stop)
            req.seqs.append(seq)
        return req

    # ---- the step, on the engine thread --------------------------------------------------
    def step(self) -> list[tuple[Request, Event]]:
        """schedule -> plan -> forward -> sample -> update; returns the events to deliver."""
        self._drain_inbox()
        plan = self.scheduler.schedule()
        self.last_step_empty = plan.empty
        events: list[tuple[Request, Event]] = []
        if not plan.empty:
            self._count_step(plan)
            batch = self.runner.prepare([_chunk(c) for c in plan.chunks])
            if self.runner.is_reward_model:  # prefill only: one score per prompt
                events = self._scored(plan, self.runner.score(batch))  # [B'] fp32
            else:
                events = self._sampled(plan, self.runner.run(batch))  # [B', H] hidden rows
        self.load_figures = self.scheduler.load()
        self.timer.lap("update")
        return events

    def _count_step(self, plan: StepPlan) -> None:
        self.timer.lap("schedule")
        now = time.perf_counter()
        for c in plan.chunks:  # queue time: submission to the first step that schedules it
            st = _state(c.seq)
            if st.queue_s is None:
                st.queue_s = now - st.req.submitted_s
        self._steps += 1
        fault = self.args.fault_inject_step
        if fault is not None and self._steps >= fault:
            raise RuntimeError(f"fault injected at engine step {self._steps}")

    def _drain_inbox(self) -> None:
        with self._lock:
            items = list(self._inbox)
            self._inbox.clear()
        for op, req in items:
            for seq in req.seqs:
                if op == "add":
                    self.scheduler.add(seq)
                else:
                    seq.aborted = True
                    self.scheduler.finish(seq)

    def _scored(self, plan: StepPlan, scores: Tensor) -> list[tuple[Request, Event]]:
        self.timer.lap("forward")
        self.scheduler.commit(plan)
        events: list[tuple[Request, Event]] = []
        chunks = [c for c in plan.chunks if c.sample]
        for c, score in zip(chunks, scores.tolist(), strict=True):
            st = _state(c.seq)
            self._finish(c.seq)
            ev = ScoreEvent(float(score), len(c.seq.prompt_ids), c.seq.cached_tokens)
            events.append((st.req, ev))
        return events

    def _sampled(self, plan: StepPlan, hidden: Tensor) -> list[tuple[Request, Event]]:
        self.timer.lap("forward")
        self.scheduler.commit(plan)
        events: list[tuple[Request, Event]] = []
        chunks = [c for c in plan.chunks if c.sample]
        if not chunks:
            return events
        logits = self.runner.logits(hidden)  # [B', V] fp32
        rows = [_state(c.seq).row for c in chunks]
        batch = build_sampling_batch(rows, self.eos_ids, logits.shape[-1], logits.device)
        token_ids, logprobs = self.sampler.sample(logits, batch)
        tokens, lps = token_ids.tolist(), logprobs.tolist()  # the step's one host sync
        self.timer.lap("sample")
        for c, tok, lp in zip(chunks, tokens, lps, strict=True):
            events.append(self._accept(c.seq, tok, lp))
        self.timer.lap("detokenize")
        return events

    def _accept(self, seq: Seq, tok: int, logprob: float) -> tuple[Request, Event]:
        st = _state(seq)
        params = st.req.params
        seq.output_ids.append(tok)
        st.row.record(tok)
        n_out = len(seq.output_ids)
        reason: FinishReason | None = None
        is_eos = tok in self.eos_ids
        assert st.detok is not None
        if is_eos and not seq.ignore_eos:
            reason = "stop"
            text = (
                self.tokenizer.decode([tok], skip_special_tokens=False)
                if params.print_eos_token
                else ""
            )
        else:
            text = st.detok.push(tok)
        if reason is None and any(seq.output_ids[-len(s) :] == s for s in params.stop_token_seqs):
            reason = "stop"
        if reason is None and n_out >= seq.max_new_tokens:
            reason = "length"
        if reason is not None:
            text += st.detok.flush()
        if st.stop is not None:
            text, hit = st.stop.feed(text, final=reason is not None)
            if hit:
                reason = "stop"
        if reason is not None:
            self._finish(seq)
        event = TokenEvent(
            seq_index=st.index,
            token_id=tok,
            text=text,
            logprob=logprob,
            special=self.tokenizer.is_special(tok),
            count_output_tokens=n_out,
            prompt_tokens=len(seq.prompt_ids),
            finished=reason is not None,
            finish_reason=reason,
            cached_tokens=seq.cached_tokens,
            queue_s=st.queue_s or 0.0,
        )
        return st.req, event

    def _finish(self, seq: Seq) -> None:
        self.scheduler.finish(seq)
        _state(seq).req.num_finished += 1
