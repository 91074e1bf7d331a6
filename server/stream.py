"""Engine events -> LightLLM wire format, and the SSE producer/consumer pair.

A streamed request runs in a producer task in the app's nursery: it enters
`engine.generate(...)` (so a full queue is a 503 before any 200 is sent), then pushes
encoded `data:{json}\\n\\n` events into a memory channel and never blocks. The channel holds
at most `--stream_buffer_events` events: a client that stops reading (its socket buffers full,
the body generator stuck in its write) gets its request aborted there, KV freed, and the
stream ends with an error event, so it never holds engine capacity. Before that, `server.flow`
holds the request out of the decode batch while the client's TCP window says it lags, so a
non-reader costs the other streams nothing. The response body is a plain async generator that only reads that channel (no nursery or cancel
scope around a `yield`); when the client leaves, Quart closes the generator and its
`finally` cancels the producer, whose exit from `engine.generate` aborts the request.

The wire format is an `Encoder`: `LightLLMEncoder` here, the OpenAI chunks in
`server.openai_stream`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from runtime.engine.api import EngineDead, ErrorEvent, Hold, TokenEvent

from .errors import SERVER, dumps
from .flow import TcpConn, Watched
from .state import Live, ServerState
from .tracking import Recorder, track_request
from .validation import GenerateRequest

log = logging.getLogger("nurserve.server")

# A producer whose response body was never iterated (client gone between the handler and the
# first write) aborts its request after this long.
CONSUMER_START_TIMEOUT_S = 5.0


def token_dict(ev: TokenEvent) -> dict[str, Any]:
    """The `token` object of a stream event (LightLLM §6)."""
    return {
        "id": ev.token_id,
        "text": ev.text,
        "logprob": ev.logprob,
        "special": ev.special,
        "count_output_tokens": ev.count_output_tokens,
        "prompt_tokens": ev.prompt_tokens,
    }


def encode_token_event(ev: TokenEvent, with_index: bool) -> bytes:
    """One `data:{json}\\n\\n` SSE event; `index` is added only when n > 1 (our extension)."""
    obj: dict[str, Any] = {
        "token": token_dict(ev),
        "generated_text": None,
        "finished": ev.finished,
        "finish_reason": ev.finish_reason if ev.finished else None,
        "details": None,
    }
    if ev.finished:
        obj["cached_tokens"] = ev.cached_tokens  # prompt tokens whose K/V the cache supplied
    if with_index:
        obj["index"] = ev.seq_index
    return b"data:" + dumps(obj).encode("utf-8") + b"\n\n"


def encode_error_event(message: str, type_: str = SERVER) -> bytes:
    """The SSE event that ends a stream that failed after its 200 was sent."""
    obj = {
        "error": {"message": message, "type": type_},
        "finished": True,
        "finish_reason": "error",
    }
    return b"data:" + dumps(obj).encode("utf-8") + b"\n\n"


class Encoder(Protocol):
    """Turns engine events into SSE bytes (b"" = nothing to send yet)."""

    def token(self, ev: TokenEvent) -> bytes: ...

    def error(self, message: str) -> bytes: ...

    def done(self) -> bytes: ...


class LightLLMEncoder:
    """LightLLM's stream: one `data:{json}` per token, no end marker."""

    def __init__(self, n: int) -> None:
        self.with_index = n > 1

    def token(self, ev: TokenEvent) -> bytes:
        """The token's event."""
        return encode_token_event(ev, self.with_index)

    def error(self, message: str) -> bytes:
        """The error event that ends the stream."""
        return encode_error_event(message)

    def done(self) -> bytes:
        """Nothing: the last token event says `finished`."""
        return b""


@dataclass
class StreamJob:
    """The link between a producer task and its response body."""

    send: trio.MemorySendChannel[bytes]
    receive: trio.MemoryReceiveChannel[bytes]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    consumer_started: bool = False
    limit: float = math.inf  # most events waiting for the client (--stream_buffer_events)
    overflowed: bool = False  # the client stopped reading: the limit was hit
    conn: TcpConn | None = None  # its TCP connection, for pacing by the client's window
    stalled: bool = False  # the client read nothing for --stream_stall_s

    def abort(self) -> None:
        """Stop the producer (synchronous: safe in a generator's `finally`)."""
        self.scope.cancel()
        self.receive.close()


async def start_stream(
    state: ServerState,
    nursery: trio.Nursery,
    req: GenerateRequest,
    encoder: Encoder | None = None,
    conn: TcpConn | None = None,
) -> StreamJob:
    """Submit a streamed request; raises QueueFull/EngineDead before anything is sent."""
    send, receive = trio.open_memory_channel[bytes](math.inf)
    job = StreamJob(send, receive, limit=state.settings.stream_buffer_events, conn=conn)
    await nursery.start(_produce, state, req, job, encoder or LightLLMEncoder(req.n))
    return job


