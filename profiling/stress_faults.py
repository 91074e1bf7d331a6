"""Scenarios (f) the engine failing mid-load (--fault_inject_step) and (g) SIGTERM mid-load;
each owns its server, which it ends."""

from __future__ import annotations

import signal
import time
from typing import Any

import httpx
import trio
from stress_common import Outcome, Server, StreamResult, client, pct, run_stream, stream_body


async def _poll_health(url: str, seen: list[float], stop: trio.Event) -> None:
    """Record when /health first answers 503 (or stops answering)."""
    async with httpx.AsyncClient(base_url=url, timeout=2.0) as cli:
        while not stop.is_set():
            try:
                if (await cli.get("/health")).status_code == 503:
                    seen.append(time.monotonic())
                    return
            except httpx.HTTPError:
                seen.append(time.monotonic())
                return
            await trio.sleep(0.005)


async def _streams(url: str, n: int, output_len: int, results: list[StreamResult]) -> None:
    async with client(url) as cli, trio.open_nursery() as nursery:
        for i in range(n):
            body = stream_body(f"Request {i}. Tell me a story about a ship.", output_len)

            async def one(body: dict[str, Any] = body) -> None:
                results.append(await run_stream(cli, body))

            nursery.start_soon(one)


async def scenario_engine_fault(srv: Server, *, streams: int, fault_step: int) -> Outcome:
    """(f): streams in flight when step `fault_step` fails: error events, 503, exit status 3."""
    results: list[StreamResult] = []
    seen: list[float] = []
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_poll_health, srv.url, seen, stop)
        await _streams(srv.url, streams, 4 * fault_step, results)
        with trio.move_on_after(30):
            while True:  # the poller appends when /health turns 503
                if seen:
                    break
                await trio.sleep(0.01)
        stop.set()
    status = await trio.to_thread.run_sync(lambda: srv.proc.wait(timeout=60))
    ended = [r.event_times_s[-1] for r in results if r.event_times_s]
    errored = [r for r in results if r.status == 200 and "error" in (r.last_event or {})]
    steps = [g for r in results for g in r.gaps_s()]
    step_s = pct(steps, 50)
    first_error = min(ended) if ended else float("nan")
    lag = seen[0] - first_error if seen and ended else float("inf")
    out = Outcome("f", f"engine fails at step {fault_step} under {streams} streams")
    out.figures = {
        "streams": streams,
        "ended_with_error_event": len(errored),
        "health_503_after_first_error_ms": round(1e3 * lag, 1),
        "step_ms_p50": round(1e3 * step_s, 1),
        "exit_status": status,
    }
    out.checks = {
        "every stream ends with an error event": len(errored) == streams,
        "/health 503 within one step": lag <= max(step_s, 0.0) + 0.05,
        "exit status 3": status == 3,
    }
    return out


async def _late_requests(url: str, count: int) -> list[int | str]:
    """New /generate requests after the signal: their status, or the transport error's name."""
    got: list[int | str] = []
    async with httpx.AsyncClient(base_url=url, timeout=30) as cli:
        for i in range(count):
            try:
                r = await cli.post("/generate", json=stream_body(f"late {i}", 4))
                got.append(r.status_code)
            except httpx.HTTPError as exc:
                got.append(type(exc).__name__)
    return got


async def scenario_sigterm(
    srv: Server, *, streams: int, output_len: int, grace_s: float, late: int = 5
) -> Outcome:
    """(g): SIGTERM once every stream has a token: they finish within the grace, new get 503."""
    results: list[StreamResult] = []
    late_status: list[int | str] = []
    signalled = [0.0]
    async with client(srv.url) as warm_cli:  # a kept-alive connection opened before the signal
        await warm_cli.get("/health")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_streams, srv.url, streams, output_len, results)
            await trio.sleep(0.2)
            with trio.move_on_after(60):
                while True:  # asks /metrics until every stream runs in the engine
                    if await trio.to_thread.run_sync(_all_streaming, srv.url, streams):
                        break
                    await trio.sleep(0.02)
            srv.proc.send_signal(signal.SIGTERM)
            signalled[0] = time.monotonic()
            await trio.sleep(0.2)
            late_status += await _late_requests(srv.url, late)
            try:
                r = await warm_cli.post("/generate", json=stream_body("late kept-alive", 4))
                late_status.append(r.status_code)
            except httpx.HTTPError as exc:
                late_status.append(type(exc).__name__)
    status = await trio.to_thread.run_sync(lambda: srv.proc.wait(timeout=grace_s + 30))
    done = [r for r in results if r.complete and len(r.event_times_s) == output_len]
    finish_s = max((r.event_times_s[-1] for r in results if r.event_times_s), default=0.0)
    out = Outcome("g", f"SIGTERM with {streams} streams in flight (grace {grace_s:.0f} s)")
    out.figures = {
        "streams_complete": f"{len(done)}/{streams}",
        "last_stream_ended_after_signal_s": round(finish_s - signalled[0], 2),
        "late_request_answers": [str(s) for s in late_status],
        "exit_status": status,
    }
    out.checks = {
        "in-flight streams finish": len(done) == streams,
        "within the grace period": finish_s - signalled[0] <= grace_s,
        "new requests get 503": all(s == 503 for s in late_status),
        "exit status 0": status == 0,
    }
    return out


def _all_streaming(url: str, streams: int) -> bool:
    """True once every stream runs in the engine (results fill in only at the end)."""
    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return False
    for line in text.splitlines():
        if line.startswith("nurserve_num_requests_running "):
            return float(line.split()[1]) >= streams
    return False
