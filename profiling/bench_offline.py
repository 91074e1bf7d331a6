"""Offline throughput: our engine vs transformers' `generate`, in one process and one run.

64 requests of 128 prompt tokens and 128 output tokens (ignore_eos, greedy) on the default model:
- nurserve: every request submitted at once to the engine (continuous batching);
- transformers: one request at a time, and static batches of 8 and 32.
Prints tokens/s and the ratios; `--json` writes them. Check that nothing else runs on the machine:
the script reports the CPU time other processes used during each phase. The machine's own speed
drifts too (a VM: 15-30 % within minutes), so every phase is framed by a measured fp32 matmul rate,
and `--repeats N` runs N rounds of (engine, static batches), each ratio taken within its round.

    python profiling/bench_offline.py [--requests 64] [--hf-serial-requests 64] [--data_type fp32]
        [--repeats 3 --hf-batches 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import runtime  # noqa: F401  (first: its OpenMP defaults apply before torch loads)

# isort: split
import torch

from runtime.model.config import ModelConfig

TEMPLATE = (
    "Request {n:04d}. The following is a report about the history of the city library. The "
    "library was founded years ago by a group of local teachers who wanted every child in town to "
    "have access to books. Over time it grew from a single room into a large building. "
)


class OtherLoad:
    """CPU cores used by processes other than this one, from /proc (Linux)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.total0, self.self0 = self._read()

    @staticmethod
    def _read() -> tuple[float, float]:
        try:
            with open("/proc/stat") as f:
                cpu = [int(x) for x in f.readline().split()[1:]]
            busy = sum(cpu) - cpu[3] - cpu[4]  # minus idle and iowait
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime, all threads
            return busy / os.sysconf("SC_CLK_TCK"), own / os.sysconf("SC_CLK_TCK")
        except OSError:
            return 0.0, 0.0

    def cores(self) -> float:
        total, own = self._read()
        wall = time.perf_counter() - self.t0
        return max(0.0, (total - self.total0) - (own - self.self0)) / max(wall, 1e-9)


@dataclass
class Result:
    name: str
    requests: int
    output_tokens: int
    seconds: float
    other_load_cores: float
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # generated ids per request
    round: int = 0
    speed_before_gflops: float = 0.0  # fp32 matmul rate measured right before the phase
    speed_after_gflops: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


def make_prompts(
    tokenizer_encode: Callable[[str], list[int]], n: int, prompt_len: int
) -> list[list[int]]:
    prompts = []
    for i in range(n):
        ids = tokenizer_encode(TEMPLATE.format(n=i) * 4)
        assert len(ids) >= prompt_len, "template too short"
        prompts.append(ids[:prompt_len])
    return prompts


def run_engine(args: argparse.Namespace, prompts: list[list[int]]) -> Result:
    from runtime.engine.args import EngineArgs
    from runtime.engine.core import EngineCore
    from runtime.engine.loader import load_runner
    from runtime.sampling.params import SamplingParams

    eargs = EngineArgs(
        data_type=args.data_type,
        max_total_token_num=len(prompts) * (args.prompt_len + args.output_len + 8),
        running_max_req_size=len(prompts),
        batch_max_tokens=args.batch_max_tokens,
        num_threads=args.threads,
    )
    runner, tokenizer = load_runner(eargs)
    core = EngineCore(runner, tokenizer, eargs)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    warm = core.new_request(
        0, prompts[0][:16], SamplingParams(max_new_tokens=4, ignore_eos=True), False
    )
    core.submit(warm)
    while not warm.done:
        core.step()
    reqs = [core.new_request(i + 1, p, params, score=False) for i, p in enumerate(prompts)]
    load = OtherLoad()
    t0 = time.perf_counter()
    for r in reqs:
        core.submit(r)
    n_tokens = 0
    while not all(r.done for r in reqs):
        n_tokens += len(core.step())
    seconds = time.perf_counter() - t0
    outputs = [list(r.seqs[0].output_ids) for r in reqs]
    return Result(
        "nurserve engine (continuous batching)", len(reqs), n_tokens, seconds, load.cores(), outputs
    )


