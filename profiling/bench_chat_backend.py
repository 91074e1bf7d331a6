"""bench_serving's `openai-chat` backend: streamed OpenAI `POST /v1/chat/completions`.

The prompt is sent as one user message; TTFT/ITL are timed on the chunks that carry content
(the role-only first chunk is not a token), output tokens come from the usage chunk
(`stream_options.include_usage`), the stream must end with `data: [DONE]`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import httpx
from bench_backends import _event, _finish, _stream  # noqa: E402  (profiling/ is not a package)
from bench_metrics import RequestResult  # noqa: E402


async def request_openai_chat(
    client: httpx.AsyncClient, url: str, prompt: str, args: argparse.Namespace, res: RequestResult
) -> None:
    """OpenAI chat streaming: one chunk per token, usage last, then [DONE]."""
    payload: dict[str, Any] = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "stream": True,
        "ignore_eos": args.ignore_eos,
        "stream_options": {"include_usage": True},
    }
    if args.model:
        payload["model"] = args.model
    done = False
    usage_out: int | None = None

    def handle(data: str, token: Callable[[], None]) -> None:
        nonlocal done, usage_out
        if data == "[DONE]":
            done = True
            return
        ev = _event(data, res)
        if ev is None:
            return
        choices = ev.get("choices") or []
        if choices:
            if (choices[0].get("delta") or {}).get("content"):
                token()
            if choices[0].get("finish_reason"):
                res.finish_reason = choices[0]["finish_reason"]
        usage = ev.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                usage_out = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                res.prompt_tokens = int(usage["prompt_tokens"])

    if await _stream(client, url, payload, res, handle):
        _finish(
            res,
            usage_out,
            done or bool(res.finish_reason),
            "stream ended without [DONE] or a finish_reason",
            "no content in the stream",
        )
