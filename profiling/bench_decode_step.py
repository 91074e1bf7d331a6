"""Decode step of the default model per CPU weight mode, against its weight-read floor.

Each mode's engine runner (`--quant_type` / `--quant_mode` / `--data_type` as the server would
load it) decodes `--batch` sequences (1 by default) together; a step is prepare + forward + LM head + greedy sample. The floor is
the model's weight bytes over this machine's copy bandwidth (a 256 MB `copy_`), measured in the
same run. Rounds interleave the modes (the VM drifts 15-30 % within minutes): medians and ranges.

    python profiling/bench_decode_step.py [--rounds 5] [--steps 30] [--batch 1] [--modes exact ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.engine.args import EngineArgs  # noqa: E402
from runtime.engine.loader import load_runner  # noqa: E402
from runtime.model.batch import SeqChunk  # noqa: E402
from runtime.model.memory import weight_bytes  # noqa: E402
from runtime.model.runner import ModelRunner  # noqa: E402
from runtime.sampling.params import SamplingParams  # noqa: E402
from runtime.sampling.sampler import RowState, Sampler, build_sampling_batch  # noqa: E402

MODES: dict[str, dict[str, str]] = {
    "exact": {"quant_type": "auto", "quant_mode": "exact"},
    "int16": {"quant_type": "auto", "quant_mode": "int16"},
    "int16-layers": {"quant_type": "auto", "quant_mode": "int16", "cpu_decode": "layers"},
    "fast": {"quant_type": "auto", "quant_mode": "fast"},
    "fp16": {"quant_type": "none", "data_type": "fp16"},
    "fp32": {"quant_type": "none", "data_type": "fp32"},
}


def copy_bandwidth_bytes_s(n_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best read bandwidth of a `copy_` of `n_bytes` (read once, written once)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return n_bytes / best


class Decoder:
    """Sequences decoded together step by step through a runner (the engine's path, minus
    scheduling): sequence i holds slots [i * capacity, (i + 1) * capacity)."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], capacity: int) -> None:
        self.runner, self.sampler = runner, Sampler(greedy=runner.model.ops.greedy)
        self.slots = [list(range(i * capacity, (i + 1) * capacity)) for i in range(len(prompts))]
        self.pos = [len(p) for p in prompts]
        self.rows = [RowState.start(SamplingParams(), p) for p in prompts]
        chunks = [SeqChunk(p, 0, s) for p, s in zip(prompts, self.slots, strict=True)]
        self.tokens = self._sample(runner.run(runner.prepare(chunks)))

    def _sample(self, hidden: torch.Tensor) -> list[int]:
        logits = self.runner.logits(hidden)  # [B, V]
        batch = build_sampling_batch(self.rows, self.runner.eos_ids, logits.shape[-1], "cpu")
        return [int(t) for t in self.sampler.sample(logits, batch)[0]]

    def step(self) -> float:
        """One decode step; its wall seconds."""
        t0 = time.perf_counter()
        chunks = [
            SeqChunk([t], p, s) for t, p, s in zip(self.tokens, self.pos, self.slots, strict=True)
        ]
        self.tokens = self._sample(self.runner.run(self.runner.prepare(chunks)))
        self.pos = [p + 1 for p in self.pos]
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per mode and round")
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    capacity = 64 + args.rounds * (args.steps + 2)  # slots per sequence
    decoders: dict[str, Decoder] = {}
    floors: dict[str, float] = {}
    for mode in args.modes:
        cfg = EngineArgs(max_total_token_num=capacity * args.batch, **MODES[mode])
        runner, tok = load_runner(cfg)
        prompts = [
            tok.encode(f"Write story {i} about a lighthouse keeper.") for i in range(args.batch)
        ]
        decoders[mode] = Decoder(runner, prompts, capacity)
        floors[mode] = weight_bytes(runner.model, per_decode_step=True)
    steps: dict[str, list[float]] = {m: [] for m in args.modes}
    bandwidth: list[float] = []
    for _ in range(args.rounds):
        bandwidth.append(copy_bandwidth_bytes_s())
        for mode, dec in decoders.items():
            dec.step()  # warm
            steps[mode].append(statistics.median(dec.step() for _ in range(args.steps)))
    bw = statistics.median(bandwidth)
    print(
        f"copy bandwidth {bw / 1e9:.1f} GB/s (range {min(bandwidth) / 1e9:.1f}-"
        f"{max(bandwidth) / 1e9:.1f}); {args.rounds} rounds x {args.steps} steps, "
        f"batch {args.batch}"
    )
    print("| mode | weights MB | floor ms | step ms (median of rounds) | range ms | step / floor |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        floor_s = floors[mode] / bw
        med = statistics.median(steps[mode])
        print(
            f"| {mode} | {floors[mode] / 1e6:.1f} | {floor_s * 1e3:.2f} | {med * 1e3:.2f} | "
            f"{min(steps[mode]) * 1e3:.2f}-{max(steps[mode]) * 1e3:.2f} | {med / floor_s:.2f} |"
        )


if __name__ == "__main__":
    main()