def run_hf(
    args: argparse.Namespace, prompts: list[list[int]], batch: int, n_requests: int
) -> Result:
    import transformers

    from runtime.loading.default_model import default_model_dir

    dtype = torch.bfloat16 if args.data_type == "bf16" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir(), dtype=dtype
    ).eval()
    if args.data_type == "fp16":
        # ours keeps fp16-stored weight matrices (and embedding) with fp32 activations and sums;
        # transformers has no such CPU mode (a whole-fp16 model crawls without native fp16
        # arithmetic), so it gets the same weights, rounded to fp16, in fp32: both sides then
        # compute the same function in fp32, only the weights' storage differs
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.copy_(p.half().float())
    gen = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False)
    with torch.no_grad():  # warm-up
        model.generate(torch.tensor([prompts[0][:16]]), max_new_tokens=4, do_sample=False)
    load = OtherLoad()
    t0 = time.perf_counter()
    n_tokens = 0
    outputs: list[list[int]] = []
    with torch.no_grad():
        for i in range(0, n_requests, batch):
            ids = torch.tensor(prompts[i : i + batch])  # [b, prompt_len], equal lengths: no padding
            out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, **gen)
            n_tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
            outputs.extend(out[:, ids.shape[1] :].tolist())
    seconds = time.perf_counter() - t0
    name = "transformers one at a time" if batch == 1 else f"transformers static batch {batch}"
    return Result(name, n_requests, n_tokens, seconds, load.cores(), outputs)


