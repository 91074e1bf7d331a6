"""One JSON error envelope for every failure: `{"message", "field", "type"}`, or OpenAI's
`{"error": {"message", "type", "param", "code"}}` under `/v1/`.

`message` is the key LightLLM clients read; 4xx are the client's mistakes (type
`invalid_request_error`), 503 is overload or a dead engine, 500 is our bug (logged with its
traceback). Quart's HTML error pages (404, 405, 413, 400) are replaced by this envelope. The
engine's refusals (`QueueFull`, `EngineDead`) are mapped here and nowhere else: routes let them
propagate (streams raise them before their 200 starts).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from quart import Quart, Response, request
from werkzeug.exceptions import HTTPException

from runtime.engine.api import EngineDead, QueueFull

from .state import get_state

log = logging.getLogger("nurserve.server")

INVALID = "invalid_request_error"
SERVER = "server_error"
BUSY = "server_busy"


class ApiError(Exception):
    """An error answered as JSON; `field` names the offending part of the request."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        *,
        type_: str | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.message = message
        self.field = field
        self.type = type_ or (INVALID if status < 500 else SERVER)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON envelope."""
        return {"message": self.message, "field": self.field, "type": self.type}

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's envelope (what the `openai` client parses into its exceptions)."""
        code = self.code
        if code is None and self.status == 404 and self.field == "path":
            code = "unknown_url"
        return {
            "error": {"message": self.message, "type": self.type, "param": self.field, "code": code}
        }


def busy_error(exc: QueueFull) -> ApiError:
    """503 + Retry-After for a full waiting queue (LightLLM never rejects, LightLLM §16.3)."""
    retry_s = max(1, math.ceil(exc.retry_after_s))
    return ApiError(
        503,
        f"server busy: {exc.waiting} requests already waiting (max_waiting_reqs); retry after "
        f"{retry_s} s",
        None,
        type_=BUSY,
        headers={"Retry-After": str(retry_s)},
    )


def dead_error(exc: BaseException) -> ApiError:
    """503 for a request refused because the engine died."""
    return ApiError(503, f"engine failed: {exc}", None, type_=SERVER)


def dumps(obj: Any) -> str:
    """Serialise like LightLLM (`json.dumps(..., ensure_ascii=False)`), never emitting NaN."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), ensure_ascii=False, allow_nan=False)


def _finite(obj: Any) -> Any:
    """Replace non-finite floats by None (valid JSON for every client)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response with keys in insertion order (Quart's jsonify sorts them)."""
    return Response(dumps(obj), status=status, headers=headers, content_type="application/json")


def error_response(error: ApiError) -> Response:
    """The JSON response of an ApiError (and the counters it moves)."""
    state = get_state()
    state.count_http_error(error.status)
    if error.status < 500:
        state.counters.request_invalid += 1
    headers = dict(error.headers)
    if error.status == 413 or _body_unread():
        # The rest of the body will never be read: the connection cannot carry another request.
        headers["Connection"] = "close"
    body = error.openai_body() if is_openai_path() else error.body()
    return json_response(body, error.status, headers)


def is_openai_path() -> bool:
    """True for the OpenAI-compatible routes (their errors use OpenAI's envelope)."""
    return request.path.startswith("/v1/") or request.path == "/v1"


def _body_unread() -> bool:
    """True when the request body has not fully arrived (answered before it was read)."""
    complete = getattr(getattr(request, "body", None), "_complete", None)
    return complete is not None and not complete.is_set()


def _http_message(error: HTTPException) -> tuple[str, str | None]:
    """A message naming the rule for Quart/Werkzeug's own errors."""
    code = error.code or 500
    if code == 404:
        return f"no route {request.method} {request.path}", "path"
    if code == 405:
        allowed = ", ".join(sorted(getattr(error, "valid_methods", None) or []))
        return f"method {request.method} is not allowed on {request.path}; use {allowed}", "method"
    if code == 413:
        limit = get_state().settings.max_body_bytes
        return f"request body is larger than max_body_bytes ({limit} bytes)", "body"
    if code == 408:
        return "the request body did not arrive in time", "body"
    return f"{error.name}: {error.description}", None


def register_error_handlers(app: Quart) -> None:
    """Install the JSON handlers for ApiError, HTTP errors and unexpected exceptions."""

    @app.errorhandler(ApiError)
    async def _api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(QueueFull)
    async def _queue_full(error: QueueFull) -> Response:
        get_state().counters.request_rejected_busy += 1
        return error_response(busy_error(error))

    @app.errorhandler(EngineDead)
    async def _engine_dead(error: EngineDead) -> Response:
        return error_response(dead_error(error))

    @app.errorhandler(HTTPException)
    async def _http_error(error: HTTPException) -> Response:
        code = error.code or 500
        message, field = _http_message(error)
        headers: dict[str, str] = {}
        if code == 405:
            valid = getattr(error, "valid_methods", None)
            if valid:
                headers["Allow"] = ", ".join(sorted(valid))
        return error_response(ApiError(code, message, field, headers=headers))

    @app.errorhandler(Exception)
    async def _unexpected(error: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=error)
        return error_response(
            ApiError(500, f"internal server error: {type(error).__name__}: {error}", None)
        )
