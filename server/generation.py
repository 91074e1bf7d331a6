"""Generation routes: /generate, /generate_stream, POST / and /get_score (LightLLM §3-6, §9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Blueprint, Response, current_app, request

from runtime.engine.api import EngineDead, ErrorEvent, QueueFull, ScoreEvent, TokenEvent
from runtime.sampling.params import SamplingParams

from .errors import SERVER, ApiError, json_response
from .flow import tcp_conn
from .state import Live, ServerState, get_state
from .stream import StreamJob, start_stream, stream_response_body, token_dict
from .tracking import track_request
from .validation import GenerateRequest, read_json_object, validate_generate, validate_score

bp = Blueprint("generation", __name__)


def live_engine(state: ServerState) -> Live:
    """The running engine, or a 503 when it is dead or not started."""
    reason = state.dead_reason()
    if reason is not None:
        raise ApiError(503, reason, None, type_=SERVER)
    live = state.live()
    if live is None:
        raise ApiError(503, "the engine is not running", None, type_=SERVER)
    return live


def accepting_engine(state: ServerState) -> Live:
    """`live_engine` for a new generation: also a 503 + Retry-After (and the connection closed)
    while a SIGTERM drains the in-flight requests, so that a balancer retries elsewhere."""
    live = live_engine(state)
    if state.shutting_down:
        raise ApiError(
            503,
            "server shutting down: finishing in-flight requests, accepting no new ones",
            None,
            type_=SERVER,
            headers={"Retry-After": "1", "Connection": "close"},
        )
    return live


@dataclass
class _Seq:
    """What /generate collects for one of the n sequences."""

    text: list[str] = field(default_factory=list)
    count_output_tokens: int = 0
    finish_reason: str | None = None
    cumlogprob: float = 0.0
    tokens: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Collected:
    """The token events of a finished request, by sequence."""

    events: list[list[TokenEvent]]
    prompt_tokens: int
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache


async def run_request(
    state: ServerState, live: Live, prompt_ids: list[int], params: SamplingParams
) -> Collected:
    """Run a request to completion; cancelled (client gone) = aborted in the engine.

    QueueFull / EngineDead propagate (server.errors answers them)."""
    n = params.n
    out = Collected([[] for _ in range(n)], len(prompt_ids))
    finished = 0
    async with live.engine.generate(prompt_ids, params) as events:
        async with track_request(state, len(prompt_ids)) as rec:
            async for ev in events:
                state.progress()
                if isinstance(ev, ErrorEvent):
                    rec.outcome = "failure"
                    msg = ev.message
                    msg = msg if msg.startswith("engine") else f"engine failed: {msg}"
                    raise ApiError(503, msg, None, type_=SERVER)
                if not isinstance(ev, TokenEvent):
                    continue
                rec.token(ev.seq_index, ev.queue_s)
                out.events[ev.seq_index].append(ev)
                out.prompt_tokens, out.cached_tokens = ev.prompt_tokens, ev.cached_tokens
                if ev.finished:
                    finished += 1
                    if finished >= n:
                        break
            if finished < n:
                rec.outcome = "failure"
                raise ApiError(
                    503, "the engine ended the request before it finished", None, type_=SERVER
                )
            rec.outcome = "success"
    return out


async def _collect(state: ServerState, live: Live, req: GenerateRequest) -> dict[str, Any]:
    """The /generate body of a request run to completion."""
    done = await run_request(state, live, req.prompt_ids, req.params)
    seqs = [_Seq() for _ in range(req.n)]
    for seq, events in zip(seqs, done.events, strict=True):
        for ev in events:
            _add(seq, ev, req.return_details)
    body = _response(seqs, done.prompt_tokens, req)
    body["cached_tokens"] = done.cached_tokens  # llama.cpp's cache_n: prompt tokens reused
    return body


def _add(seq: _Seq, ev: TokenEvent, details: bool) -> None:
    """Fold one token event into its sequence."""
    seq.text.append(ev.text)
    seq.count_output_tokens = ev.count_output_tokens
    if ev.finished:
        seq.finish_reason = ev.finish_reason
    if details:
        seq.cumlogprob += ev.logprob
        tok = token_dict(ev)
        # The running sum (LightLLM reports a running mean under this name, LightLLM §16.11).
        tok["cumlogprob"] = seq.cumlogprob
        tok["mtp_accepted_token_num"] = 0
        seq.tokens.append(
            {
                k: tok[k]
                for k in (
                    "id",
                    "text",
                    "logprob",
                    "cumlogprob",
                    "special",
                    "count_output_tokens",
                    "prompt_tokens",
                    "mtp_accepted_token_num",
                )
            }
        )


def _response(seqs: list[_Seq], prompt_tokens: int, req: GenerateRequest) -> dict[str, Any]:
    """The /generate body: scalars for n == 1, lists for n > 1 (LightLLM §5)."""
    single = req.n == 1
    counts = [s.count_output_tokens for s in seqs]
    reasons = [s.finish_reason for s in seqs]
    out: dict[str, Any] = {
        "generated_text": ["".join(s.text) for s in seqs],
        "count_output_tokens": counts[0] if single else counts,
        "finish_reason": reasons[0] if single else reasons,
        "prompt_tokens": prompt_tokens,
    }
    if req.return_details:
        out["tokens"] = seqs[0].tokens if single else [s.tokens for s in seqs]
    return out


async def _generate(req: GenerateRequest, state: ServerState, live: Live) -> Response:
    return json_response(await _collect(state, live, req))


async def _generate_stream(req: GenerateRequest, state: ServerState) -> Response:
    """Submit, then answer 200 with a body that only reads the producer's channel."""
    nursery = current_app.nursery  # type: ignore[attr-defined]
    job = await start_stream(state, nursery, req, conn=tcp_conn(request.scope))
    return sse_response(job)


