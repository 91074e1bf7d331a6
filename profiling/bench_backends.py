"""bench_serving's backends: SSE parsing and one streamed request per server API.

`request_nurserve` (LightLLM native `/generate_stream`) and `request_openai` (`/v1/completions`)
build their payloads and read their events; `_stream` is the part they share (open the stream,
check the status, drain every `data:` event, time the token-bearing ones, set E2EL) and
`_finish` the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_metrics import RequestResult  # noqa: E402  (profiling/ is not a package)


def _sse_data(line: str) -> str | None:
    """The payload of an SSE `data:` line (with or without the space), else None."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


def _event(data: str, res: RequestResult) -> dict[str, Any] | None:
    """The JSON object of one event; None (and `res.error` set) for an error or a bad event."""
    try:
        ev = json.loads(data)
    except ValueError:
        ev = None
    if not isinstance(ev, dict):
        res.error = f"bad event in the stream: {data[:200]!r}"
        return None
    if "error" in ev:
        res.error = f"stream error: {json.dumps(ev['error'])[:300]}"
        return None
    return ev


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    res: RequestResult,
    handle: Callable[[str, Callable[[], None]], None],
) -> bool:
    """POST `payload` and pass every SSE `data:` payload to `handle(data, token)`; `handle`
    calls `token()` when the event carries output (counted, and timed for TTFT/ITL).

    Returns True when the stream ended without an error, with E2EL set. After an error the rest
    of the stream is drained unread."""
    last = now = 0.0
    st = time.perf_counter()

    def token() -> None:
        nonlocal last
        res.chunks += 1
        if res.ttft is None:
            res.ttft = now - st
        else:
            res.itl.append(now - last)
        last = now

    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            res.error = f"HTTP {resp.status_code}: {body[:300]}"
            return False
        async for line in resp.aiter_lines():
            data = _sse_data(line)
            if not data or res.error:  # after an error: drain (leaving early leaks the generator)
                continue
            now = time.perf_counter()
            handle(data, token)
    if res.error:
        return False
    res.e2el = time.perf_counter() - st
    return True


def _finish(
    res: RequestResult, server_count: int | None, ended: bool, no_end: str, no_token: str
) -> None:
    """Output tokens (the server's count, else the chunks) and the verdict of a clean stream."""
    res.tokens_from_server = server_count is not None
    res.output_tokens = server_count if server_count is not None else res.chunks
    if not ended:
        res.error = no_end
    elif res.ttft is None:
        res.error = no_token
    else:
        res.ok = True


async def request_nurserve(
    client: httpx.AsyncClient, url: str, prompt: str, args: argparse.Namespace, res: RequestResult
) -> None:
    """LightLLM native `POST /generate_stream`: one `data:{json}` event per token."""
    params: dict[str, Any] = {"max_new_tokens": args.output_len, "ignore_eos": args.ignore_eos}
    if args.temperature > 0:
        params.update(do_sample=True, temperature=args.temperature)
    else:
        params["do_sample"] = False
    payload = {"inputs": prompt, "parameters": params}
    finished = False
    count: int | None = None

    def handle(data: str, token: Callable[[], None]) -> None:
        nonlocal finished, count
        ev = _event(data, res)
        if ev is None:
            return
        tok = ev.get("token")
        if tok is not None:
            token()
            if tok.get("count_output_tokens") is not None:
                count = int(tok["count_output_tokens"])
            if tok.get("prompt_tokens") is not None:
                res.prompt_tokens = int(tok["prompt_tokens"])
        if ev.get("finished"):
            finished = True
            res.finish_reason = ev.get("finish_reason")

    if await _stream(client, url, payload, res, handle):
        _finish(
            res, count, finished, "stream ended without a finished event", "no token in the stream"
        )


async def request_openai(
    client: httpx.AsyncClient, url: str, prompt: str, args: argparse.Namespace, res: RequestResult
) -> None:
    """OpenAI `POST /v1/completions` streaming, as in the peer figures' client."""
    payload: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": args.output_len,
        "temperature": args.temperature,
        "stream": True,
        "ignore_eos": args.ignore_eos,
        "cache_prompt": False,
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
            if choices[0].get("text"):
                token()
            if choices[0].get("finish_reason"):
                res.finish_reason = choices[0]["finish_reason"]
        usage = ev.get("usage")
        if usage:
            if usage.get("completion_tokens") is not None:
                usage_out = int(usage["completion_tokens"])
            if usage.get("prompt_tokens") is not None:
                res.prompt_tokens = int(usage["prompt_tokens"])
        timings = ev.get("timings")  # llama.cpp
        if timings and usage_out is None and timings.get("predicted_n") is not None:
            usage_out = int(timings["predicted_n"])
            if res.prompt_tokens is None and timings.get("prompt_n") is not None:
                res.prompt_tokens = int(timings["prompt_n"])

    if await _stream(client, url, payload, res, handle):
        _finish(
            res,
            usage_out,
            done or bool(res.finish_reason),
            "stream ended without [DONE] or a finish_reason",
            "no text in the stream",
        )


RequestFn = Callable[
    [httpx.AsyncClient, str, str, argparse.Namespace, RequestResult], Awaitable[None]
]

# backend name -> (default path, request function)
BACKENDS: dict[str, tuple[str, RequestFn]] = {
    "nurserve": ("/generate_stream", request_nurserve),
    "openai": ("/v1/completions", request_openai),
}


__all__ = ["BACKENDS", "request_nurserve", "request_openai"]
