"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Same engine, accounting, backpressure and cancellation as the LightLLM routes: a non-streamed
request runs in `generation.run_request` (cancelled with its handler when the client leaves),
a streamed one in `server.stream`'s producer with `OpenAIEncoder` (QueueFull is a 503 before
the 200 starts). Errors use OpenAI's envelope (server.errors, for every `/v1/` path).
"""

from __future__ import annotations

import time

from quart import Blueprint, Response, current_app, request

from .errors import json_response
from .flow import tcp_conn
from .generation import accepting_engine, live_engine, run_request, sse_response
from .openai_schema import OpenAIRequest, parse_chat, parse_completion
from .openai_stream import OpenAIEncoder, response_body
from .state import Live, ServerState, get_state
from .stream import start_stream
from .validation import GenerateRequest, read_json_object

bp = Blueprint("openai", __name__)
STARTED_AT = int(time.time())


@bp.get("/v1/models")
async def models() -> Response:
    """The one served model, in OpenAI's list shape."""
    live = live_engine(get_state())
    card = {
        "id": live.info.model_name,
        "object": "model",
        "created": STARTED_AT,
        "owned_by": "nurserve",
        "max_model_len": live.info.max_req_total_len,
    }
    return json_response({"object": "list", "data": [card]})


async def _serve(state: ServerState, live: Live, req: OpenAIRequest) -> Response:
    """Run a validated request, streamed or not."""
    if req.stream:
        encoder = OpenAIEncoder(req, live.tokenizer)
        job = await start_stream(
            state,
            current_app.nursery,  # type: ignore[attr-defined]
            GenerateRequest(req.prompt_ids, req.params, False, True),
            encoder,
            tcp_conn(request.scope),
        )
        return sse_response(job)
    done = await run_request(state, live, req.prompt_ids, req.params)
    return json_response(response_body(req, done.events, done.prompt_tokens, live.tokenizer))


@bp.post("/v1/completions")
async def completions() -> Response:
    """Text completion of one prompt (text or token ids)."""
    state = get_state()
    live = accepting_engine(state)
    body = await read_json_object(state.settings.max_body_bytes)
    return await _serve(state, live, parse_completion(body, live))


@bp.post("/v1/chat/completions")
async def chat_completions() -> Response:
    """Chat completion: the messages go through the model's chat template."""
    state = get_state()
    live = accepting_engine(state)
    body = await read_json_object(state.settings.max_body_bytes)
    return await _serve(state, live, parse_chat(body, live))
