#!/usr/bin/env python3
"""Greedy sampling on the CPU: the sampler's torch ops against the one-pass Numba kernel.

    python profiling/bench_sampler.py                     # V = 49,152 (SmolLM2), B = 1, 8, 32
    python profiling/bench_sampler.py --vocab 151936 --rows 1 4 --rounds 7

Both compute each row's argmax and its log-softmax (what `Sampler.sample` returns for an
all-greedy batch: torch's `argmax` + `gather` + `logsumexp`, or `Backends.greedy`). Rounds
interleave the two; each round's figure is the median of `--reps` calls; the table gives the
median over rounds and its range (these VMs drift 15-30 % within minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from runtime.kernels.cpu import sample_greedy
from runtime.sampling.sampler import greedy_logprob


def time_ms(fn: Callable[[Tensor], object], x: Tensor, reps: int) -> float:
    """Median milliseconds of `reps` calls."""
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(x)
        out.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=49_152, help="logits per row")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32], help="batch sizes")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--reps", type=int, default=200, help="calls per round and path")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    paths = {"torch": greedy_logprob, "kernel": sample_greedy.greedy_logprob_torch}
    print(f"greedy + logprob, V = {args.vocab}, {args.threads} threads; ms per call")
    print("| B | torch p50 (range) | kernel p50 (range) | speed-up |")
    print("|---|---|---|---|")
    for rows in args.rows:
        x = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(rows)) * 4
        tokens, logprob = sample_greedy.greedy_logprob_torch(x)  # compile, and check
        ref_tokens, ref_logprob = greedy_logprob(x)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logprob, ref_logprob, rtol=1e-5, atol=2e-5)
        figures: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, fn in paths.items():
                figures[name].append(time_ms(fn, x, args.reps))
        cells = []
        for name in paths:
            f = figures[name]
            cells.append(f"{statistics.median(f):.3f} ({min(f):.3f}-{max(f):.3f})")
        ratio = statistics.median(figures["torch"]) / statistics.median(figures["kernel"])
        print(f"| {rows} | {cells[0]} | {cells[1]} | {ratio:.1f}x |")


if __name__ == "__main__":
    main()
