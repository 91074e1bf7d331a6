"""Time the GGUF block-format linear kernels on the default model's shapes against fbgemm fp16
and this machine's copy bandwidth (measured in the same run, interleaved with the kernels).

    PYTHONPATH=. .venv/bin/python profiling/bench_quant.py [--quick]

Prints per (shape, format, T): median time per call and its range over rounds for exact, fast
and fp16, the weight bytes and the bandwidth achieved (weight bytes / time) as a fraction of
the copy bandwidth; then one decode step's sum (30 layers of qkv, o, gate_up, down plus the head
at T=1) against the weight-read floor (total weight bytes / copy bandwidth).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from runtime.kernels.cpu import quant as Q
from runtime.kernels.cpu import quant_linear as QL

SHAPES = [  # (name, out, in, format)
    ("o 576x576", 576, 576, "q4_1"),
    ("k 192x576", 192, 576, "q4_1"),
    ("gate 1536x576", 1536, 576, "q4_1"),
    ("down 576x1536", 576, 1536, "q4_1"),
    ("head 49152x576", 49152, 576, "q8_0"),
]
STEP = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536)]
N_LAYERS = 30


def _time_s(fn: Callable[[], Any], reps: int) -> float:
    """Median seconds per call over `reps` calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_bandwidth_bps(src: torch.Tensor, dst: torch.Tensor) -> float:
    """Bytes read per second by `dst.copy_(src)` (each byte is read once and written once)."""
    return src.nbytes / _time_s(lambda: dst.copy_(src), 3)


def _fp16_fn(w: torch.Tensor, x: torch.Tensor) -> Callable[[], Any]:
    ops: Any = torch.ops.quantized
    packed = ops.linear_prepack_fp16(w, None)
    return lambda: ops.linear_dynamic_fp16(x, packed)


def _kernels(m: Q.QuantMatrix, w: torch.Tensor, t: int) -> dict[str, Callable[[], Any]]:
    x = torch.randn(t, m.cols)  # [T, in]
    exact, fast = QL.QuantLinear([m], mode="exact"), QL.QuantLinear([m], mode="fast")
    return {"exact": lambda: exact(x), "fast": lambda: fast(x), "fp16": _fp16_fn(w, x)}


def _fmt(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e6:9.0f} [{min(times) * 1e6:.0f}-{max(times) * 1e6:.0f}]"


def bench_shapes(tokens: list[int], rounds: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """The per-shape table, kernels and copy bandwidth interleaved per round."""
    print(
        f"{'shape':16} {'fmt':5} {'T':>4} {'MB':>6}  kernel  us/call median [range]  GB/s  of copy"
    )
    for name, rows, cols, fmt in SHAPES:
        w = torch.randn(rows, cols) * 0.02  # [out, in]
        m = Q.quantize(w, fmt)
        for t in tokens:
            fns = _kernels(m, w, t)
            reps = max(3, min(200, int(2e8 / (rows * cols * max(t, 8)))))
            times: dict[str, list[float]] = {k: [] for k in fns}
            bws = []
            for _ in range(rounds):
                bws.append(_copy_bandwidth_bps(src, dst))
                for k, fn in fns.items():
                    times[k].append(_time_s(fn, reps))
            bw = statistics.median(bws)
            for k, ts in times.items():
                nbytes = m.nbytes if k != "fp16" else rows * cols * 2
                got = nbytes / statistics.median(ts)
                print(
                    f"{name:16} {fmt:5} {t:4} {nbytes / 1e6:6.2f}  {k:6} {_fmt(ts):>26}"
                    f"  {got / 1e9:4.1f}  {got / bw:5.0%}"
                )
        print(f"  copy bandwidth (read) median {statistics.median(bws) / 1e9:.1f} GB/s")


def _step_s(layers: list[QL.QuantLinear], head: QL.QuantLinear) -> float:
    """Seconds of one decode step at T=1: each projection timed alone, summed over the layers."""
    xs = {c: torch.randn(1, c) for c in (576, 1536)}  # [1, in]
    per_layer = sum(_time_s(functools.partial(m, xs[m.in_features]), 20) for m in layers)
    return N_LAYERS * per_layer + _time_s(functools.partial(head, xs[576]), 5)


def bench_step(rounds: int, src: torch.Tensor, dst: torch.Tensor) -> None:
    """One decode step at T=1: 30 layers' four fused projections plus the Q8_0 head."""
    ws = [Q.quantize(torch.randn(r, c) * 0.02, "q4_1") for _, r, c in STEP]
    table = Q.quantize(torch.randn(49152, 576) * 0.02, "q8_0")
    models = {
        mode: ([QL.QuantLinear([w], mode=mode) for w in ws], QL.QuantLinear([table], mode=mode))
        for mode in ("exact", "fast")
    }
    total_bytes = N_LAYERS * sum(w.nbytes for w in ws) + table.nbytes
    sums: dict[str, list[float]] = {mode: [] for mode in models}
    floors = []
    for _ in range(rounds):
        floors.append(total_bytes / _copy_bandwidth_bps(src, dst))
        for mode, (layers, head) in models.items():
            sums[mode].append(_step_s(layers, head))
    print(f"decode step weights {total_bytes / 1e6:.1f} MB; floor {_fmt(floors)} us")
    for mode, ts in sums.items():
        ratio = statistics.median(ts) / statistics.median(floors)
        print(f"decode step {mode:5}: {_fmt(ts)} us  ({ratio:.2f}x floor)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and token counts")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = (64 if args.quick else 256) << 18  # fp32 elements: 64 or 256 MiB
    src, dst = torch.ones(n), torch.empty(n)
    rounds = 2 if args.quick else 5
    bench_shapes([1, 8] if args.quick else [1, 8, 64, 512], rounds, src, dst)
    bench_step(rounds, src, dst)


if __name__ == "__main__":
    main()
