"""The contract between the engine (runtime/engine/core.py) and the HTTP layer (server/).

Plain dataclasses only: no torch, no trio, so both sides and their tests can import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort", "error"]


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one sequence (sequence `seq_index` of a request with n sequences)."""

    seq_index: int
    token_id: int
    text: str  # newly releasable text (may be "" while a partial UTF-8 char is held back)
    logprob: float  # log p(token) after penalties and temperature, before top-k/top-p
    special: bool
    count_output_tokens: int  # tokens generated so far by this sequence, this one included
    prompt_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (cache_n)
    queue_s: float = 0.0  # submission to the step that first scheduled this sequence


@dataclass(frozen=True)
class ScoreEvent:
    """The result of a score (reward model) request: prefill only."""

    score: float
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


@dataclass
class Hold:
    """A request's switch, set by its consumer: while `held`, its sequences sit out of the decode
    batch with their KV kept (the client is not reading what they make). The scheduler reads it
    each step; the engine's `set_held` flips it and wakes the loop."""

    held: bool = False


@dataclass(frozen=True)
class ErrorEvent:
    """The engine failed while this request was in flight; the request is over."""

    message: str


@dataclass(frozen=True)
class LoadFigures:
    """`/token_load` figures as fractions of KV capacity (LightLLM §10), fresh each step."""

    current_load: float
    logical_max_load: float
    dynamic_max_load: float
    running_reqs: int = 0
    waiting_reqs: int = 0
    cached_tokens: int = 0  # KV slots the prefix cache owns (held by requests or not)
    prefix_queried_tokens: int = 0  # counter: tokens of admitted sequences looked up in the cache
    prefix_hit_tokens: int = 0  # counter: of those, found there (prefill skipped)


@dataclass
class ModelInfo:
    """What the server needs to know about the loaded model."""

    model_name: str
    vocab_size: int
    max_req_total_len: int
    eos_ids: list[int] = field(default_factory=list)
    is_reward_model: bool = False
    generation_defaults: dict[str, object] = field(default_factory=dict)


class QueueFull(Exception):
    """The bounded waiting queue is full: answer 503 with Retry-After."""

    def __init__(self, waiting: int, retry_after_s: float = 1.0) -> None:
        super().__init__(f"server busy: {waiting} requests waiting")
        self.waiting = waiting
        self.retry_after_s = retry_after_s


class EngineDead(Exception):
    """The engine loop failed; no request can be served."""
