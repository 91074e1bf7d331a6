"""The engine's Trio face: `AsyncEngine.run` lives in the app's nursery and steps the core on its
model thread; each request is a memory channel of events, aborted when its consumer leaves."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress

import trio

from runtime.engine.api import (
    EngineDead,
    ErrorEvent,
    Hold,
    LoadFigures,
    ModelInfo,
    QueueFull,
    ScoreEvent,
)
from runtime.engine.args import EngineArgs
from runtime.engine.core import EngineCore, Event, Request
from runtime.engine.loader import load_runner
from runtime.engine.model_thread import ModelThread
from runtime.sampling.params import SamplingParams
from runtime.text.tokenizer import Tokenizer

# A step that scheduled nothing (every running sequence held, the waiting ones not admitted)
# is retried after this long or at the next submission, abort or release.
IDLE_RECHECK_S = 0.05


class AsyncEngine:
    """Trio face of the engine; `run` lives in the app's nursery and steps the core on a thread."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.core: EngineCore | None = None
        self.info: ModelInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.dead: BaseException | None = None
        self._failure: BaseException | None = None  # reported by the runner between steps
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
        model_thread = ModelThread()  # the load and every step on one thread (its docstring)
        try:
            await self._serve(model_thread, task_status)
        finally:
            model_thread.close()

    async def _serve(self, model_thread: ModelThread, task_status: trio.TaskStatus[None]) -> None:
        core = await model_thread.run(self._load)
        self.core, self.tokenizer = core, core.tokenizer
        self.info = core.model_info()
        core.runner.watch(self._failure_reporter())
        task_status.started()
        try:
            while True:
                if self._failure is not None:
                    raise self._failure
                if not core.has_work():
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    continue
                core.timer.lap("idle")
                events = await model_thread.run(core.step)
                self.steps_done += 1
                self.last_step_done_s = trio.current_time()
                self._deliver(events)
                core.timer.lap("deliver")
                if core.last_step_empty:  # nothing could run: wait for a change, not spin
                    with trio.move_on_after(IDLE_RECHECK_S):
                        await self._wakeup.wait()
                    self._wakeup = trio.Event()
        except BaseException as exc:
            self.dead = exc
            for send in list(self._channels.values()):
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    send.send_nowait(ErrorEvent(f"engine failed: {exc!r}"))
                send.close()
            self._channels.clear()
            raise

    def _failure_reporter(self) -> Callable[[BaseException], None]:
        """A thread-safe callback that makes the step loop raise `exc` (a tensor-parallel
        worker's death while the engine idles: the same death path as a failed step)."""
        token = trio.lowlevel.current_trio_token()

        def fail(exc: BaseException) -> None:
            self._failure = exc
            self._wakeup.set()

        def report(exc: BaseException) -> None:
            with suppress(trio.RunFinishedError):
                token.run_sync_soon(fail, exc)

        return report

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

    def set_held(self, hold: Hold, held: bool) -> None:
        """Hold a request's sequences out of the decode batch, or let them go (KV kept)."""
        hold.held = held
        if not held:
            self._wakeup.set()

    @asynccontextmanager
    async def _submit(
        self, prompt_ids: list[int], params: SamplingParams, score: bool, hold: Hold | None = None
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Event]]:
        core = self._check_accepting()
        req = core.new_request(next(self._req_ids), prompt_ids, params, score, hold)
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
        self, prompt_ids: list[int], params: SamplingParams, hold: Hold | None = None
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Event]]:
        """Submit on enter; leaving the block before the last event aborts the request. `hold`
        lets the consumer pause it (`set_held`)."""
        return self._submit(prompt_ids, params, score=False, hold=hold)

    async def score(self, prompt_ids: list[int]) -> ScoreEvent:
        """Score a prompt with the reward head (prefill only)."""
        async with self._submit(prompt_ids, SamplingParams(max_new_tokens=1), score=True) as events:
            async for ev in events:
                if isinstance(ev, ScoreEvent):
                    return ev
                if isinstance(ev, ErrorEvent):
                    raise EngineDead(ev.message)
        raise EngineDead("the engine closed the request without a score")
