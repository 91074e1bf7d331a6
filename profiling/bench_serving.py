#!/usr/bin/env python3
"""Serving benchmark: load a running LLM server and report vLLM-style latency/throughput metrics.

Point it at any server that speaks LightLLM's native `POST /generate_stream` (`--backend nurserve`)
or OpenAI's streaming `POST /v1/completions` (`--backend openai`: llama.cpp's `llama-server`, vLLM,
SGLang, nurserve's own OpenAI route) or OpenAI's streaming `POST /v1/chat/completions`
(`--backend openai-chat`, bench_chat_backend.py):

    python profiling/bench_serving.py --backend nurserve --base-url http://127.0.0.1:8080 \\
        --concurrency 1 8 32 --output-len 128 --result-json out.json --plot-dir plots/

Load:
  * closed loop (default): `--concurrency C [C ...]`, C clients each sending its next request as
    soon as the previous one finished; `--num-prompts` defaults to max(8, 4*C) per level.
  * open loop: `--request-rate R [R ...]` (req/s, `inf` = all at once), arrivals Poisson or, with
    `--burstiness B != 1`, gamma-distributed gaps of shape B (vLLM's definition); `--max-concurrency`
    optionally caps requests in flight.
  * one warmup request (not measured) before the first level (`--warmup`).

Prompts: `--dataset synthetic` (default) uses the prompt of the published peer figures
(profiling/README.md, 65 tokens on SmolLM2) with a unique request number; with `--input-len L` the
same text is cut/extended to about L tokens (counted by the server's tokenizer endpoint or by
`--tokenizer`). `--dataset bundled` cycles through the ~50 English prompts in prompts_en.jsonl;
`--dataset FILE.jsonl` reads `{"prompt": ...}` lines. Every prompt starts with "Request NNNN." so no
prefix cache can help. Generation is greedy with `ignore_eos` and a fixed `--output-len`.
Prefix-cache workloads: `--shared-prefix-len N` puts the same ~N-token "system prompt" before every
prompt; `--multi-turn K` makes each client run K-turn conversations, turn t's prompt being turn
t-1's plus a fixed assistant reply and a short follow-up (turns of one conversation go one after
another; `--num-prompts` counts turns), and reports TTFT per turn.

Metrics (vLLM `bench serve` definitions), per level:
  * TTFT: request sent -> first streamed token (first token event; openai: first non-empty text).
  * TPOT: (E2EL - TTFT) / (output tokens - 1), per request with more than one output token.
  * ITL: every gap between consecutive token-bearing chunks, pooled over requests.
  * E2EL: request sent -> end of the stream.
  * request / output-token / total-token throughput over the level's wall time; goodput = requests
    meeting every `--goodput` SLO per second.
  Token counts are the server's own (`token.count_output_tokens` / `usage.completion_tokens`),
  never the number of SSE events. Failed requests are counted and reported.

While a level runs, a thread samples /proc to measure CPU used by processes other than this client
and the server (found from `--server-pid` or the listening port): the level is "quiet" when that
stays under `--quiet-threshold` cores.

This file is the driver (levels, CLI, result JSON); the pieces live beside it: bench_metrics.py
(statistics, RequestResult, goodput, per-level metrics), bench_prompts.py, bench_backends.py (SSE
and the two request functions), bench_machine.py (machine info, quietness) and bench_report.py
(text summary, plots).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_backends import BACKENDS  # noqa: E402  (profiling/ is not a package)
from bench_chat_backend import request_openai_chat  # noqa: E402
from bench_machine import (  # noqa: E402
    DEFAULT_QUIET_THRESHOLD,
    CpuMonitor,
    listening_pids,
    machine_info,
)
from bench_metrics import RequestResult, compute_metrics, parse_goodput  # noqa: E402
from bench_prompts import build_prompts  # noqa: E402
from bench_report import format_summary, make_plots  # noqa: E402

BACKENDS.setdefault("openai-chat", ("/v1/chat/completions", request_openai_chat))

# --------------------------------------------------------------------------------------------
# running a level


@dataclass
class Level:
    """One load level: closed loop at `concurrency`, or open loop at `request_rate`."""

    num_prompts: int
    concurrency: int | None = None
    request_rate: float | None = None
    max_concurrency: int | None = None

    @property
    def name(self) -> str:
        if self.request_rate is not None:
            return f"rate={self.request_rate:g}"
        return f"C={self.concurrency}"


async def _one(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    args: argparse.Namespace,
    index: int,
    t0: float,
) -> RequestResult:
    """Run one request; any failure is recorded in the result, never raised."""
    send = BACKENDS[args.backend][1]
    start = time.perf_counter() - t0
    for attempt in range(2):
        res = RequestResult(index=index, start=start, retries=attempt)
        try:
            await send(client, url, prompt, args, res)
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            # A keep-alive connection the server closed just as it was reused (cpp-httplib
            # closes them after a few requests; seen as a protocol error or as a read from a
            # closed socket): nothing was received, so send it once more.
            if attempt == 0 and res.chunks == 0 and res.error is None:
                continue
            res.error = f"{type(e).__name__}: {e}"[:300]
        except Exception as e:  # a failed request is counted, never fatal
            res.error = f"{type(e).__name__}: {e}"[:300]
        break
    if res.error:
        res.ok = False
    return res


def _client(args: argparse.Namespace, connections: int) -> httpx.AsyncClient:
    timeout = httpx.Timeout(args.timeout, connect=min(60.0, args.timeout))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False)


async def run_level(
    args: argparse.Namespace, level: Level, prompts: Sequence[str], progress: Any
) -> tuple[list[RequestResult], float, int]:
    """Send `level.num_prompts` requests; returns (results, wall time, most requests in flight)."""
    url = args.base_url.rstrip("/") + (args.endpoint or BACKENDS[args.backend][0])
    n = level.num_prompts
    turns = max(1, getattr(args, "multi_turn", 1) or 1)
    groups = [range(s, min(s + turns, n)) for s in range(0, n, turns)]  # conversations
    results: list[RequestResult | None] = [None] * n
    in_flight = peak = 0

    async def do(i: int) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            results[i] = await _one(client, url, prompts[i], args, i, t0)
        finally:
            in_flight -= 1
        if progress is not None:
            progress.update(1)

    async def do_group(g: int) -> None:
        for i in groups[g]:  # the turns of one conversation, one after another
            await do(i)

    if level.request_rate is None:
        conc = level.concurrency or 1
        connections = conc
    else:
        conc = level.max_concurrency or len(groups)
        connections = min(conc, len(groups))
    async with _client(args, max(1, connections)) as client:
        t0 = time.perf_counter()
        if level.request_rate is None:
            next_i = 0

            async def worker() -> None:
                nonlocal next_i
                while next_i < len(groups):
                    g = next_i
                    next_i += 1
                    await do_group(g)

            async with trio.open_nursery() as nursery:
                for _ in range(min(conc, len(groups))):
                    nursery.start_soon(worker)
        else:
            rng = random.Random(args.seed)
            sem = trio.Semaphore(conc)
            rate, shape = level.request_rate, args.burstiness

            async def capped(g: int) -> None:
                async with sem:
                    await do_group(g)

            async with trio.open_nursery() as nursery:
                for i in range(len(groups)):
                    nursery.start_soon(capped, i)
                    if math.isfinite(rate) and i + 1 < len(groups):
                        await trio.sleep(rng.gammavariate(shape, 1.0 / (rate * shape)))
        duration = time.perf_counter() - t0
    return [r for r in results if r is not None], duration, peak


async def warmup(args: argparse.Namespace, prompt: str) -> RequestResult:
    """One unmeasured request of the benchmark's shape."""
    url = args.base_url.rstrip("/") + (args.endpoint or BACKENDS[args.backend][0])
    async with _client(args, 1) as client:
        return await _one(client, url, prompt, args, -1, time.perf_counter())


