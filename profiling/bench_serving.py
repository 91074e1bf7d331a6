#!/usr/bin/env python3
"""Serving benchmark: load a running LLM server and report vLLM-style latency/throughput metrics.

Point it at any server that speaks LightLLM's native `POST /generate_stream` (`--backend nurserve`)
or OpenAI's streaming `POST /v1/completions` (`--backend openai`: llama.cpp's `llama-server`, vLLM,
SGLang, nurserve's own OpenAI route):

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
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import random
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

HERE = Path(__file__).resolve().parent
BUNDLED_PROMPTS = HERE / "prompts_en.jsonl"

# The prompt of the peer figures (shared reference cpu-peers.md): 65 tokens on SmolLM2.
PEER_PROMPT = (
    "Request {n:04d}. The following is a report about the history of the city library. "
    "The library was founded years ago by a group of local teachers who wanted every child in "
    "town to have access to books. Over time it grew from a single room into a large building. "
    "Write the next part of the report:"
)
PREFIX = "Request {n:04d}. "
FILLER = (
    "The following is a report about the history of the city library. The library was founded "
    "years ago by a group of local teachers who wanted every child in town to have access to "
    "books. Over time it grew from a single room into a large building."
).split()

SLO_KEYS = ("ttft", "tpot", "e2el")
METRIC_FAMILIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
STAT_KEYS = ("mean", "median", "p90", "p99", "min", "max", "std")
DEFAULT_QUIET_THRESHOLD = 0.08  # cores; the gate of the published peer figures


# --------------------------------------------------------------------------------------------
# statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation (numpy's default method); nan when empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    rank = (len(xs) - 1) * p / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values_s: Sequence[float]) -> dict[str, float | None]:
    """mean/median/p90/p99/min/max/std of seconds, in milliseconds (None when empty)."""
    if not values_s:
        return dict.fromkeys(STAT_KEYS)
    ms = [v * 1000.0 for v in values_s]
    mean = sum(ms) / len(ms)
    return {
        "mean": mean,
        "median": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "min": min(ms),
        "max": max(ms),
        "std": math.sqrt(sum((x - mean) ** 2 for x in ms) / len(ms)),
    }


@dataclass
class RequestResult:
    """What the client saw of one request (times in seconds, relative to the level start)."""

    index: int
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    tokens_from_server: bool = False
    chunks: int = 0
    finish_reason: str | None = None
    retries: int = 0  # resent once after the server closed a reused connection unanswered

    @property
    def tpot(self) -> float | None:
        """(E2EL - TTFT) / (output tokens - 1); None unless there are at least two tokens."""
        if self.ttft is None or self.e2el is None or not self.output_tokens:
            return None
        if self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def parse_goodput(items: Sequence[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or ():
        key, sep, value = item.partition(":")
        key = key.strip().lower()
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"bad SLO {item!r}: expected KEY:MS with KEY one of {SLO_KEYS}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {item!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise ValueError(f"bad SLO {item!r}: the limit must be > 0 ms")
        slos[key] = ms
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    """vLLM's goodput test; a request with a single output token has TPOT 0."""
    values = {
        "ttft": r.ttft,
        "tpot": r.tpot if r.tpot is not None else 0.0,
        "e2el": r.e2el,
    }
    for key, limit_ms in slos.items():
        v = values[key]
        if v is None or v * 1000.0 > limit_ms:
            return False
    return True


