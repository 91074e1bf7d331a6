"""The engine: a synchronous core stepped on a worker thread, and its Trio-facing wrapper."""

from __future__ import annotations

import itertools
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, field
from threading import Lock

import trio
from torch import Tensor

from runtime.detokenizer import IncrementalDetokenizer, StopMatcher
from runtime.engine_api import (
    EngineDead,
    ErrorEvent,
    FinishReason,
    LoadFigures,
    ModelInfo,
    QueueFull,
    ScoreEvent,
    TokenEvent,
)
from runtime.engine_args import EngineArgs
from runtime.model_runner import ModelRunner, load_runner
from runtime.sampler import RowState, Sampler, build_sampling_batch
from runtime.sampling_params import SamplingParams
from runtime.scheduler import Scheduler, Seq, StepPlan
from runtime.tokenizer import Tokenizer

Event = TokenEvent | ScoreEvent | ErrorEvent


@dataclass(eq=False)
class Request:
    """A client request: one prompt, n sequences (or one score-only sequence)."""

    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Seq] = field(default_factory=list)
    num_finished: int = 0

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
        self.sampler = Sampler()
        self.eos_ids = args.eos_id or runner.eos_ids or tokenizer.eos_ids
        self.scheduler = Scheduler(runner.scheduler_config(args))
        self._inbox: deque[tuple[str, Request]] = deque()
        self._lock = Lock()
        self._seq_ids = itertools.count()
        self._steps = 0
        self.timer = PhaseTimer()
        self.load_figures = self.scheduler.load()
        fault = args.fault_inject_step or os.environ.get("NURSERVE_FAULT_INJECT_STEP")
        self._fault_step = int(fault) if fault else None

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
        self, req_id: int, prompt_ids: list[int], params: SamplingParams, score: bool
    ) -> Request:
        req = Request(req_id, list(prompt_ids), params)
        limit = self.runner.max_req_total_len
        max_new = params.max_new_tokens or max(1, limit - len(prompt_ids))
        for i in range(1 if score else params.n):
            seq = Seq(
                next(self._seq_ids), req.prompt_ids, max_new, params.ignore_eos, score_only=score
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
            seq.payload = SeqState(req, i, RowState.start(params, req.prompt_ids, i), detok, stop)
            req.seqs.append(seq)
        return req

    # ---- the step, on the engine thread --------------------------------------------------
    def step(self) -> list[tuple[Request, Event]]:
        """schedule -> plan -> forward -> sample -> update; returns the events to deliver."""
        events: list[tuple[Request, Event]] = []
        clock = self.timer
        self._drain_inbox()
        plan = self.scheduler.schedule()
        clock.lap("schedule")
        if not plan.empty:
            self._steps += 1
            if self._fault_step is not None and self._steps >= self._fault_step:
                raise RuntimeError(f"fault injected at engine step {self._steps}")
            batch = self.runner.prepare(plan)
            clock.lap("prepare")
            hidden = self.runner.run(batch)  # [B', H] rows of the chunks that sample
            clock.lap("forward")
            self.scheduler.commit(plan)
            self._update(plan, hidden, events)
        self.load_figures = self.scheduler.load()
        clock.lap("update")
        return events

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

    def _update(self, plan: StepPlan, hidden: Tensor, events: list[tuple[Request, Event]]) -> None:
        chunks = [c for c in plan.chunks if c.sample]
        if not chunks:
            return
        if self.runner.is_reward_model:
            scores = hidden.tolist()  # [B'] floats: reward models' run() returns scores
            for c, score in zip(chunks, scores, strict=True):
                st = _state(c.seq)
                self._finish(c.seq)
                events.append((st.req, ScoreEvent(float(score), len(c.seq.prompt_ids))))
            return
        logits = self.runner.logits(hidden)  # [B', V] fp32
        rows = [_state(c.seq).row for c in chunks]
        batch = build_sampling_batch(rows, self.eos_ids, logits.shape[-1], logits.device)
        token_ids, logprobs = self.sampler.sample(logits, batch)
        tokens, lps = token_ids.tolist(), logprobs.tolist()  # the step's one host sync
        self.timer.lap("sample")
        for c, tok, lp in zip(chunks, tokens, lps, strict=True):
            events.append(self._accept(c.seq, tok, lp))
        self.timer.lap("detokenize")

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
        )
        return st.req, event

    def _finish(self, seq: Seq) -> None:
        self.scheduler.finish(seq)
        _state(seq).req.num_finished += 1


