"""Scenarios (b) burst past the waiting queue, (c) dropped streams, (d) clients that stop
reading beside normal streams, (e) the soak. All run against one shared server."""

from __future__ import annotations

import json
import random
import socket
import time
from collections import Counter
from typing import Any

import trio
from stress_common import (
    Outcome,
    Server,
    StreamResult,
    client,
    kv_in_use,
    pct,
    read_metrics,
    run_stream,
    stream_body,
)


async def _run_streams(srv: Server, bodies: list[dict[str, Any]]) -> list[StreamResult]:
    """All `bodies` streamed at once on one client; their results in completion order."""
    results: list[StreamResult] = []
    async with client(srv.url) as cli, trio.open_nursery() as nursery:
        for body in bodies:

            async def one(body: dict[str, Any] = body) -> None:
                results.append(await run_stream(cli, body))

            nursery.start_soon(one)
    return results


async def scenario_burst(srv: Server, *, waiting: int, factor: int, output_len: int) -> Outcome:
    """(b): factor x --max_waiting_reqs streams at once: 200 (complete) or 503 + Retry-After."""
    n = waiting * factor
    start = time.monotonic()
    bodies = [stream_body(f"Request {i}. Tell me about rivers.", output_len) for i in range(n)]
    results = await _run_streams(srv, bodies)
    took = time.monotonic() - start
    statuses = Counter(r.status for r in results)
    ok = [r for r in results if r.status == 200]
    busy = [r for r in results if r.status == 503]
    complete = [r for r in ok if r.complete and len(r.event_times_s) == output_len]
    out = Outcome("b", f"burst of {factor}x the waiting queue ({n} streams at once)")
    out.figures = {
        "requests": n,
        "max_waiting_reqs": waiting,
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "complete_200_streams": len(complete),
        "503_with_retry_after": sum(1 for r in busy if r.retry_after),
        "seconds": round(took, 1),
    }
    out.checks = {
        "only 200 and 503": set(statuses) <= {200, 503},
        "every 503 has Retry-After": all(r.retry_after for r in busy),
        "every 200 stream complete": len(complete) == len(ok),
        "some served, some refused": bool(ok) and bool(busy),
    }
    return out