def compute_metrics(
    results: Sequence[RequestResult],
    duration_s: float,
    *,
    expected_output_len: int | None = None,
    slos: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Every metric of one level from the per-request results and its wall time."""
    done = [r for r in results if r.ok]
    failed = len(results) - len(done)
    in_tok = sum(r.prompt_tokens or 0 for r in done)
    out_tok = sum(r.output_tokens or 0 for r in done)
    dur = duration_s if duration_s > 0 else math.nan
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [t for t in (r.tpot for r in done) if t is not None]
    itls = [g for r in done for g in r.itl]
    e2els = [r.e2el for r in done if r.e2el is not None]
    metrics: dict[str, Any] = {
        "num_requests": len(results),
        "completed": len(done),
        "failed": failed,
        "duration_s": duration_s,
        "total_input_tokens": in_tok,
        "total_output_tokens": out_tok,
        "request_throughput": len(done) / dur,
        "output_throughput": out_tok / dur,
        "total_token_throughput": (in_tok + out_tok) / dur,
        "tokens_from_server": bool(done) and all(r.tokens_from_server for r in done),
        "retried_requests": sum(1 for r in results if r.retries),
        "output_len_mismatch": (
            sum(1 for r in done if r.output_tokens != expected_output_len)
            if expected_output_len is not None
            else None
        ),
        "goodput": None,
        "goodput_slos_ms": dict(slos) if slos else None,
        "ttft_ms": summarize(ttfts),
        "tpot_ms": summarize(tpots),
        "itl_ms": summarize(itls),
        "e2el_ms": summarize(e2els),
    }
    if slos:
        good = sum(1 for r in done if meets_slos(r, slos))
        metrics["goodput"] = good / dur
        metrics["good_requests"] = good
    return metrics


# --------------------------------------------------------------------------------------------
# prompts


def synthetic_prompt(n: int, words: int | None) -> str:
    """The peer prompt (words=None) or "Request NNNN. " + `words` words of the same text."""
    if words is None:
        return PEER_PROMPT.format(n=n)
    body = [FILLER[i % len(FILLER)] for i in range(words)]
    return (PREFIX.format(n=n) + " ".join(body)).rstrip()


def calibrate_words(target_tokens: int, count: Callable[[str], int]) -> int:
    """The most filler words whose synthetic prompt has at most `target_tokens` tokens."""
    lo, hi = 0, max(4, 2 * target_tokens)
    while count(synthetic_prompt(1, hi)) <= target_tokens:  # make sure hi is over the target
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(synthetic_prompt(1, mid)) <= target_tokens:
            lo = mid
        else:
            hi = mid
    return lo


def load_jsonl_prompts(path: Path) -> list[str]:
    """`{"prompt": str}` (or `{"text": str}`) lines."""
    prompts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            text = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'prompt' string")
            prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def make_token_counter(args: argparse.Namespace) -> tuple[Callable[[str], int], str]:
    """A prompt-token counter: a local tokenizer file, else the server's tokenize endpoint."""
    if args.tokenizer:
        from tokenizers import Tokenizer

        p = Path(args.tokenizer)
        tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
        return (lambda text: len(tok.encode(text).ids)), f"tokenizer {p}"
    base = args.base_url.rstrip("/")
    client = httpx.Client(timeout=60.0, trust_env=False)
    if args.backend == "nurserve":

        def count(text: str) -> int:
            r = client.post(f"{base}/tokens", json={"text": text, "parameters": {}})
            r.raise_for_status()
            return int(r.json()["ntokens"])

        return count, f"{base}/tokens"

    def count_openai(text: str) -> int:  # llama.cpp (content) and vLLM (prompt) /tokenize
        body: dict[str, Any] = {"content": text, "prompt": text, "add_special": True}
        if args.model:
            body["model"] = args.model
        r = client.post(f"{base}/tokenize", json=body)
        r.raise_for_status()
        obj = r.json()
        return int(obj["count"]) if "count" in obj else len(obj["tokens"])

    return count_openai, f"{base}/tokenize"


def build_prompts(args: argparse.Namespace, total: int) -> tuple[list[str], dict[str, Any]]:
    """`total` prompts with unique request numbers, and a description for the result JSON."""
    if args.dataset == "synthetic":
        if args.input_len is None:
            return [synthetic_prompt(n, None) for n in range(total)], {
                "dataset": "synthetic",
                "prompt": "peer prompt (cpu-peers.md), 65 tokens on SmolLM2",
            }
        count, how = make_token_counter(args)
        words = calibrate_words(args.input_len, count)
        got = count(synthetic_prompt(1, words))
        if got != args.input_len:
            print(
                f"note: synthetic prompts have {got} tokens (asked {args.input_len}); "
                "the server's counts are reported",
                file=sys.stderr,
            )
        return [synthetic_prompt(n, words) for n in range(total)], {
            "dataset": "synthetic",
            "input_len": args.input_len,
            "calibrated_tokens": got,
            "filler_words": words,
            "counted_by": how,
        }
    path = BUNDLED_PROMPTS if args.dataset == "bundled" else Path(args.dataset)
    base = load_jsonl_prompts(path)
    rng = random.Random(args.seed)
    order = list(range(len(base)))
    rng.shuffle(order)
    prompts = [PREFIX.format(n=n) + base[order[n % len(base)]] for n in range(total)]
    return prompts, {"dataset": str(path.name if args.dataset == "bundled" else path)}


# --------------------------------------------------------------------------------------------
# backends


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
    last = 0.0
    st = time.perf_counter()
    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            res.error = f"HTTP {resp.status_code}: {body[:300]}"
            return
        async for line in resp.aiter_lines():
            data = _sse_data(line)
            if not data or res.error:  # after an error: drain (leaving early leaks the generator)
                continue
            now = time.perf_counter()
            ev = _event(data, res)
            if ev is None:
                continue
            tok = ev.get("token")
            if tok is not None:
                res.chunks += 1
                if res.ttft is None:
                    res.ttft = now - st
                else:
                    res.itl.append(now - last)
                last = now
                if tok.get("count_output_tokens") is not None:
                    count = int(tok["count_output_tokens"])
                if tok.get("prompt_tokens") is not None:
                    res.prompt_tokens = int(tok["prompt_tokens"])
            if ev.get("finished"):
                finished = True
                res.finish_reason = ev.get("finish_reason")
    if res.error:
        return
    res.e2el = time.perf_counter() - st
    res.tokens_from_server = count is not None
    res.output_tokens = count if count is not None else res.chunks
    if not finished:
        res.error = "stream ended without a finished event"
    elif res.ttft is None:
        res.error = "no token in the stream"
    else:
        res.ok = True


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
    last = 0.0
    st = time.perf_counter()
    async with client.stream("POST", url, json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            res.error = f"HTTP {resp.status_code}: {body[:300]}"
            return
        async for line in resp.aiter_lines():
            data = _sse_data(line)
            if not data or res.error:  # after an error: drain (leaving early leaks the generator)
                continue
            if data == "[DONE]":
                done = True
                continue
            now = time.perf_counter()
            ev = _event(data, res)
            if ev is None:
                continue
            choices = ev.get("choices") or []
            if choices:
                if choices[0].get("text"):
                    res.chunks += 1
                    if res.ttft is None:
                        res.ttft = now - st
                    else:
                        res.itl.append(now - last)
                    last = now
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
    if res.error:
        return
    res.e2el = time.perf_counter() - st
    res.tokens_from_server = usage_out is not None
    res.output_tokens = usage_out if usage_out is not None else res.chunks
    if not (done or res.finish_reason):
        res.error = "stream ended without [DONE] or a finish_reason"
    elif res.ttft is None:
        res.error = "no text in the stream"
    else:
        res.ok = True


BACKENDS = {
    "nurserve": ("/generate_stream", request_nurserve),
    "openai": ("/v1/completions", request_openai),
}


# --------------------------------------------------------------------------------------------
# machine info and the quietness check


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def machine_info() -> dict[str, Any]:
    """CPU count/model, memory, load average, versions."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "httpx": httpx.__version__,
        "trio": trio.__version__,
        "cpu_count": os.cpu_count(),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in _read("/proc/meminfo").splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["loadavg"] = list(os.getloadavg())
    return info


def _ticks_per_s() -> float:
    try:
        return float(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):
        return 100.0


# (pid, starttime) -> (comm, ppid, own ticks, waited-for children's ticks)
ProcSample = dict[tuple[int, int], tuple[str, int, int, int]]


def sample_procs() -> ProcSample:
    """utime+stime (and cutime+cstime) of every visible process, from /proc/<pid>/stat."""
    out: ProcSample = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            raw = _read(f"/proc/{name}/stat")
        except OSError:
            continue
        lp, rp = raw.find("("), raw.rfind(")")
        f = raw[rp + 2 :].split()
        try:
            own = int(f[11]) + int(f[12])
            children = int(f[13]) + int(f[14])
            out[(int(name), int(f[19]))] = (raw[lp + 1 : rp], int(f[1]), own, children)
        except (IndexError, ValueError):
            continue
    return out


def sample_stat() -> tuple[int, int]:
    """(busy ticks, steal ticks) of the whole machine from /proc/stat."""
    f = [int(x) for x in _read("/proc/stat").split("\n", 1)[0].split()[1:]]
    f += [0] * (10 - len(f))
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    return user + nice + system + irq + softirq, steal


def _descendants(sample: ProcSample, roots: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for (pid, _st), (_c, ppid, _o, _ch) in sample.items():
        children.setdefault(ppid, []).append(pid)
    seen, stack = set(), [p for p in roots]
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        stack.extend(children.get(p, ()))
    return seen


def listening_pids(port: int) -> set[int]:
    """Processes holding a TCP socket that listens on `port` (Linux /proc; empty elsewhere)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    pids: set[int] = set()
    if not inodes:
        return pids
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{name}/fd/{fd}") in inodes:
                        pids.add(int(name))
                        break
    return pids


class CpuMonitor:
    """Samples /proc once a second in a thread: CPU of others vs. this client + the server.

    Other load = the machine's busy time (/proc/stat: user, nice, system, irq, softirq) minus the
    CPU time of this process, the server processes and their descendants. It so includes
    short-lived processes and kernel work; `top_others` names the visible processes behind it.
    """

    def __init__(self, server_pids: set[int], threshold: float, interval: float = 1.0) -> None:
        self.roots = {os.getpid(), *server_pids}
        self.threshold = threshold
        self.interval = interval
        self.available = os.path.isdir("/proc") and os.path.exists("/proc/stat")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.elapsed = 0.0
        self.ours_ticks = 0
        self.other_ticks = 0
        self.busy_ticks = 0
        self.steal_ticks = 0
        self.max_other_cores = 0.0
        self.by_name: dict[str, int] = {}

    def __enter__(self) -> CpuMonitor:
        if self.available:
            self._prev = (time.monotonic(), sample_procs(), sample_stat())
            self._thread = threading.Thread(target=self._run, name="cpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._take()  # the last partial interval

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def _take(self) -> None:
        t1, procs1, stat1 = time.monotonic(), sample_procs(), sample_stat()
        t0, procs0, stat0 = self._prev
        ours = _descendants(procs1, self.roots) | _descendants(procs0, self.roots)
        dt_ours = 0
        for key, (comm, _ppid, own, ch) in procs1.items():
            old = procs0.get(key)
            if key[0] in ours:  # children reaped by our processes count as ours
                dt_ours += max(0, own + ch - ((old[2] + old[3]) if old else 0))
                continue
            delta = own - (old[2] if old else 0)  # own time only: reaped children would count twice
            if delta > 0:
                label = f"{comm}({key[0]})"
                self.by_name[label] = self.by_name.get(label, 0) + delta
        busy = max(0, stat1[0] - stat0[0])
        dt_other = max(0, busy - dt_ours)  # everything the machine did that was not us
        dt = t1 - t0
        self.elapsed += dt
        self.ours_ticks += dt_ours
        self.other_ticks += dt_other
        self.busy_ticks += busy
        self.steal_ticks += max(0, stat1[1] - stat0[1])
        if dt > 0.5:
            self.max_other_cores = max(self.max_other_cores, dt_other / _ticks_per_s() / dt)
        self._prev = (t1, procs1, stat1)

    def summary(self) -> dict[str, Any]:
        """Mean CPU (in cores) of others, of us, of the machine; quiet = others < threshold."""
        if not self.available or self.elapsed <= 0:
            return {"quiet": None, "line": "quiet: unknown (no /proc)", "threshold": self.threshold}
        hz = _ticks_per_s()
        per = hz * self.elapsed
        other = self.other_ticks / per
        top = sorted(self.by_name.items(), key=lambda kv: -kv[1])[:5]
        quiet = other < self.threshold
        return {
            "quiet": quiet,
            "line": (
                f"quiet: {'yes' if quiet else 'no'} (other load {other:.2f} cores, "
                f"threshold {self.threshold:.2f})"
            ),
            "threshold": self.threshold,
            "other_load_cores": other,
            "other_load_max_1s_cores": self.max_other_cores,
            "ours_cores": self.ours_ticks / per,
            "machine_busy_cores": self.busy_ticks / per,
            "steal_cores": self.steal_ticks / per,
            "sampled_s": self.elapsed,
            "top_others": [f"{name} {ticks / per:.2f}" for name, ticks in top if ticks > 0],
        }


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
        except httpx.RemoteProtocolError as e:
            # A keep-alive connection the server closed just as it was reused (cpp-httplib
            # closes them after a few requests): nothing was received, so send it once more.
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

    if level.request_rate is None:
        conc = level.concurrency or 1
        connections = conc
    else:
        conc = level.max_concurrency or n
        connections = min(conc, n)
    async with _client(args, max(1, connections)) as client:
        t0 = time.perf_counter()
        if level.request_rate is None:
            next_i = 0

            async def worker() -> None:
                nonlocal next_i
                while next_i < n:
                    i = next_i
                    next_i += 1
                    await do(i)

            async with trio.open_nursery() as nursery:
                for _ in range(min(conc, n)):
                    nursery.start_soon(worker)
        else:
            rng = random.Random(args.seed)
            sem = trio.Semaphore(conc)
            rate, shape = level.request_rate, args.burstiness

            async def capped(i: int) -> None:
                async with sem:
                    await do(i)

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(capped, i)
                    if math.isfinite(rate) and i + 1 < n:
                        await trio.sleep(rng.gammavariate(shape, 1.0 / (rate * shape)))
        duration = time.perf_counter() - t0
    return [r for r in results if r is not None], duration, peak


async def warmup(args: argparse.Namespace, prompt: str) -> RequestResult:
    """One unmeasured request of the benchmark's shape."""
    url = args.base_url.rstrip("/") + (args.endpoint or BACKENDS[args.backend][0])
    async with _client(args, 1) as client:
        return await _one(client, url, prompt, args, -1, time.perf_counter())


# --------------------------------------------------------------------------------------------
# output


def format_summary(run: dict[str, Any]) -> str:
    """A vLLM-like text block for one level."""
    m = run["metrics"]
    lines = [f"{' ' + run['level'] + ' ':=^60}"]

    def row(label: str, value: Any, fmt: str = "{:.2f}") -> None:
        text = (
            "n/a"
            if value is None or (isinstance(value, float) and math.isnan(value))
            else (fmt.format(value) if isinstance(value, float) else str(value))
        )
        lines.append(f"{label:<44}{text:>16}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if run.get("max_concurrency_observed") is not None:
        row("Most requests in flight:", run["max_concurrency_observed"])
    row("Benchmark duration (s):", m["duration_s"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_token_throughput"])
    if m["goodput"] is not None:
        row("Request goodput (req/s):", m["goodput"])
    if m.get("retried_requests"):
        row("Requests resent (connection closed):", m["retried_requests"])
    if m["output_len_mismatch"]:
        row("Requests with another output length:", m["output_len_mismatch"])
    if not m["tokens_from_server"] and m["completed"]:
        lines.append("(token counts from SSE chunks: the server reported none)")
    for fam, title in (
        ("ttft_ms", "Time to First Token"),
        ("tpot_ms", "Time per Output Token (excl. 1st token)"),
        ("itl_ms", "Inter-token Latency"),
        ("e2el_ms", "End-to-end Latency"),
    ):
        lines.append(f"{' ' + title + ' ':-^60}")
        s = m[fam]
        short = fam[:-3].upper()
        for k, name in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{name} {short} (ms):", s[k])
    lines.append(run["quiet"]["line"])
    for err in run.get("errors", [])[:3]:
        lines.append(f"error: {err}")
    lines.append("=" * 60)
    return "\n".join(lines)


def make_plots(
    runs: Sequence[dict[str, Any]],
    raw: Sequence[Sequence[RequestResult]],
    plot_dir: Path,
    title: str,
) -> list[str]:
    """latency_cdf.png, and with several levels throughput_vs_load.png + ttft_vs_load.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (fam, label) in zip(
        axes.flat,
        (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")),
        strict=True,
    ):
        for run, results in zip(runs, raw, strict=True):
            ok = [r for r in results if r.ok]
            if fam == "itl":
                vals = [g for r in ok for g in r.itl]
            else:
                vals = [v for v in (getattr(r, fam) for r in ok) if v is not None]
            if not vals:
                continue
            xs = sorted(v * 1000.0 for v in vals)
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            xs, ys = [xs[0], *xs], [0.0, *ys]  # the curve starts at 0
            ax.step(xs, ys, where="post", label=run["level"])
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(f"{label} CDF")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = plot_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(str(path))

    if len(runs) > 1:
        open_loop = runs[0]["request_rate"] is not None
        xkey = "request_rate" if open_loop else "concurrency"
        xlabel = "request rate (req/s)" if open_loop else "concurrency"
        xs = [r[xkey] for r in runs]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.plot(xs, [r["metrics"]["output_throughput"] for r in runs], "o-", label="output tok/s")
        ax.plot(
            xs, [r["metrics"]["total_token_throughput"] for r in runs], "s--", label="total tok/s"
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"Throughput vs {xlabel} — {title}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        if not open_loop:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        fig.tight_layout()
        path = plot_dir / "throughput_vs_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(xs, [r["metrics"]["ttft_ms"][stat] for r in runs], style, label=f"TTFT {stat}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(f"TTFT vs {xlabel} — {title}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        if not open_loop:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
        fig.tight_layout()
        path = plot_dir / "ttft_vs_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


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
        if args.save_detailed:
            run["requests"] = [
                {**asdict(r), "tpot": r.tpot} for r in sorted(results, key=lambda r: r.index)
            ]
        out["runs"].append(run)
        raw.append(results)
        print(format_summary(run), flush=True)
    if args.plot_dir:
        out["plots"] = make_plots(out["runs"], raw, Path(args.plot_dir), label)
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


__all__ = [
    "BUNDLED_PROMPTS",
    "PEER_PROMPT",
    "CpuMonitor",
    "RequestResult",
    "compute_metrics",
    "main",
    "meets_slos",
    "parse_goodput",
    "percentile",
    "summarize",
]