class AsyncEngine:
    """Trio face of the engine; `run` lives in the app's nursery and steps the core on a thread."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.core: EngineCore | None = None
        self.info: ModelInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.dead: BaseException | None = None
        self._channels: dict[int, trio.MemorySendChannel[Event]] = {}
        self._req_ids = itertools.count(1)
        self._wakeup = trio.Event()
        self.steps_done = 0
        self.last_step_done_s = 0.0

    def _load(self) -> EngineCore:
        runner, tokenizer = load_runner(self.args)
        return EngineCore(runner, tokenizer, self.args)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the model, report readiness, then step forever; raises when a step fails."""
        core = await trio.to_thread.run_sync(self._load)
        self.core, self.tokenizer = core, core.tokenizer
        self.info = core.runner.model_info(self.args, core.eos_ids)
        task_status.started()
        try:
            while True:
                if not core.has_work():
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                core.timer.lap("idle")
                events = await trio.to_thread.run_sync(core.step)
                self.steps_done += 1
                self.last_step_done_s = trio.current_time()
                self._deliver(events)
                core.timer.lap("deliver")
        except BaseException as exc:
            self.dead = exc
            for send in list(self._channels.values()):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    send.send_nowait(ErrorEvent(f"engine failed: {exc!r}"))
                send.close()
            self._channels.clear()
            raise

    def _deliver(self, events: list[tuple[Request, Event]]) -> None:
        done: list[Request] = []
        for req, ev in events:
            send = self._channels.get(req.req_id)
            if send is None:
                continue
            try:
                send.send_nowait(ev)
            except trio.BrokenResourceError:  # its receiver is closed: leaving `generate` aborts it
                self._channels.pop(req.req_id, None)
                continue
            if req.done:
                done.append(req)
        for req in done:  # after the loop: all n sequences may finish in one step
            send = self._channels.pop(req.req_id, None)
            if send is not None:
                send.close()

    def load(self) -> LoadFigures:
        if self.core is None:
            return LoadFigures(0.0, 0.0, 0.0)
        return self.core.load_figures

    def _check_accepting(self) -> EngineCore:
        if self.dead is not None or self.core is None:
            raise EngineDead("the engine is not running")
        core = self.core
        if core.num_waiting() >= self.args.max_waiting_reqs:
            raise QueueFull(core.num_waiting())
        return core

    @asynccontextmanager
    async def _submit(
        self, prompt_ids: list[int], params: SamplingParams, score: bool
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        core = self._check_accepting()
        req = core.new_request(next(self._req_ids), prompt_ids, params, score)
        send, recv = trio.open_memory_channel[Event](math.inf)
        self._channels[req.req_id] = send
        core.submit(req)
        self._wakeup.set()
        try:
            yield recv
        finally:
            # Unregister before closing: `aclose` checkpoints, and the engine may deliver then.
            self._channels.pop(req.req_id, None)
            recv.close()
            if not req.done and self.dead is None:
                core.abort(req)
                self._wakeup.set()

    def generate(
        self, prompt_ids: list[int], params: SamplingParams
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Event]]:
        """Submit on enter; leaving the block before the last event aborts the request."""
        return self._submit(prompt_ids, params, score=False)

    async def score(self, prompt_ids: list[int]) -> ScoreEvent:
        """Score a prompt with the reward head (prefill only)."""
        async with self._submit(prompt_ids, SamplingParams(max_new_tokens=1), score=True) as events:
            async for ev in events:
                if isinstance(ev, ScoreEvent):
                    return ev
                if isinstance(ev, ErrorEvent):
                    raise EngineDead(ev.message)
        raise EngineDead("the engine closed the request without a score")


def build_engine(args: EngineArgs) -> AsyncEngine:
    """An engine for `args`; the model loads when `run` starts."""
    return AsyncEngine(args)
