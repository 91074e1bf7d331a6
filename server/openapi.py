"""`GET /openapi.json`: an OpenAPI 3.1 document of every route and its request schema.

Paths come from the app's URL map (so no route is forgotten); request bodies from `BODIES`,
which mirror the validators (server/validation.py, server/openai_schema.py). Unknown fields
are refused by the server, hence `additionalProperties: false`.
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response, current_app

from .errors import json_response
from .openai_schema import CHAT_KEYS, COMPLETION_KEYS

bp = Blueprint("openapi", __name__)

NUM = {"type": "number"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
STR = {"type": "string"}
STOP = {"oneOf": [STR, {"type": "array", "items": STR, "maxItems": 16}]}
LIGHTLLM_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "do_sample": BOOL,
        "temperature": {"type": "number", "exclusiveMinimum": 0},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "top_k": INT,
        "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
        "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
        "input_penalty": BOOL,
        "max_new_tokens": {"type": "integer", "minimum": 1},
        "min_new_tokens": {"type": "integer", "minimum": 1},
        "ignore_eos": BOOL,
        "stop_sequences": STOP,
        "best_of": {"type": "integer", "minimum": 1, "maximum": 8},
        "n": {"type": "integer", "minimum": 1, "maximum": 8},
        "seed": INT,
        "skip_special_tokens": BOOL,
        "add_special_tokens": BOOL,
        "print_eos_token": BOOL,
        "return_details": BOOL,
    },
}
INPUTS = {"oneOf": [STR, {"type": "array", "items": {"type": "integer", "minimum": 0}}]}
MULTIMODAL = {"type": "object", "properties": {"images": {"type": "array", "maxItems": 0}}}
OPENAI_FIELDS: dict[str, Any] = {
    "model": STR,
    "stream": BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": BOOL}},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 8},
    "best_of": {"type": "integer", "minimum": 1, "maximum": 8},
    "stop": STOP,
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": INT,
    "user": STR,
    "logit_bias": {"type": "object", "maxProperties": 0},
    "top_k": INT,
    "min_tokens": {"type": "integer", "minimum": 0},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "ignore_eos": BOOL,
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 1},
    "response_format": {"type": "object", "properties": {"type": {"const": "text"}}},
    "tools": {"type": "array", "maxItems": 0},
    "tool_choice": {"const": "none"},
    "echo": {"const": False},
    "suffix": {"type": "null"},
    "prompt": {"oneOf": [STR, INPUTS["oneOf"][1], {"type": "array", "maxItems": 1}]},
    "messages": {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "role": {"enum": ["system", "developer", "user", "assistant"]},
                "content": {"oneOf": [STR, {"type": "array"}]},
                "name": STR,
            },
        },
    },
}


def _object(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def _openai(keys: tuple[str, ...], required: str, logprobs: dict[str, Any]) -> dict[str, Any]:
    props = {k: OPENAI_FIELDS[k] for k in keys if k in OPENAI_FIELDS}
    return _object({**props, "logprobs": logprobs}, [required])


GENERATE = _object(
    {"inputs": INPUTS, "parameters": LIGHTLLM_PARAMS, "multimodal_params": MULTIMODAL},
    ["inputs"],
)
BODIES: dict[str, dict[str, Any]] = {
    "/generate": GENERATE,
    "/generate_stream": GENERATE,
    "/": _object({**GENERATE["properties"], "stream": BOOL}, ["inputs"]),
    "/get_score": _object(
        {"chat": {"oneOf": [STR, {"type": "array", "items": STR}]}, "parameters": {}}, ["chat"]
    ),
    "/tokens": _object({"text": STR, "parameters": LIGHTLLM_PARAMS}, ["text"]),
    "/v1/completions": _openai(COMPLETION_KEYS, "prompt", {"type": "integer", "minimum": 0}),
    "/v1/chat/completions": _openai(CHAT_KEYS, "messages", BOOL),
}
ERROR = {"description": "error", "content": {"application/json": {"schema": {"type": "object"}}}}


def _operation(path: str, method: str, endpoint: str) -> dict[str, Any]:
    view = current_app.view_functions.get(endpoint)
    doc = (getattr(view, "__doc__", None) or "").strip().splitlines()
    op: dict[str, Any] = {
        "operationId": f"{method}_{endpoint.replace('.', '_')}",
        "summary": doc[0] if doc else path,
        "responses": {"200": {"description": "success"}, "4XX": ERROR, "503": ERROR},
    }
    body = BODIES.get(path)
    if body is not None and method in ("post", "put"):
        op["requestBody"] = {
            "required": path != "/tokens",
            "content": {"application/json": {"schema": body}},
        }
    return op


def openapi_document() -> dict[str, Any]:
    """The document for the current app."""
    paths: dict[str, dict[str, Any]] = {}
    for rule in current_app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        methods = sorted(m.lower() for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS"))
        for method in methods:
            paths.setdefault(rule.rule, {})[method] = _operation(rule.rule, method, rule.endpoint)
    return {
        "openapi": "3.1.0",
        "info": {"title": "nurserve", "version": "0.1.0"},
        "paths": dict(sorted(paths.items())),
    }


@bp.get("/openapi.json")
async def openapi_json() -> Response:
    """This document."""
    return json_response(openapi_document())
