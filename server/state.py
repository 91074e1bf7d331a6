"""Per-process server state: the engine handle, liveness, stall detection and counters."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import trio
from prometheus_client import CollectorRegistry
from quart import current_app

from runtime.engine.api import Hold, LoadFigures, ModelInfo, ScoreEvent

from .flow import Pacer
from .metrics import Histograms, new_registry
from .settings import Settings


class TokenizerLike(Protocol):
    """What the server uses of `runtime.text.tokenizer.Tokenizer`."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


class EngineLike(Protocol):
    """What the server uses of `runtime.engine.core.AsyncEngine` (DESIGN.md, "Engine <-> server")."""

    info: ModelInfo | None  # set once `run` loaded the model
    tokenizer: Any
    dead: BaseException | None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...

    def load(self) -> LoadFigures: ...

    def generate(
        self, prompt_ids: list[int], params: Any, hold: Hold | None = None
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Any]]: ...

    def set_held(self, hold: Hold, held: bool) -> None: ...

    async def score(self, prompt_ids: list[int]) -> ScoreEvent: ...


@dataclass
class Live:
    """A running engine with its model info and tokenizer (what the routes use)."""

    engine: EngineLike
    info: ModelInfo
    tokenizer: TokenizerLike


@dataclass
class Counters:
    """Prometheus counters (monotonic) kept by the HTTP layer."""

    request_count: int = 0
    request_success: int = 0
    request_failure: int = 0
    request_invalid: int = 0
    request_rejected_busy: int = 0
    request_aborted: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    stream_slow_aborts: int = 0  # streams aborted because their client stopped reading
    stream_holds: int = 0  # times a stream's sequences were held because its client lagged
    http_errors: dict[int, int] = field(default_factory=dict)

    def count_outcome(self, outcome: str) -> None:
        """One request ended: "success", "aborted" (client gone) or anything else (failure)."""
        if outcome == "success":
            self.request_success += 1
        elif outcome == "aborted":
            self.request_aborted += 1
        else:
            self.request_failure += 1


@dataclass
class ServerState:
    """Everything the routes share; read without locks (one Trio thread)."""

    settings: Settings
    engine: EngineLike | None = None
    ready: bool = False
    shutting_down: bool = False
    death: BaseException | None = None
    in_flight: int = 0
    last_progress_s: float = 0.0  # trio.current_time() of the last event delivered
    counters: Counters = field(default_factory=Counters)
    pacer: Pacer = field(init=False, repr=False)  # streams paced by their client's TCP window
    guard: Any = None  # server.guard.ConnectionGuard (its count of unread-body closes)
    registry: CollectorRegistry = field(init=False, repr=False)
    histograms: Histograms = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.registry, self.histograms = new_registry(self)
        self.pacer = Pacer(self.settings.stream_pause_bytes, self.settings.stream_stall_s)

    def live(self) -> Live | None:
        """The engine with its info, or None before it loaded."""
        engine = self.engine
        if engine is None or not self.ready or engine.info is None or engine.tokenizer is None:
            return None
        return Live(engine, engine.info, engine.tokenizer)

    def dead_reason(self) -> str | None:
        """Why the engine cannot serve, or None when it can."""
        if self.death is not None:
            return f"engine failed: {self.death!r}"
        if self.engine is not None and getattr(self.engine, "dead", None) is not None:
            return f"engine failed: {self.engine.dead!r}"
        return None

    def stalled_s(self) -> float | None:
        """Seconds without progress while requests are in flight, when over the stall limit."""
        if self.in_flight <= 0:
            return None
        last_s = max(self.last_progress_s, float(getattr(self.engine, "last_step_done_s", 0.0)))
        idle_s = trio.current_time() - last_s
        return idle_s if idle_s > self.settings.stall_timeout_s else None

    def health_problem(self) -> str | None:
        """The reason /health answers 503, or None when healthy."""
        dead = self.dead_reason()
        if dead is not None:
            return dead
        if not self.ready or self.engine is None:
            return "engine not started"
        stalled = self.stalled_s()
        if stalled is not None:
            return f"engine stalled: {self.in_flight} requests in flight, no progress for {stalled:.0f} s"
        return None

    def request_started(self) -> None:
        """Count a request entering the engine (restarts the stall clock when idle)."""
        if self.in_flight == 0:
            self.last_progress_s = trio.current_time()
        self.in_flight += 1

    def request_ended(self) -> None:
        """Count a request leaving the engine."""
        self.in_flight -= 1

    def progress(self) -> None:
        """Note that the engine delivered an event."""
        self.last_progress_s = trio.current_time()

    def count_http_error(self, status: int) -> None:
        """Count an error response by status."""
        self.counters.http_errors[status] = self.counters.http_errors.get(status, 0) + 1


STATE_KEY = "nurserve"


def get_state() -> ServerState:
    """The ServerState of the current app."""
    return cast(ServerState, current_app.extensions[STATE_KEY])