async def _produce(
    state: ServerState,
    req: GenerateRequest,
    job: StreamJob,
    encoder: Encoder,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one request in the engine, pushing encoded events to the job's channel."""
    live = state.live()
    if live is None:
        raise EngineDead("the engine is not running")
    started = False
    try:
        with job.scope:
            hold = Hold()
            async with live.engine.generate(req.prompt_ids, req.params, hold) as events:
                async with track_request(state, len(req.prompt_ids)) as rec:
                    started = True
                    task_status.started()
                    try:
                        rec.outcome = await _paced(live, hold, rec, req, events, job, encoder)
                    except Exception as exc:
                        rec.outcome = "failure"
                        _fail(job, encoder, exc)
    except Exception as exc:
        if not started:
            raise
        _fail(job, encoder, exc)
    finally:
        job.send.close()


async def _paced(
    live: Live,
    hold: Hold,
    rec: Recorder,
    req: GenerateRequest,
    events: trio.MemoryReceiveChannel[Any],
    job: StreamJob,
    encoder: Encoder,
) -> str:
    """`_pump`, with the request held while its client lags in reading (`server.flow`)."""
    state = rec.state
    if job.conn is None or not state.pacer.enabled:
        return await _pump(rec, req, events, job, encoder)

    def set_held(held: bool) -> None:
        state.counters.stream_holds += held
        live.engine.set_held(hold, held)

    with trio.CancelScope() as scope:

        def stalled() -> None:
            job.stalled = True
            scope.cancel()

        entry = Watched(job.conn, set_held, stalled)
        state.pacer.watch(entry)
        try:
            return await _pump(rec, req, events, job, encoder)
        finally:
            state.pacer.unwatch(entry)
    return _gave_up(rec, job, encoder)  # the pacer gave up on the client


def _fail(job: StreamJob, encoder: Encoder, exc: Exception) -> None:
    """Log an unexpected failure and end the stream with an error event."""
    log.exception("streamed request failed", exc_info=exc)
    _push(job, encoder.error(f"internal error: {type(exc).__name__}: {exc}"), force=True)


def _push(job: StreamJob, data: bytes, *, force: bool = False) -> bool:
    """Queue bytes for the client; False when the client is gone or stopped reading."""
    if not data:
        return True
    if not force and job.send.statistics().current_buffer_used >= job.limit:
        job.overflowed = True
        return False
    try:
        job.send.send_nowait(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


async def _pump(
    rec: Recorder,
    req: GenerateRequest,
    events: trio.MemoryReceiveChannel[Any],
    job: StreamJob,
    encoder: Encoder,
) -> str:
    """Forward events until every sequence finished; returns the outcome for the counters."""
    n = req.n
    finished = 0
    give_up_at = trio.current_time() + CONSUMER_START_TIMEOUT_S
    async for ev in events:
        rec.state.progress()
        if isinstance(ev, ErrorEvent):
            _push(job, encoder.error(ev.message), force=True)
            return "failure"
        if not isinstance(ev, TokenEvent):
            continue
        rec.token(ev.seq_index, ev.queue_s)
        if not _push(job, encoder.token(ev)):
            return _gave_up(rec, job, encoder)
        if ev.finished:
            finished += 1
            if finished >= n:
                return "success" if _push(job, encoder.done(), force=True) else "aborted"
        if not job.consumer_started and trio.current_time() > give_up_at:
            log.warning("stream never read by its client; aborting the request")
            return "aborted"
    _push(job, encoder.error("the engine ended the request before it finished"), force=True)
    return "failure"


def _gave_up(rec: Recorder, job: StreamJob, encoder: Encoder) -> str:
    """The client is gone, or stopped reading (then: log, count, end with an error event)."""
    if job.overflowed or job.stalled:
        rec.state.counters.stream_slow_aborts += 1
        why = (
            f"{job.send.statistics().current_buffer_used} events waiting, "
            f"--stream_buffer_events {job.limit}"
            if job.overflowed
            else f"nothing read for --stream_stall_s {rec.state.settings.stream_stall_s:g} s"
        )
        log.warning("stream aborted: its client stopped reading (%s); KV freed", why)
        _push(job, encoder.error("stream aborted: the client stopped reading"), force=True)
    return "aborted"


def stream_response_body(job: StreamJob) -> AsyncGenerator[bytes, None]:
    """The body generator, also aborting the job if it is dropped without ever being iterated.

    A client that disconnects after the handler returned but before the first write leaves a
    generator that never started (so its `finally` never runs); a weakref finalizer then
    aborts the producer through the Trio token (safe from a GC callback).
    """
    body = stream_body(job)
    token = trio.lowlevel.current_trio_token()
    weakref.finalize(body, _abort_soon, token, job)
    return body


def _abort_soon(token: trio.lowlevel.TrioToken, job: StreamJob) -> None:
    """Schedule `job.abort()` on the Trio thread (no-op once the run is over)."""
    if job.consumer_started:
        return
    with contextlib.suppress(trio.RunFinishedError):
        token.run_sync_soon(job.abort)


async def stream_body(job: StreamJob) -> AsyncGenerator[bytes, None]:
    """The SSE response body: reads the channel only; a lagging client gets batched writes."""
    job.consumer_started = True
    try:
        async for chunk in job.receive:
            parts = [chunk]
            while True:
                try:
                    parts.append(job.receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            yield parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        job.abort()
