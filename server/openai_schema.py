"""Validation of OpenAI `/v1/completions` and `/v1/chat/completions` bodies.

Each body becomes an `OpenAIRequest`: prompt ids (chat messages rendered through the model's
chat template), LightLLM sampling params (`runtime.sampling.params`), and what the answer must
carry (stream, usage, logprobs). Mistakes are 4xx `ApiError`s whose `field` is the OpenAI name
(`max_tokens`, not `max_new_tokens`); unknown names are refused, never ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from runtime.sampling.params import ParamError, SamplingParams, parse_sampling_params

from .errors import ApiError
from .state import Live
from .validation import check_length, encode_text, prompt_ids_of

COMMON_KEYS = (
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "user",
    "logit_bias",
    # extras of vLLM / llama.cpp
    "top_k",
    "min_tokens",
    "repetition_penalty",
    "ignore_eos",
)
CHAT_KEYS = (
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    *COMMON_KEYS,
)
COMPLETION_KEYS = ("prompt", "logprobs", "echo", "suffix", "best_of", *COMMON_KEYS)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions
# LightLLM parameter name -> OpenAI name, for error messages
RENAMED = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "stop_sequences": "stop",
    "best_of": "n",
}


@dataclass
class OpenAIRequest:
    """A validated OpenAI request."""

    kind: Literal["chat", "completion"]
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)


def bad(message: str, param: str | None, status: int = 400, code: str | None = None) -> NoReturn:
    """Raise a 4xx ApiError naming the OpenAI parameter."""
    raise ApiError(status, message, param, code=code)


def _check_keys(body: dict[str, Any], allowed: tuple[str, ...], route: str) -> None:
    for key in body:
        if key not in allowed:
            bad(f"unknown parameter '{key}' for {route}; supported: {', '.join(allowed)}", key)


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        bad(f"'{name}' must be a boolean, got {value!r}", name)
    return value


def _int_in(body: dict[str, Any], name: str, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        bad(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}", name)
    if value > 1:
        bad(
            f"'{name}' = {value} is not supported: the engine reports only the sampled token's "
            "logprob, so at most 1 alternative (the sampled token) can be returned",
            name,
        )
    return value


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        bad("'stream_options' is only allowed with stream=true", "stream_options")
    if not isinstance(opts, dict) or any(k != "include_usage" for k in opts):
        bad("'stream_options' must be an object with only 'include_usage'", "stream_options")
    return _flag(opts, "include_usage")


def _unsupported(body: dict[str, Any]) -> None:
    """Features we do not implement: a 400 that says so, never silently ignored."""
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        kind = fmt.get("type") if isinstance(fmt, dict) else fmt
        bad(
            f"response_format type {kind!r} is not supported: this server generates plain "
            "text only (response_format {'type': 'text'})",
            "response_format",
        )
    for name in ("tools", "logit_bias"):
        if body.get(name):
            bad(f"'{name}' is not supported by this server", name)
    if body.get("tool_choice") not in (None, "none"):
        bad("'tool_choice' is not supported by this server (no tools)", "tool_choice")
    if body.get("echo"):
        bad("'echo' is not supported by this server", "echo")
    if body.get("suffix"):
        bad("'suffix' is not supported by this server", "suffix")


def _sampling(body: dict[str, Any], live: Live, max_name: str, default_max: int | None) -> Any:
    """LightLLM `parameters` from the OpenAI fields, parsed (ParamErrors renamed)."""
    params: dict[str, Any] = {}
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            bad(f"'temperature' must be a number, got {temperature!r}", "temperature")
        if not 0 <= temperature <= 2:
            bad(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    if temperature == 0:
        params["do_sample"] = False
    else:
        params["do_sample"] = True
        if temperature is not None:
            params["temperature"] = temperature
    max_tokens = body.get(max_name)
    if max_name != "max_tokens" and max_tokens is None:
        max_name, max_tokens = "max_tokens", body.get("max_tokens")
    params["max_new_tokens"] = max_tokens if max_tokens is not None else default_max
    if body.get("min_tokens"):
        params["min_new_tokens"] = body["min_tokens"]
    same = ("top_p", "n", "best_of", "presence_penalty", "frequency_penalty", "seed")
    for name in (*same, "top_k", "repetition_penalty", "ignore_eos", "stop"):
        if body.get(name) is not None:
            params[name] = body[name]
    try:
        return parse_sampling_params(params, gen_defaults=live.info.generation_defaults)
    except ParamError as exc:
        name = max_name if exc.field == "max_new_tokens" else RENAMED.get(exc.field, exc.field)
        bad(f"invalid parameter '{name}': {exc.message.replace(exc.field, name)}", name)


def _common(body: dict[str, Any], live: Live, kind: Literal["chat", "completion"]) -> OpenAIRequest:
    model = body.get("model")
    if model is not None and model != live.info.model_name:
        bad(
            f"the model '{model}' does not exist; this server serves '{live.info.model_name}'",
            "model",
            404,
            "model_not_found",
        )
    _unsupported(body)
    stream = _flag(body, "stream")
    include_usage = _include_usage(body, stream)
    max_name = "max_completion_tokens" if kind == "chat" else "max_tokens"
    default_max = None if kind == "chat" else COMPLETION_DEFAULT_MAX_TOKENS
    params = _sampling(body, live, max_name, default_max)
    return OpenAIRequest(
        kind, live.info.model_name, [], params, stream, include_usage, stop=params.stop_strings
    )


def _check_room(req: OpenAIRequest, live: Live, prompt_name: str, max_name: str) -> None:
    """prompt + max tokens under max_req_total_len, with OpenAI's names."""
    try:
        check_length(len(req.prompt_ids), req.params, live.info)
    except ApiError as exc:
        name = {"inputs": prompt_name, "max_new_tokens": max_name}.get(exc.field or "", exc.field)
        message = exc.message.replace("max_new_tokens", max_name).replace("(inputs)", "")
        bad(message, name)