async def _freed_after_s(srv: Server, capacity: int, baseline: float, limit_s: float) -> float:
    """Seconds until no request is held and the KV in use is back to baseline."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        k = await trio.to_thread.run_sync(kv_in_use, srv.url, capacity)
        idle = k["in_flight"] == 0 and k["running"] == 0 and k["waiting"] == 0
        if idle and k["slots_used"] <= baseline:
            return time.monotonic() - start
        await trio.sleep(0.02)
    return float("inf")


async def _drop_one(port: int, body: dict[str, Any], dropped: list[float]) -> None:
    """Open a stream on a raw socket, read up to its first event, hang up (a plain close, no
    client library left holding a half-read response)."""
    data = json.dumps(body).encode()
    head = (
        b"POST /generate_stream HTTP/1.1\r\nHost: stress\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(data)
    )
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(head + data)
        got = b""
        while b" 200 " in got[:16] or len(got) < 16:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            got += chunk
            if b"\r\n\r\n" in got and b"data:" in got.split(b"\r\n\r\n", 1)[1]:
                dropped.append(time.monotonic())  # a running stream: hang up now
                return


async def scenario_drops(srv: Server, *, capacity: int, total: int, wave: int) -> Outcome:
    """(c): `total` streams dropped after their first token, `wave` at a time; KV freed when?"""
    base = (await trio.to_thread.run_sync(kv_in_use, srv.url, capacity))["slots_used"]
    before = read_metrics(srv.url).get("nurserve_request_aborted", 0.0)
    free_s: list[float] = []
    streaming = 0
    for w in range(0, total, wave):
        dropped: list[float] = []
        async with trio.open_nursery() as nursery:
            for i in range(w, min(total, w + wave)):
                body = stream_body(f"Request {i}. Write a long essay about the sea.", 900)
                nursery.start_soon(_drop_one, srv.port, body, dropped)
        free_s.append(await _freed_after_s(srv, capacity, base, 30.0))
        streaming += len(dropped)
    aborted = read_metrics(srv.url).get("nurserve_request_aborted", 0.0) - before
    out = Outcome("c", f"{total} streams dropped after their first token ({wave} at a time)")
    out.figures = {
        "dropped": total,
        "dropped_while_streaming": streaming,
        "aborted_counted": int(aborted),
        "kv_freed_after_last_drop_s_p50": round(pct(free_s, 50), 3),
        "kv_freed_after_last_drop_s_max": round(max(free_s), 3),
        "slots_used_before": base,
    }
    out.checks = {
        "every stream ran, then was dropped": streaming == total,
        "every drop counted as aborted": aborted >= total,
        "KV freed within 1 s (every wave)": max(free_s) <= 1.0,
    }
    return out


def _open_non_reader(port: int, body: bytes) -> socket.socket:
    """A client that sends /generate_stream and never reads (small receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    head = (
        b"POST /generate_stream HTTP/1.1\r\nHost: stress\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    sock.sendall(head + body)
    return sock


async def _normal_itl(srv: Server, streams: int, output_len: int) -> tuple[list[float], int]:
    """Inter-token gaps of `streams` concurrent normal streams, and how many completed."""
    bodies = [
        stream_body(f"Normal {i} {time.time()}. Describe a forest.", output_len)
        for i in range(streams)
    ]
    results = await _run_streams(srv, bodies)
    gaps = [g for r in results for g in r.gaps_s()]
    return gaps, sum(1 for r in results if r.complete)


async def _beside_readers(
    srv: Server, readers: int, streams: int, output_len: int, reader_len: int
) -> tuple[list[float], int, int]:
    """Normal streams' gaps beside `readers` clients that never read, how many completed, and
    how many of the non-readers were aborted (waited for, up to 120 s)."""
    before = read_metrics(srv.url).get("nurserve_stream_slow_reader_aborts_total", 0.0)
    body = json.dumps(stream_body("Tell me a very long story.", reader_len)).encode()
    socks = [_open_non_reader(srv.port, body) for _ in range(readers)]
    try:
        await trio.sleep(0.5)  # the non-readers are admitted first
        gaps, ok = await _normal_itl(srv, streams, output_len)
        deadline = time.monotonic() + 120
        aborted = 0.0
        while time.monotonic() < deadline:  # until every non-reader was aborted or finished
            m = await trio.to_thread.run_sync(read_metrics, srv.url)
            aborted = m.get("nurserve_stream_slow_reader_aborts_total", 0.0) - before
            if aborted >= readers or m.get("nurserve_requests_in_flight", 1.0) == 0:
                break
            await trio.sleep(0.25)
    finally:
        for sock in socks:
            sock.close()
    return gaps, ok, int(aborted)


async def scenario_slow_readers(
    srv: Server,
    *,
    capacity: int,
    readers: int,
    streams: int,
    output_len: int,
    reader_len: int,
    rounds: int = 1,
) -> Outcome:
    """(d): normal streams' ITL p50 alone, then beside `readers` clients that never read,
    `rounds` times interleaved; the check is on the median of the rounds' ratios."""
    ratios: list[float] = []
    alone_p50, with_p50, alone_p90, with_p90 = [], [], [], []
    complete, aborted = [], []
    for _ in range(rounds):
        base_gaps, base_ok = await _normal_itl(srv, streams, output_len)
        gaps, ok, n_aborted = await _beside_readers(srv, readers, streams, output_len, reader_len)
        ratios.append(pct(gaps, 50) / pct(base_gaps, 50))
        alone_p50.append(round(1e3 * pct(base_gaps, 50), 2))
        with_p50.append(round(1e3 * pct(gaps, 50), 2))
        alone_p90.append(round(1e3 * pct(base_gaps, 90), 2))
        with_p90.append(round(1e3 * pct(gaps, 90), 2))
        complete.append(base_ok + ok)
        aborted.append(n_aborted)
    held = await trio.to_thread.run_sync(kv_in_use, srv.url, capacity)
    ratio = sorted(ratios)[len(ratios) // 2]
    out = Outcome("d", f"{readers} clients that stop reading beside {streams} normal streams")
    out.figures = {
        "rounds": rounds,
        "itl_p50_ms_alone": alone_p50,
        "itl_p50_ms_with_readers": with_p50,
        "itl_p90_ms_alone": alone_p90,
        "itl_p90_ms_with_readers": with_p90,
        "itl_p50_ratios": [round(r, 3) for r in ratios],
        "itl_p50_ratio_median": round(ratio, 3),
        "slow_reader_aborts": aborted,
        "normal_streams_complete": f"{sum(complete)}/{2 * streams * rounds}",
        "held_after": held,
    }
    out.checks = {
        "ITL p50 within 1.3x (median of rounds)": ratio <= 1.3,
        "every non-reader aborted": min(aborted) >= readers,  # none finished before its bound
        "normal streams complete": sum(complete) == 2 * streams * rounds,
        "nothing held after": held["in_flight"] == 0 and held["slots_used"] == 0,
    }
    return out


async def _soak_client(cli: Any, rng: random.Random, until: float, tally: Counter[str]) -> None:
    """One closed-loop client mixing the LightLLM stream, /generate and OpenAI chat."""
    while time.monotonic() < until:
        n = rng.randint(4, 48)
        kind = rng.choice(("stream", "generate", "chat"))
        prompt = f"Soak {rng.random()}. {rng.choice(('Hi', 'Explain tides.', 'List colours.'))}"
        try:
            if kind == "stream":
                res = await run_stream(cli, stream_body(prompt, n))
                good = res.complete and len(res.event_times_s) == n
            elif kind == "generate":
                r = await cli.post("/generate", json=stream_body(prompt, n))
                good = r.status_code == 200 and r.json()["count_output_tokens"] == n
            else:
                msgs = [{"role": "user", "content": prompt}]
                r = await cli.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": n})
                good = r.status_code == 200 and r.json()["choices"][0]["message"] is not None
        except Exception:  # noqa: BLE001  (any failure is counted)
            good = False
        tally["ok" if good else "failed"] += 1


async def scenario_soak(srv: Server, *, capacity: int, duration_s: float, clients: int) -> Outcome:
    """(e): `clients` closed-loop clients for `duration_s`; RSS growth, failures, leaked slots."""
    tally: Counter[str] = Counter()
    rss: list[tuple[float, int]] = []
    start = time.monotonic()
    until = start + duration_s

    async def sample_rss() -> None:
        while time.monotonic() < until:
            rss.append((time.monotonic() - start, srv.rss_bytes()))
            await trio.sleep(max(1.0, duration_s / 60))

    async with client(srv.url) as cli, trio.open_nursery() as nursery:
        nursery.start_soon(sample_rss)
        for i in range(clients):
            nursery.start_soon(_soak_client, cli, random.Random(i), until, tally)
    await trio.sleep(0.5)
    held = await trio.to_thread.run_sync(kv_in_use, srv.url, capacity)
    warm = [b for t, b in rss if t >= 0.1 * duration_s] or [b for _, b in rss]
    growth = (rss[-1][1] - warm[0]) / warm[0]
    out = Outcome("e", f"soak: {clients} clients for {duration_s:.0f} s")
    out.figures = {
        "requests_ok": tally["ok"],
        "requests_failed": tally["failed"],
        "rss_mib_after_warmup": round(warm[0] / 2**20, 1),
        "rss_mib_end": round(rss[-1][1] / 2**20, 1),
        "rss_mib_max": round(max(b for _, b in rss) / 2**20, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "leaked_slots": held["slots_used"],
        "in_flight_after": held["in_flight"],
    }
    out.checks = {
        "RSS growth <= 5 %": growth <= 0.05,
        "0 failed requests": tally["failed"] == 0 and tally["ok"] > 0,
        "0 leaked slots": held["slots_used"] == 0 and held["in_flight"] == 0,
    }
    return out
