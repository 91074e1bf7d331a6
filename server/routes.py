"""Cheap routes: health, load, token count, model name, probes and metrics (LightLLM §8, §10-12).

None of these touches an engine lock or runs a generation, so they stay fast under load.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, request

from .errors import ApiError, json_response
from .generation import live_engine
from .metrics import CONTENT_TYPE, render
from .state import ServerState, get_state
from .validation import read_json_object, validate_tokens

bp = Blueprint("routes", __name__)


def _health(state: ServerState) -> Response:
    problem = state.health_problem()
    if problem is None:
        return json_response({"message": "Ok"})
    return json_response({"message": "Error", "reason": problem}, 503)


@bp.route("/health", methods=["GET", "HEAD"])
async def health() -> Response:
    """200 {"message": "Ok"}; 503 {"message": "Error"} when the engine is dead or stalled."""
    return _health(get_state())


@bp.get("/healthz")
async def healthz() -> Response:
    """Same as /health."""
    return _health(get_state())


@bp.route("/liveness", methods=["GET", "POST"])
async def liveness() -> Response:
    """The process can serve: 503 only once the engine is dead."""
    state = get_state()
    reason = state.dead_reason()
    if reason is None:
        return json_response({"status": "ok"})
    return json_response({"status": "error", "message": reason}, 503)


@bp.route("/readiness", methods=["GET", "POST"])
async def readiness() -> Response:
    """Ready for traffic: 503 when dead, stalled or shutting down."""
    state = get_state()
    problem = state.health_problem()
    if problem is None and state.shutting_down:
        problem = "shutting down"
    if problem is None:
        return json_response({"status": "ok"})
    return json_response({"status": "error", "message": problem}, 503)


@bp.get("/token_load")
async def token_load() -> Response:
    """KV load as fractions of capacity (LightLLM §10), fresh each engine step."""
    state = get_state()
    load = live_engine(state).engine.load()
    return json_response(
        {
            "current_load": float(load.current_load),
            "logical_max_load": float(load.logical_max_load),
            "dynamic_max_load": float(load.dynamic_max_load),
        }
    )


@bp.route("/tokens", methods=["GET", "POST"])
async def tokens() -> Response:
    """{"text", "parameters"} -> {"ntokens"} (GET also takes ?text=...)."""
    state = get_state()
    live = live_engine(state)
    body: dict[str, Any]
    if request.method == "GET" and not request.content_length and "text" in request.args:
        extra = [k for k in request.args if k != "text"]
        if extra:
            raise ApiError(
                400, f"unknown query parameter '{extra[0]}'; /tokens takes text", extra[0]
            )
        body = {"text": request.args["text"]}
    else:
        body = await read_json_object(state.settings.max_body_bytes)
    ids = validate_tokens(body, live)
    return json_response({"ntokens": len(ids)})


@bp.route("/get_model_name", methods=["GET", "POST"])
async def get_model_name() -> Response:
    """{"model_name": --model_name}."""
    live = live_engine(get_state())
    return json_response({"model_name": live.info.model_name})


@bp.get("/metrics")
async def metrics() -> Response:
    """Prometheus text (prometheus_client, this app's registry) with its proper Content-Type."""
    return Response(render(get_state().registry), content_type=CONTENT_TYPE)
