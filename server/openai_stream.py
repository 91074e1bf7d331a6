"""Engine token events -> OpenAI's wire format (chunks, whole responses, logprobs, usage).

OpenAI leaves a matched stop string out of the text (LightLLM keeps it): `StopTrimmer` holds
back any tail that could still become a stop string and cuts at the first match. The stream
encoder `OpenAIEncoder` plugs into `server.stream`'s producer; streams end with `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from runtime.engine.api import TokenEvent

from .errors import SERVER, dumps
from .openai_schema import OpenAIRequest


class StopTrimmer:
    """Releases the text of one sequence, without the stop string and anything after it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.buf = ""
        self.stopped = False

    def feed(self, text: str, final: bool) -> str:
        """Add `text`; returns what may be sent now."""
        if self.stopped:
            return ""
        self.buf += text
        cuts = [i for i in (self.buf.find(s) for s in self.stops) if i >= 0]
        if cuts:
            out, self.buf, self.stopped = self.buf[: min(cuts)], "", True
            return out
        hold = 0 if final else self._held()
        out, self.buf = self.buf[: len(self.buf) - hold], self.buf[len(self.buf) - hold :]
        return out

    def _held(self) -> int:
        """Length of the longest tail of the buffer that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.buf)), best, -1):
                if self.buf.endswith(stop[:k]):
                    best = k
                    break
        return best


def finish_reason(ev: TokenEvent) -> str | None:
    """OpenAI's finish_reason of a finished sequence (`length` or `stop`)."""
    if not ev.finished:
        return None
    return "length" if ev.finish_reason == "length" else "stop"


def token_text(tokenizer: Any, ev: TokenEvent) -> str:
    """The text of one token for logprobs (special tokens included)."""
    try:
        return str(tokenizer.decode([ev.token_id], skip_special_tokens=False))
    except Exception:
        return ev.text


class Logprobs:
    """Logprob entries in the shape of the request's route."""

    def __init__(self, req: OpenAIRequest, tokenizer: Any) -> None:
        self.req = req
        self.tokenizer = tokenizer

    def chat(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        """`{"content": [{token, logprob, bytes, top_logprobs}]}` (None when not asked)."""
        if not self.req.logprobs:
            return None
        content = []
        for ev in events:
            tok = token_text(self.tokenizer, ev)
            entry = {"token": tok, "logprob": ev.logprob, "bytes": list(tok.encode("utf-8"))}
            top = [dict(entry)] if self.req.top_logprobs else []
            content.append({**entry, "top_logprobs": top})
        return {"content": content}

    def completion(self, events: list[TokenEvent], offset: int) -> dict[str, Any] | None:
        """`{tokens, token_logprobs, top_logprobs, text_offset}` (None when not asked)."""
        if not self.req.logprobs:
            return None
        tokens = [token_text(self.tokenizer, ev) for ev in events]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        top = None
        if self.req.top_logprobs:
            top = [{tok: ev.logprob} for tok, ev in zip(tokens, events, strict=True)]
        return {
            "tokens": tokens,
            "token_logprobs": [ev.logprob for ev in events],
            "top_logprobs": top,
            "text_offset": offsets,
        }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object (`prompt_tokens_details.cached_tokens`: from the prefix cache)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def envelope(req: OpenAIRequest, chunk: bool) -> dict[str, Any]:
    """id, object, created, model of a response or chunk."""
    if req.kind == "chat":
        rid, obj = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
        obj = obj + ".chunk" if chunk else obj
    else:
        rid, obj = f"cmpl-{uuid.uuid4().hex}", "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model}


def sse(obj: Any) -> bytes:
    """One OpenAI SSE event (`data: {json}`, with the space)."""
    return b"data: " + dumps(obj).encode("utf-8") + b"\n\n"


DONE = b"data: [DONE]\n\n"


class OpenAIEncoder:
    """The stream encoder of `server.stream`: chunks per token, usage, then [DONE]."""

    def __init__(self, req: OpenAIRequest, tokenizer: Any) -> None:
        self.req = req
        self.head = envelope(req, chunk=True)
        self.logprobs = Logprobs(req, tokenizer)
        n = req.params.n
        self.trimmers = [StopTrimmer(req.stop) for _ in range(n)]
        self.pending: list[list[TokenEvent]] = [[] for _ in range(n)]
        self.offsets = [0] * n
        self.counts = [0] * n
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.started = [False] * n

    def token(self, ev: TokenEvent) -> bytes:
        """The chunk of one token (b"" while its text is held back)."""
        i = ev.seq_index
        self.counts[i], self.prompt_tokens = ev.count_output_tokens, ev.prompt_tokens
        self.cached_tokens = ev.cached_tokens
        self.pending[i].append(ev)
        text = self.trimmers[i].feed(ev.text, ev.finished)
        reason = finish_reason(ev)
        if not text and reason is None:
            return b""
        events, self.pending[i] = self.pending[i], []
        if self.req.kind == "completion":
            choice = {
                "index": i,
                "text": text,
                "logprobs": self.logprobs.completion(events, self.offsets[i]),
                "finish_reason": reason,
            }
            self.offsets[i] += len(text)
            return sse({**self.head, "choices": [choice]})
        out = b""
        if not self.started[i]:
            self.started[i] = True
            role = {"index": i, "delta": {"role": "assistant", "content": ""}}
            out = sse({**self.head, "choices": [{**role, "logprobs": None, "finish_reason": None}]})
        delta = {"content": text} if text else {}
        choice = {
            "index": i,
            "delta": delta,
            "logprobs": self.logprobs.chat(events),
            "finish_reason": reason,
        }
        return out + sse({**self.head, "choices": [choice]})

    def error(self, message: str) -> bytes:
        """An error event, then [DONE] (the openai client raises on the error)."""
        err = {"message": message, "type": SERVER, "param": None, "code": None}
        return sse({"error": err}) + DONE

    def done(self) -> bytes:
        """The usage chunk (when asked) and [DONE]."""
        out = b""
        if self.req.include_usage:
            used = usage(self.prompt_tokens, sum(self.counts), self.cached_tokens)
            out = sse({**self.head, "choices": [], "usage": used})
        return out + DONE


def response_body(
    req: OpenAIRequest, events: list[list[TokenEvent]], prompt_tokens: int, tokenizer: Any
) -> dict[str, Any]:
    """The non-streamed response of a finished request."""
    logprobs = Logprobs(req, tokenizer)
    choices = []
    completion_tokens = 0
    cached = max((seq[-1].cached_tokens for seq in events if seq), default=0)
    for i, seq in enumerate(events):
        text = StopTrimmer(req.stop).feed("".join(ev.text for ev in seq), final=True)
        reason = finish_reason(seq[-1]) if seq else "stop"
        completion_tokens += seq[-1].count_output_tokens if seq else 0
        if req.kind == "chat":
            message = {"role": "assistant", "content": text}
            choice = {"index": i, "message": message, "logprobs": logprobs.chat(seq)}
        else:
            choice = {"index": i, "text": text, "logprobs": logprobs.completion(seq, 0)}
        choices.append({**choice, "finish_reason": reason})
    return {
        **envelope(req, chunk=False),
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached),
    }