def sse_response(job: StreamJob) -> Response:
    """The 200 text/event-stream response that reads a started job."""
    response = current_app.response_class(
        stream_response_body(job),
        status=200,
        content_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )
    response.timeout = None
    return response


async def _validated() -> tuple[GenerateRequest, ServerState, Live]:
    state = get_state()
    live = accepting_engine(state)
    body = await read_json_object(state.settings.max_body_bytes)
    return validate_generate(body, live), state, live


@bp.post("/generate")
async def generate() -> Response:
    """Non-streaming generation."""
    req, state, live = await _validated()
    return await _generate(req, state, live)


@bp.post("/generate_stream")
async def generate_stream() -> Response:
    """SSE generation; n > 1 adds an `index` field to each event (our extension)."""
    req, state, _ = await _validated()
    return await _generate_stream(req, state)


@bp.post("/")
async def root() -> Response:
    """LightLLM's `POST /`: dispatch on the body's `stream` flag."""
    req, state, live = await _validated()
    if req.stream:
        return await _generate_stream(req, state)
    return await _generate(req, state, live)


@bp.post("/get_score")
async def get_score() -> Response:
    """Reward-model score of a formatted chat (prefill only)."""
    state = get_state()
    live = accepting_engine(state)
    body = await read_json_object(state.settings.max_body_bytes)
    if not live.info.is_reward_model:
        raise ApiError(
            400,
            f"/get_score needs a reward model; '{live.info.model_name}' is a causal LM "
            "(start the server with a reward model's --model_dir)",
            None,
        )
    prompts, is_list = validate_score(body, live)
    results: list[ScoreEvent | None] = [None] * len(prompts)
    refused: list[QueueFull | EngineDead] = []

    async def score_one(i: int, scope: trio.CancelScope) -> None:
        try:
            results[i] = await live.engine.score(prompts[i])
        except (QueueFull, EngineDead) as exc:
            refused.append(exc)
            scope.cancel()  # the others are aborted: the request fails as a whole

    async with track_request(state, sum(len(ids) for ids in prompts)) as rec:
        async with trio.open_nursery() as nursery:  # a list is scored in the same batch
            for i in range(len(prompts)):
                nursery.start_soon(score_one, i, nursery.cancel_scope)
        if refused:
            raise refused[0]  # answered by server.errors
        state.progress()
        rec.outcome = "success"
    out = [
        {"score": r.score, "prompt_tokens": r.prompt_tokens, "finish_reason": "stop"}
        for r in results
        if r is not None
    ]
    return json_response(out if is_list else out[0])
