"""Batch-1 decode step of the default model per CPU weight mode, against its weight-read floor.

Each mode's engine runner (`--quant_type` / `--quant_mode` / `--data_type` as the server would
load it) decodes one sequence; a step is prepare + forward + LM head + greedy sample. The floor is
the model's weight bytes over this machine's copy bandwidth (a 256 MB `copy_`), measured in the
same run. Rounds interleave the modes (the VM drifts 15-30 % within minutes): medians and ranges.

    python profiling/bench_decode_step.py [--rounds 5] [--steps 30] [--modes exact fp16 ...]
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
    """One sequence decoded step by step through a runner (the engine's path, minus scheduling)."""

    def __init__(self, runner: ModelRunner, prompt: list[int], capacity: int) -> None:
        self.runner, self.sampler = runner, Sampler()
        self.slots = list(range(capacity))
        self.pos = len(prompt)
        self.rows = [RowState.start(SamplingParams(), prompt)]
        self.token = self._sample(runner.run(runner.prepare([SeqChunk(prompt, 0, self.slots)])))

    def _sample(self, hidden: torch.Tensor) -> int:
        logits = self.runner.logits(hidden)  # [1, V]
        batch = build_sampling_batch(self.rows, self.runner.eos_ids, logits.shape[-1], "cpu")
        return int(self.sampler.sample(logits, batch)[0][0])

    def step(self) -> float:
        """One decode step; its wall seconds."""
        t0 = time.perf_counter()
        batch = self.runner.prepare([SeqChunk([self.token], self.pos, self.slots)])
        self.token = self._sample(self.runner.run(batch))
        self.pos += 1
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per mode and round")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    capacity = 64 + args.rounds * (args.steps + 2)
    decoders: dict[str, Decoder] = {}
    floors: dict[str, float] = {}
    for mode in args.modes:
        runner, tok = load_runner(EngineArgs(max_total_token_num=capacity, **MODES[mode]))
        prompt = tok.encode("Write a short story about a lighthouse keeper.")
        decoders[mode] = Decoder(runner, prompt, capacity)
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
        f"{max(bandwidth) / 1e9:.1f}); {args.rounds} rounds x {args.steps} steps"
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