def parse_completion(body: dict[str, Any], live: Live) -> OpenAIRequest:
    """A `/v1/completions` body."""
    _check_keys(body, COMPLETION_KEYS, "/v1/completions")
    req = _common(body, live, "completion")
    req.logprobs = body.get("logprobs") is not None
    req.top_logprobs = _int_in(body, "logprobs", 0, 5)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            bad(
                f"'prompt' holds {len(prompt)} prompts; batched prompts are not supported, "
                "send one prompt per request",
                "prompt",
            )
        prompt = prompt[0]
    if prompt is None:
        bad("missing required parameter 'prompt'", "prompt")
    try:
        req.prompt_ids = prompt_ids_of(live, prompt, req.params.add_special_tokens)
    except ApiError as exc:
        bad(exc.message.replace("inputs", "prompt"), "prompt")
    _check_room(req, live, "prompt", "max_tokens")
    return req


def _message_text(i: int, msg: Any) -> dict[str, str]:
    """One chat message as {"role", "content"} (content parts of type text are joined)."""
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        bad(f"{where} must be an object with 'role' and 'content'", "messages")
    role = msg.get("role")
    if role not in ROLES:
        bad(f"{where}.role {role!r} is not supported; use system, user or assistant", "messages")
    content = msg.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                bad(f"{where}.content: only text parts are supported", "messages")
            texts.append(str(part.get("text", "")))
        content = "".join(texts)
    if not isinstance(content, str):
        bad(f"{where}.content must be a string or a list of text parts", "messages")
    extra = [k for k in msg if k not in ("role", "content", "name")]
    if extra:
        bad(f"{where}: unsupported field '{extra[0]}'", "messages")
    return {"role": ROLES[role], "content": content}


def parse_chat(body: dict[str, Any], live: Live) -> OpenAIRequest:
    """A `/v1/chat/completions` body; messages go through the model's chat template."""
    _check_keys(body, CHAT_KEYS, "/v1/chat/completions")
    req = _common(body, live, "chat")
    req.logprobs = _flag(body, "logprobs")
    req.top_logprobs = _int_in(body, "top_logprobs", 0, 20)
    if req.top_logprobs and not req.logprobs:
        bad("'top_logprobs' needs logprobs=true", "top_logprobs")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        bad("'messages' must be a non-empty list of {role, content} objects", "messages")
    turns = [_message_text(i, m) for i, m in enumerate(messages)]
    tokenizer: Any = live.tokenizer
    if getattr(tokenizer, "chat_template", None) is None:
        bad(
            f"the model '{live.info.model_name}' has no chat template, so it cannot take chat "
            "messages; use /v1/completions with a formatted prompt",
            "messages",
        )
    try:
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True)
    except Exception as exc:  # the template's own raise_exception (e.g. role order)
        bad(f"the chat template refused these messages: {exc}", "messages")
    req.prompt_ids = encode_text(live, text, "messages", add_special_tokens=False)
    if not req.prompt_ids:
        bad("the rendered chat prompt is empty", "messages")
    _check_room(req, live, "messages", "max_completion_tokens")
    return req