# --------------------------------------------------------------------------------------------
# CLI


def _rate(text: str) -> float:
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError("request rate must be > 0 (inf = all at once)")
    return v


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_serving",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--backend", choices=sorted(BACKENDS), default="nurserve")
    p.add_argument("--base-url", default="http://127.0.0.1:8080")
    p.add_argument("--endpoint", default=None, help="override the backend's path")
    p.add_argument("--model", default=None, help="'model' field of openai requests (vLLM needs it)")
    p.add_argument(
        "--dataset",
        default="synthetic",
        help="synthetic | bundled (profiling/prompts_en.jsonl) | PATH.jsonl",
    )
    p.add_argument(
        "--input-len",
        type=_positive_int,
        default=None,
        help="synthetic prompt length in tokens (unset: the 65-token peer prompt)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or folder) for --input-len")
    p.add_argument("--output-len", type=_positive_int, default=128)
    p.add_argument(
        "--shared-prefix-len",
        type=_positive_int,
        default=None,
        help="a shared ~N-token system prompt before every prompt (prefix-cache workload)",
    )
    p.add_argument(
        "--multi-turn",
        type=_positive_int,
        default=1,
        help="K-turn conversations: turn t's prompt extends turn t-1's; TTFT reported per turn",
    )
    p.add_argument(
        "--num-prompts",
        type=_positive_int,
        default=None,
        help="requests per level (default: max(8, 4*C) closed loop, 64 open loop)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        nargs="+",
        default=None,
        help="closed loop at each of these concurrencies (default 1)",
    )
    p.add_argument(
        "--request-rate",
        type=_rate,
        nargs="+",
        default=None,
        help="open loop at each of these rates (req/s; inf = all at once)",
    )
    p.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma shape of the arrival gaps (1 = Poisson)",
    )
    p.add_argument(
        "--max-concurrency",
        type=_positive_int,
        default=None,
        help="open loop: most requests in flight",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs, e.g. ttft:500 tpot:50 e2el:5000",
    )
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the run")
    p.add_argument("--timeout", type=float, default=1800.0, help="per-read timeout (s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--server-pid",
        type=int,
        nargs="*",
        default=None,
        help="server process ids for the quietness check (default: found by port)",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=DEFAULT_QUIET_THRESHOLD,
        help="most CPU (cores) other processes may use for a level to count as quiet",
    )
    p.add_argument("--label", default=None, help="name of this server/run in outputs")
    p.add_argument("--result-json", default=None)
    p.add_argument("--save-detailed", action="store_true", help="per-request records in the JSON")
    p.add_argument("--plot-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def _levels(args: argparse.Namespace) -> list[Level]:
    if args.request_rate is not None:
        if args.concurrency is not None:
            raise SystemExit(
                "bench_serving: give --concurrency or --request-rate, not both "
                "(use --max-concurrency to cap an open loop)"
            )
        n = args.num_prompts or 64
        return [
            Level(n, request_rate=r, max_concurrency=args.max_concurrency)
            for r in args.request_rate
        ]
    return [
        Level(args.num_prompts or max(8, 4 * c), concurrency=c) for c in (args.concurrency or [1])
    ]


def _server_pids(args: argparse.Namespace) -> tuple[set[int], str]:
    if args.server_pid:
        return set(args.server_pid), "given"
    parts = urlsplit(args.base_url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1", "0.0.0.0") and parts.port:
        with contextlib.suppress(OSError, ValueError):
            pids = listening_pids(parts.port)
            if pids:
                return pids, f"listening on port {parts.port}"
    return set(), "unknown (remote server or not found): its CPU counts as other load"


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    levels = _levels(args)
    slos = parse_goodput(args.goodput)
    total = args.warmup + sum(lv.num_prompts for lv in levels)
    prompts, prompt_info = build_prompts(args, total)
    server_pids, pid_source = _server_pids(args)
    label = args.label or f"{args.backend} @ {args.base_url}"
    machine = machine_info()
    config = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    config.update(prompt_info)
    out: dict[str, Any] = {
        "tool": "nurserve profiling/bench_serving.py",
        "label": label,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config,
        "machine": machine,
        "server_pids": sorted(server_pids),
        "server_pids_source": pid_source,
        "warmup": [],
        "runs": [],
    }
    for w in range(args.warmup):
        res = await warmup(args, prompts[w])
        out["warmup"].append({"ok": res.ok, "error": res.error, "e2el_s": res.e2el})
        if not res.ok:
            print(f"warning: warmup request failed: {res.error}", file=sys.stderr)
    offset = args.warmup
    raw: list[list[RequestResult]] = []
    for level in levels:
        level_prompts = prompts[offset : offset + level.num_prompts]
        offset += level.num_prompts
        load_before = machine.get("loadavg") and list(os.getloadavg())
        with (
            tqdm(
                total=level.num_prompts,
                desc=f"{label} {level.name}",
                file=sys.stderr,
                disable=args.no_progress,
                mininterval=0.5,
                leave=False,
            ) as bar,
            CpuMonitor(server_pids, args.quiet_threshold) as mon,
        ):
            results, duration, peak = await run_level(args, level, level_prompts, bar)
        errors: dict[str, int] = {}
        for r in results:
            if not r.ok:
                errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
        run: dict[str, Any] = {
            "level": level.name,
            "mode": "closed" if level.request_rate is None else "open",
            "concurrency": level.concurrency,
            "request_rate": level.request_rate,
            "burstiness": args.burstiness if level.request_rate is not None else None,
            "max_concurrency": level.max_concurrency,
            "max_concurrency_observed": peak,
            "num_prompts": level.num_prompts,
            "metrics": compute_metrics(
                results, duration, expected_output_len=args.output_len, slos=slos
            ),
            "quiet": mon.summary(),
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()) if load_before else None,
            "errors": [f"{n}x {e}" for e, n in sorted(errors.items(), key=lambda kv: -kv[1])][:10],
        }
        if args.multi_turn > 1:
            run["ttft_by_turn"] = ttft_by_turn(results, args.multi_turn)
        if args.save_detailed:
            run["requests"] = [
                {**asdict(r), "tpot": r.tpot} for r in sorted(results, key=lambda r: r.index)
            ]
        out["runs"].append(run)
        raw.append(results)
        print(format_summary(run), flush=True)
        for turn, row in run.get("ttft_by_turn", {}).items():
            print(
                f"turn {turn}: TTFT p50 {row['p50_ms']:.1f} ms, mean {row['mean_ms']:.1f} ms "
                f"({row['n']} requests)",
                flush=True,
            )
    if args.plot_dir:
        out["plots"] = make_plots(out["runs"], raw, Path(args.plot_dir), label)
    return out


def ttft_by_turn(results: Sequence[RequestResult], turns: int) -> dict[str, dict[str, float]]:
    """TTFT median and mean (ms) of the successful requests of each turn (index % turns)."""
    out: dict[str, dict[str, float]] = {}
    for turn in range(turns):
        vals = sorted(
            1000 * r.ttft
            for r in results
            if r.ok and r.ttft is not None and r.index % turns == turn
        )
        if vals:
            mid = len(vals) // 2
            p50 = vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2
            out[str(turn + 1)] = {"p50_ms": p50, "mean_ms": sum(vals) / len(vals), "n": len(vals)}
    return out


def _jsonable(obj: Any) -> Any:
    """nan/inf -> None so the JSON is standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (also written to --result-json)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_goodput(args.goodput)
    except ValueError as e:
        parser.error(str(e))
    if args.burstiness <= 0:
        parser.error("--burstiness must be > 0")
    if args.multi_turn > 1 and any(lv.num_prompts % args.multi_turn for lv in _levels(args)):
        parser.error("--multi-turn K: --num-prompts must be a multiple of K")
    result = trio.run(_bench, args)
    result = _jsonable(result)
    if args.result_json:
        path = Path(args.result_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {path}", file=sys.stderr)
    return result


def cli(argv: Sequence[str] | None = None) -> int:
    """Exit status 0 even when requests failed (they are counted in the results)."""
    main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(cli())


__all__ = ["Level", "build_parser", "cli", "main", "run_level", "warmup"]