def workload_flops(cfg: ModelConfig, requests: int, prompt_len: int, output_len: int) -> float:
    """Multiply-add FLOPs the benchmark needs, whoever runs it: every fed token through the
    projections and attention, and the LM head for every sampled token (prefill rows need none)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    qkv = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    per_layer = qkv + cfg.num_heads * hd * h + 3 * h * cfg.intermediate_size
    fed = prompt_len + output_len - 1  # the last token is sampled, never fed back
    proj = 2.0 * per_layer * cfg.num_layers * fed
    # scores and P @ V: 4 * heads * head_dim per (query, key) pair, keys up to the query
    attn = 4.0 * cfg.num_heads * hd * cfg.num_layers * fed * (fed + 1) / 2
    head = 2.0 * h * cfg.vocab_size * output_len
    return requests * (proj + attn + head)


def fp32_peak_gflops(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate now (best of `repeats` square matmuls), GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[int, float]:
    """(requests whose greedy tokens are identical, mean length of the common prefix)."""
    same = 0
    prefix = 0
    for a, b in zip(ours, theirs, strict=False):
        n = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        same += a == b
        prefix += n
    return same, prefix / max(1, min(len(ours), len(theirs)))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--hf-serial-requests", type=int, default=64, help="requests for the one-at-a-time baseline"
    )
    ap.add_argument("--hf-batches", type=int, nargs="*", default=[8, 32])
    ap.add_argument(
        "--data_type",
        default=None,
        help="fp32 (CPU default) or bf16, for both sides; fp16: fp16-stored weights, fp32 arithmetic "
        "(transformers: the same fp16-rounded weights in fp32)",
    )
    ap.add_argument("--batch-max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of (engine, HF static batches); this VM's speed drifts by 15-30 %% within "
        "minutes, so compare each round's runs, and look at the probes around each phase",
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from runtime.loading.default_model import default_model_dir
    from runtime.text.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(default_model_dir())
    prompts = make_prompts(lambda s: tok.encode(s), args.requests, args.prompt_len)
    flops = workload_flops(
        ModelConfig.from_dir(default_model_dir()), args.requests, args.prompt_len, args.output_len
    )

    results: list[Result] = []

    def phase(run: Callable[[], Result], round_no: int) -> Result:
        before = fp32_peak_gflops()  # the machine's speed right before the phase (it drifts)
        r = run()
        r.round, r.speed_before_gflops, r.speed_after_gflops = round_no, before, fp32_peak_gflops()
        results.append(r)
        print(f"round {round_no}: {r.name}: {r.tok_s:.1f} tok/s", flush=True)
        return r

    for rnd in range(args.repeats):
        phase(lambda: run_engine(args, prompts), rnd)
        if not args.skip_hf:
            for b in args.hf_batches:
                phase(lambda b=b: run_hf(args, prompts, b, args.requests), rnd)
    if not args.skip_hf and args.hf_serial_requests > 0:
        n_serial = min(args.hf_serial_requests, args.requests)
        phase(lambda: run_hf(args, prompts, 1, n_serial), 0)

    ours_by_round = {r.round: r for r in results if r.name.startswith("nurserve")}
    print(
        f"\n{'round':>5s} {'system':40s} {'reqs':>5s} {'tokens':>7s} {'s':>7s} {'tok/s':>7s} "
        f"{'ours/x':>7s} {'other load':>10s} {'CPU GFLOP/s before-after':>25s} {'share of it':>11s}"
    )
    for r in results:
        ours = ours_by_round[r.round].tok_s
        speed = (r.speed_before_gflops + r.speed_after_gflops) / 2
        share = flops / args.requests / (r.seconds / r.requests) / 1e9 / speed
        print(
            f"{r.round:5d} {r.name:40s} {r.requests:5d} {r.output_tokens:7d} {r.seconds:7.1f} "
            f"{r.tok_s:7.1f} {ours / r.tok_s:7.2f} {r.other_load_cores:8.2f} c "
            f"{r.speed_before_gflops:12.0f} - {r.speed_after_gflops:<10.0f} {share:10.1%}"
        )
    ratios: dict[str, list[float]] = {}
    for rnd, ours_r in ours_by_round.items():
        hf = [r for r in results if r.round == rnd and r is not ours_r]
        static = [r for r in hf if "static" in r.name]
        if static:
            best = max(static, key=lambda r: r.tok_s)
            ratios.setdefault("best static batch", []).append(ours_r.tok_s / best.tok_s)
        for r in hf:
            ratios.setdefault(r.name, []).append(ours_r.tok_s / r.tok_s)
    print("\nours / x, per round (each against the same round's engine run):")
    for name, values in ratios.items():
        med = sorted(values)[len(values) // 2]
        print(f"  {name:40s} {' '.join(f'{v:.2f}x' for v in values)}   median {med:.2f}x")
    print(
        f"\nwork: {flops / 1e12:.2f} TFLOP per {args.requests} requests (projections, attention, LM "
        "head); 'share of it': that work's rate over the fp32 matmul rate measured around the phase"
    )

    print("\ngreedy tokens, ours vs transformers (same prompts; fp32 sums in a different order can")
    print("flip a near-tie, after which a sequence goes its own way):")
    agree = {}
    for r in results:
        if r.name.startswith("nurserve"):
            continue
        same, mean_prefix = agreement(ours_by_round[r.round].outputs, r.outputs)
        agree[f"{r.name} (round {r.round})"] = {
            "identical": same,
            "compared": len(r.outputs),
            "mean_prefix": mean_prefix,
        }
        print(
            f"  round {r.round} {r.name:32s} identical {same}/{len(r.outputs)}, mean common prefix {mean_prefix:.1f} tokens"
        )
    quiet = all(r.other_load_cores < 0.1 for r in results)
    print(
        f"\nmachine quiet during the run: {'yes' if quiet else 'NO'} (other processes' CPU per phase above)"
    )
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, dtype {args.data_type or 'fp32'}"
        + (
            " (fp16-stored weights, fp32 activations and sums; transformers: the same weights in fp32)"
            if args.data_type == "fp16"
            else ""
        )
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "results": [
                        {k: v for k, v in asdict(r).items() if k != "outputs"} | {"tok_s": r.tok_s}
                        for r in results
                    ],
                    "agreement": agree,
                    "ratios": ratios,
                    "workload_tflop": flops / 1e12,
                    "quiet": quiet,
                    "args": vars(args),
                },
                default=str,
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
