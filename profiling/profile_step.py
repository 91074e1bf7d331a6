"""Where a step's time goes: per-phase timing of the engine loop, plus an optional torch.profiler trace.

Runs `--concurrency` requests through the Trio engine (the same path the HTTP server drives) and
reports, per step, the wall time of each phase: schedule, prepare (plan -> tensors), forward,
sample (with its one host sync), detokenize (+ stop matching, event building), update (load
figures), deliver (events into the requests' channels on the Trio thread) and trio (everything else
on the Trio side between steps: request tasks, encoding, sending).

    python profiling/profile_step.py --concurrency 32 --prompt-len 128 --output-len 64 \
        [--trace /tmp/trace.json] [--data_type bf16] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import runtime  # noqa: F401  (first: its OpenMP defaults apply before torch loads)

# isort: split
import torch
import trio

from runtime.engine.api import TokenEvent
from runtime.engine.args import EngineArgs
from runtime.engine.async_engine import AsyncEngine
from runtime.sampling.params import SamplingParams

PROMPT = "Request {n:04d}. The following is a report about the history of the city library. " * 8


async def drive(args: argparse.Namespace) -> None:
    engine = AsyncEngine(
        EngineArgs(
            data_type=args.data_type,
            device=args.device,
            max_total_token_num=args.concurrency * (args.prompt_len + args.output_len + 16),
            running_max_req_size=max(args.concurrency, 1),
            batch_max_tokens=args.batch_max_tokens,
        )
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        assert engine.tokenizer is not None and engine.core is not None
        tok = engine.tokenizer
        prompts = [
            tok.encode(PROMPT.format(n=i))[: args.prompt_len] for i in range(args.concurrency)
        ]
        params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
        n_tokens = 0

        async def one(ids: list[int]) -> None:
            nonlocal n_tokens
            async with engine.generate(ids, params) as events:
                async for ev in events:
                    if isinstance(ev, TokenEvent):
                        n_tokens += 1

        async with trio.open_nursery() as warm:  # warm-up, not measured
            warm.start_soon(one, prompts[0][:8])
        n_tokens = 0
        core = engine.core
        core.timer.reset()
        steps0 = engine.steps_done
        prof = None
        if args.trace:
            prof = torch.profiler.profile(record_shapes=False)
            prof.__enter__()
        t0 = time.perf_counter()
        async with trio.open_nursery() as reqs:
            for ids in prompts:
                reqs.start_soon(one, ids)
        wall_s = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(str(args.trace))
        steps = engine.steps_done - steps0
        totals = dict(core.timer.totals_s)
        nursery.cancel_scope.cancel()
    accounted = sum(totals.values())
    print(
        f"{args.concurrency} requests x {args.output_len} tokens: {n_tokens} tokens in {wall_s:.2f} s "
        f"= {n_tokens / wall_s:.1f} tok/s over {steps} steps ({wall_s / max(steps, 1) * 1e3:.2f} ms/step)"
    )
    print(f"{'phase':12s} {'ms/step':>9s} {'share':>7s}")
    for phase, total in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"{phase:12s} {total / max(steps, 1) * 1e3:9.3f} {total / max(accounted, 1e-9):7.1%}")
    if prof is not None:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        print(f"trace written to {args.trace}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batch-max-tokens", type=int, default=None)
    ap.add_argument("--data_type", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument(
        "--trace", type=Path, default=None, help="export a torch.profiler chrome trace here"
    )
    trio.run(drive, ap.parse_args())


if __name__ == "__main__":
    main()
