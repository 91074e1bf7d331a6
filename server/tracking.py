"""Request accounting in one place: in-flight count, counters by outcome, tokens, histograms.

Every generating route (LightLLM's and OpenAI's) and `/get_score` wrap their time in the engine
in `track_request`, and call `Recorder.token()` for each token event:

    async with live.engine.generate(ids, params) as events:
        async with track_request(state, len(ids)) as rec:
            async for ev in events:
                rec.token(ev.seq_index)
            rec.outcome = "success"

The outcome stays "aborted" (client gone) unless the route says otherwise; a request refused by
a full queue (`QueueFull` leaving the block) is not counted as an outcome: the error handler
counts it as rejected.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from runtime.engine.api import EngineDead, QueueFull

from .state import ServerState


class Recorder:
    """What a route reports while its request runs."""

    def __init__(self, state: ServerState, prompt_tokens: int) -> None:
        self.state = state
        self.prompt_tokens = prompt_tokens
        self.generated = 0
        self.outcome = "aborted"
        self.start_s = trio.current_time()
        self._last_s: dict[int, float] = {}

    def token(self, seq_index: int = 0, queue_s: float | None = None) -> None:
        """One token of sequence `seq_index` arrived: counted, and timed (TTFT / ITL; the
        engine's queue time of the request with its first token)."""
        state = self.state
        state.progress()
        state.counters.generated_tokens += 1
        self.generated += 1
        now = trio.current_time()
        if not self._last_s:
            state.histograms.ttft.observe(now - self.start_s)
            if queue_s is not None:
                state.histograms.queue.observe(queue_s)
        last = self._last_s.get(seq_index)
        if last is not None:
            state.histograms.itl.observe(now - last)
        self._last_s[seq_index] = now

    def _end(self) -> None:
        state = self.state
        state.request_ended()
        if self.outcome != "busy":
            state.counters.count_outcome(self.outcome)
            state.histograms.e2e.observe(trio.current_time() - self.start_s)
            state.histograms.generation_len.observe(self.generated)


@asynccontextmanager
async def track_request(state: ServerState, prompt_tokens: int) -> AsyncIterator[Recorder]:
    """Account for one accepted request from entry to exit, whatever ends it."""
    rec = Recorder(state, prompt_tokens)
    state.request_started()
    state.counters.request_count += 1
    state.counters.prompt_tokens += prompt_tokens
    state.histograms.prompt_len.observe(prompt_tokens)
    try:
        yield rec
    except QueueFull:
        rec.outcome = "busy"
        raise
    except EngineDead:
        rec.outcome = "failure"
        raise
    finally:
        rec._end()
