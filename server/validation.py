"""Request validation: every mistake becomes a 4xx ApiError naming the field and the rule.

All checks run before a response (streamed or not) is started, so a client never sees a
200 followed by a cut stream for something that was wrong with its request (LightLLM §16.2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NoReturn

from quart import request

from runtime.engine.api import ModelInfo
from runtime.sampling.params import ParamError, SamplingParams, parse_sampling_params

from .errors import ApiError
from .state import Live

GENERATE_KEYS = ("inputs", "parameters", "multimodal_params", "stream")
SCORE_KEYS = ("chat", "parameters", "multimodal_params")
TOKENS_KEYS = ("text", "parameters", "multimodal_params")
MULTIMODAL_KEYS = ("images", "audios")
MAX_CHARS_PER_TOKEN = 8  # text longer than 8 x max_req_total_len characters is refused unread


@dataclass
class GenerateRequest:
    """A validated /generate or /generate_stream request."""

    prompt_ids: list[int]
    params: SamplingParams
    return_details: bool
    stream: bool

    @property
    def n(self) -> int:
        """Number of sequences (n == best_of)."""
        return self.params.n


def bad(message: str, field: str | None, status: int = 400) -> NoReturn:
    """Raise a 4xx ApiError."""
    raise ApiError(status, message, field)


def _reject_nonfinite(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


async def read_json_object(max_body_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object (400/413 otherwise)."""
    length = request.content_length
    if length is not None and length > max_body_bytes:
        bad(f"request body is larger than max_body_bytes ({max_body_bytes} bytes)", "body", 413)
    data = await request.get_data(cache=True, as_text=False)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_body_bytes:
        bad(f"request body is larger than max_body_bytes ({max_body_bytes} bytes)", "body", 413)
    if not raw.strip():
        bad(
            'request body is empty; send a JSON object such as {"inputs": "...", "parameters": {}}',
            "body",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad(f"request body is not UTF-8: {exc}", "body")
    try:
        body = json.loads(text, parse_constant=_reject_nonfinite)
    except json.JSONDecodeError as exc:
        bad(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            "body",
        )
    except (ValueError, RecursionError) as exc:
        bad(f"request body is not valid JSON: {exc}", "body")
    if not isinstance(body, dict):
        bad(f"request body must be a JSON object, got {_kind(body)}", "body")
    return body


def _kind(value: Any) -> str:
    """The JSON type name of a value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def check_keys(body: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse unknown top-level keys (LightLLM silently ignores them, LightLLM §16.5)."""
    for key in body:
        if key not in allowed:
            bad(f"unknown field '{key}'; this route takes {', '.join(allowed)}", key)


def check_multimodal(body: dict[str, Any]) -> None:
    """Accept absent/empty `multimodal_params`; refuse images and audio (text-only models)."""
    mm = body.get("multimodal_params")
    if mm is None:
        return
    if not isinstance(mm, dict):
        bad(f"multimodal_params must be an object, got {_kind(mm)}", "multimodal_params")
    for key, value in mm.items():
        field = f"multimodal_params.{key}"
        if key not in MULTIMODAL_KEYS:
            bad(f"unknown field '{key}' in multimodal_params; expected images, audios", field)
        if value is None:
            continue
        if not isinstance(value, list):
            bad(f"{field} must be a list, got {_kind(value)}", field)
        if value:
            what = "images" if key == "images" else "audio"
            bad(f"this model takes no {what}: {field} must be empty", field)


def parse_params(raw: Any, info: ModelInfo) -> tuple[SamplingParams, bool]:
    """Validate `parameters`; returns the sampling params and the popped `return_details`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        bad(f"parameters must be a JSON object, got {_kind(raw)}", "parameters")
    params_in = dict(raw)
    details = params_in.pop("return_details", False)
    if details is None:
        details = False
    if not isinstance(details, bool):
        bad(
            f"invalid parameter 'return_details': must be a boolean (true/false), got {details!r}",
            "return_details",
        )
    try:
        params = parse_sampling_params(params_in, gen_defaults=info.generation_defaults)
    except ParamError as exc:
        bad(str(exc), exc.field)
    return params, details


def encode_text(live: Live, text: str, field: str, add_special_tokens: bool) -> list[int]:
    """Tokenize text after the cheap length guard (refuses absurd texts before tokenizing)."""
    limit_chars = MAX_CHARS_PER_TOKEN * live.info.max_req_total_len
    if len(text) > limit_chars:
        bad(
            f"{field} has {len(text)} characters, more than {limit_chars} "
            f"({MAX_CHARS_PER_TOKEN} x max_req_total_len {live.info.max_req_total_len})",
            field,
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): not text at all
        bad(f"{field} is not valid Unicode: {exc.reason} at character {exc.start}", field)
    ids: list[int] = live.tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return list(ids)


def prompt_ids_of(live: Live, inputs: Any, add_special_tokens: bool) -> list[int]:
    """Token ids of `inputs` (text or a list of ids in [0, vocab_size))."""
    vocab = live.info.vocab_size
    if isinstance(inputs, str):
        ids = encode_text(live, inputs, "inputs", add_special_tokens)
    elif isinstance(inputs, list):
        for i, tok in enumerate(inputs):
            if isinstance(tok, bool) or not isinstance(tok, int):
                bad(f"inputs[{i}] must be an integer token id, got {tok!r}", "inputs")
            if not 0 <= tok < vocab:
                bad(
                    f"inputs[{i}] = {tok} is outside the vocabulary: token ids must be in "
                    f"[0, {vocab})",
                    "inputs",
                )
        ids = list(inputs)
    elif inputs is None:
        bad("missing required field 'inputs' (a string or a list of token ids)", "inputs")
    else:
        bad(f"inputs must be a string or a list of token ids, got {_kind(inputs)}", "inputs")
    if not ids:
        bad("inputs is empty: the prompt must have at least one token", "inputs")
    return ids


def check_length(prompt_len: int, params: SamplingParams, info: ModelInfo) -> None:
    """Refuse prompt + max_new_tokens over max_req_total_len, with the numbers (LightLLM §5.1)."""
    limit = info.max_req_total_len
    max_new = params.max_new_tokens
    if prompt_len >= limit:
        bad(
            f"the prompt (inputs) has {prompt_len} tokens, which leaves no room to generate under "
            f"max_req_total_len ({limit}); shorten the prompt to at most {limit - 1} tokens",
            "inputs",
        )
    if max_new is not None and prompt_len + max_new > limit:
        bad(
            f"max_new_tokens ({max_new}) + prompt tokens ({prompt_len}) = {prompt_len + max_new} "
            f"exceeds max_req_total_len ({limit}); use max_new_tokens <= {limit - prompt_len}",
            "max_new_tokens",
        )
    if params.min_new_tokens > limit - prompt_len:
        bad(
            f"min_new_tokens ({params.min_new_tokens}) + prompt tokens ({prompt_len}) exceeds "
            f"max_req_total_len ({limit})",
            "min_new_tokens",
        )


def validate_generate(body: dict[str, Any], live: Live) -> GenerateRequest:
    """A /generate, /generate_stream or / body (LightLLM §3), fully validated."""
    if live.info.is_reward_model:
        bad(
            f"'{live.info.model_name}' is a reward model: it scores text with POST /get_score "
            "and cannot generate",
            "inputs",
        )
    check_keys(body, GENERATE_KEYS)
    if "inputs" not in body:
        bad("missing required field 'inputs' (a string or a list of token ids)", "inputs")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        bad(f"stream must be a boolean, got {_kind(stream)}", "stream")
    params, details = parse_params(body.get("parameters"), live.info)
    check_multimodal(body)
    ids = prompt_ids_of(live, body["inputs"], params.add_special_tokens)
    check_length(len(ids), params, live.info)
    return GenerateRequest(ids, params, details, stream)


MAX_SCORE_BATCH = 256


def validate_score(body: dict[str, Any], live: Live) -> tuple[list[list[int]], bool]:
    """A /get_score body: `chat` text, or a list of texts scored as a batch (parameters accepted
    and ignored, as in LightLLM). Returns (prompts, whether `chat` was a list)."""
    check_keys(body, SCORE_KEYS)
    chat = body.get("chat")
    if chat is None:
        bad("missing required field 'chat' (the fully formatted conversation text)", "chat")
    is_list = isinstance(chat, list)
    chats = chat if is_list else [chat]
    if is_list and not 1 <= len(chats) <= MAX_SCORE_BATCH:
        bad(f"chat as a list must hold 1 to {MAX_SCORE_BATCH} strings, got {len(chats)}", "chat")
    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        bad(f"parameters must be a JSON object, got {_kind(params)}", "parameters")
    check_multimodal(body)
    limit = live.info.max_req_total_len
    prompts = []
    for i, text in enumerate(chats):
        name = f"chat[{i}]" if is_list else "chat"
        if not isinstance(text, str):
            bad(f"{name} must be a string, got {_kind(text)}", "chat")
        ids = encode_text(live, text, "chat", True)
        if not ids:
            bad(f"{name} is empty: the prompt must have at least one token", "chat")
        if len(ids) > limit:
            bad(f"{name} has {len(ids)} tokens, more than max_req_total_len ({limit})", "chat")
        prompts.append(ids)
    return prompts, is_list


def validate_tokens(body: dict[str, Any], live: Live) -> list[int]:
    """A /tokens body: `text` plus optional `parameters` (add_special_tokens)."""
    check_keys(body, TOKENS_KEYS)
    text = body.get("text")
    if text is None:
        bad("missing required field 'text'", "text")
    if not isinstance(text, str):
        bad(f"text must be a string, got {_kind(text)}", "text")
    params, _ = parse_params(body.get("parameters"), live.info)
    check_multimodal(body)
    return encode_text(live, text, "text", params.add_special_tokens)
