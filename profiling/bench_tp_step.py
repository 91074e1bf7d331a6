"""Tensor parallelism's cost on this machine: the decode step at `--tp 1` and `--tp N` (in
process, rank 0 here, the workers spawned as the server spawns them), and what one all-reduce
of a decode step's activations costs over the group.

    python profiling/bench_tp_step.py --tp 2 --batch 1 8 32

A `--tp N` decode step runs 2 all-reduces per layer (o and down), one for the embedding and a
logits gather: 2 * 30 + 2 = 62 collectives per step on SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from runtime.engine.args import EngineArgs
from runtime.engine.loader import load_runner
from runtime.model.batch import SeqChunk
from runtime.model.runner import ModelRunner
from runtime.parallel.group import join_group, leave_group, open_store

HIDDEN = 576  # SmolLM2-135M's hidden size
ALL_REDUCE_REPS = 300
CONTEXT_TOKENS = 64  # tokens already cached per sequence when the decode steps are timed


def decode_step_ms(runner: ModelRunner, batch: int, steps: int) -> float:
    """Median wall time (ms) of a decode step of `batch` sequences (logits included)."""
    width = CONTEXT_TOKENS + 1
    slots = [list(range(i * width, (i + 1) * width)) for i in range(batch)]
    prefill = [SeqChunk([1] * CONTEXT_TOKENS, 0, s, want_logits=False) for s in slots]
    runner.run(runner.prepare(prefill))
    chunks = [SeqChunk([1], CONTEXT_TOKENS, s) for s in slots]
    times = []
    for _ in range(steps):
        fb = runner.prepare(chunks)
        t0 = time.perf_counter()
        runner.logits(runner.run(fb))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def all_reduce_us(rank: int, port: int, rows: int, hidden: int, reps: int) -> float:
    """Median µs of one all-reduce of `[rows, hidden]` fp32 between two processes over gloo."""
    store = open_store(2, None if rank == 0 else port)
    peer = None
    if rank == 0:
        cmd = [sys.executable, __file__, "--peer-port", str(store.port), "--batch", str(rows)]
        peer = subprocess.Popen(cmd)
    join_group(store, rank, 2, torch.device("cpu"))
    x = torch.ones(rows, hidden)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dist.all_reduce(x)
        times.append(time.perf_counter() - t0)
    dist.barrier()
    if peer is not None:
        peer.wait()
    leave_group()
    return 1e6 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--data_type", default=None, help="as the server's flag (unset: fp16 weights)")
    ap.add_argument("--peer-port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_port is not None:  # rank 1 of the all-reduce timing
        torch.set_num_threads(1)
        all_reduce_us(1, args.peer_port, args.batch[0], HIDDEN, ALL_REDUCE_REPS)
        return
    for b in args.batch:
        us = all_reduce_us(0, 0, b, HIDDEN, ALL_REDUCE_REPS)
        print(f"gloo all-reduce of [{b}, {HIDDEN}] fp32 between 2 processes: {us:.0f} us")
    capacity = max(args.batch) * (CONTEXT_TOKENS + 1) + 1
    threads = torch.get_num_threads()
    # --tp 1 as served (all cores), --tp 1 on one core (what each --tp 2 rank gets), --tp N
    for tp, num_threads in ((1, None), (1, 1), (args.tp, None)):
        torch.set_num_threads(threads)
        engine_args = EngineArgs(
            tp=tp, data_type=args.data_type, max_total_token_num=capacity, num_threads=num_threads
        )
        runner, _ = load_runner(engine_args)
        label = f"tp={tp} threads/rank={torch.get_num_threads()}"
        try:
            for b in args.batch:
                ms = decode_step_ms(runner, b, args.steps)
                print(f"{label} batch={b}: decode step {ms:.1f} ms ({b / ms * 1e3:.0f} tok/s)")
        finally:
            runner.close()


if __name__ == "__main__":
    main()
