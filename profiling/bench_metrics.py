"""bench_serving's metrics: percentiles, per-request results, SLOs/goodput, one level's metrics.

The definitions are vLLM `bench serve`'s; see bench_serving.py's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SLO_KEYS = ("ttft", "tpot", "e2el")
METRIC_FAMILIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
STAT_KEYS = ("mean", "median", "p90", "p99", "min", "max", "std")


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


__all__ = [
    "METRIC_FAMILIES",
    "SLO_KEYS",
    "STAT_KEYS",
    "RequestResult",
    "compute_metrics",
    "meets_slos",
    "parse_goodput",
    "percentile",
    "summarize",
]
