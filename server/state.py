"""Per-process server state: the engine handle, liveness, stall detection and counters."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import trio
from quart import current_app

from runtime.engine.api import LoadFigures, ModelInfo, ScoreEvent

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
        self, prompt_ids: list[int], params: Any
    ) -> AbstractAsyncContextManager[trio.MemoryReceiveChannel[Any]]: ...

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


def metrics_text(state: ServerState, load: LoadFigures | None, model_name: str) -> str:
    """The /metrics body in Prometheus text format 0.0.4 (LightLLM's metric names)."""
    c = state.counters
    rows: list[tuple[str, str, str, Sequence[tuple[str, float]]]] = [
        (
            "lightllm_request_count",
            "counter",
            "generation requests accepted",
            [("", c.request_count)],
        ),
        (
            "lightllm_request_success",
            "counter",
            "generation requests completed",
            [("", c.request_success)],
        ),
        (
            "lightllm_request_failure",
            "counter",
            "generation requests that failed after acceptance (engine error, client gone)",
            [("", c.request_failure)],
        ),
        (
            "nurserve_request_invalid",
            "counter",
            "requests refused with a 4xx",
            [("", c.request_invalid)],
        ),
        (
            "nurserve_request_rejected_busy",
            "counter",
            "requests refused with 503 (queue full)",
            [("", c.request_rejected_busy)],
        ),
        (
            "nurserve_request_aborted",
            "counter",
            "requests aborted because the client left",
            [("", c.request_aborted)],
        ),
        (
            "nurserve_prompt_tokens_total",
            "counter",
            "prompt tokens of accepted requests",
            [("", c.prompt_tokens)],
        ),
        (
            "nurserve_generated_tokens_total",
            "counter",
            "tokens generated",
            [("", c.generated_tokens)],
        ),
        (
            "nurserve_http_errors_total",
            "counter",
            "error responses by status",
            [(f'{{status="{s}"}}', n) for s, n in sorted(c.http_errors.items())],
        ),
        (
            "nurserve_requests_in_flight",
            "gauge",
            "requests inside the engine (HTTP view)",
            [("", state.in_flight)],
        ),
        (
            "nurserve_engine_up",
            "gauge",
            "1 when the engine can serve",
            [("", 0.0 if state.health_problem() else 1.0)],
        ),
    ]
    steps = getattr(state.engine, "steps_done", None)
    if isinstance(steps, int):
        rows.append(
            ("nurserve_engine_steps_total", "counter", "engine steps completed", [("", steps)])
        )
    if load is not None:
        rows += [
            ("lightllm_queue_size", "gauge", "requests waiting", [("", load.waiting_reqs)]),
            ("lightllm_batch_current_size", "gauge", "requests running", [("", load.running_reqs)]),
            (
                "nurserve_kv_current_load",
                "gauge",
                "KV slots in use / capacity",
                [("", load.current_load)],
            ),
            (
                "nurserve_kv_dynamic_max_load",
                "gauge",
                "estimated KV peak / capacity",
                [("", load.dynamic_max_load)],
            ),
        ]
    out: list[str] = []
    for name, kind, help_text, samples in rows:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            out.append(f"{name}{labels} {_num(value)}")
    out.append("# HELP nurserve_model_info the loaded model")
    out.append("# TYPE nurserve_model_info gauge")
    out.append(f'nurserve_model_info{{model_name="{_label(model_name)}"}} 1')
    return "\n".join(out) + "\n"


def _num(value: float) -> str:
    """A Prometheus sample value."""
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def _label(text: str) -> str:
    """Escape a Prometheus label value."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
