"""Decode benchmarks on a borrowed GPU (random weights): eager vs CUDA graphs, length buckets, Triton
attention, the Numba penalty kernel in and out of a graph, and a device copy as the bandwidth roof.

    PYTHONPATH=. python profiling/gpu_bench.py bench --out $OUT/gpu_bench.json
    PYTHONPATH=. python profiling/gpu_bench.py report --tests T.json --bench B.json --out $OUT/gpu_results
    PYTHONPATH=. python profiling/gpu_bench.py bench --device cpu --quick   # CPU dry run of the logic
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    SHAPES,
    attention_backend,
    decode_batch,
    env_info,
    free,
    load_json,
    penalty_inputs,
    random_model,
    section,
    time_it,
    weight_bytes,
)

from runtime.kernels.triton import decode_attention as ta  # noqa: E402
from runtime.model.batch import ForwardBatch  # noqa: E402
from runtime.model.graphs import GraphRunner, length_buckets  # noqa: E402
from runtime.model.kv_pool import KVPool  # noqa: E402
from runtime.model.llama import CausalLM  # noqa: E402


# ---- benchmarks --------------------------------------------------------------------------------
def bench_copy(entry: dict[str, Any], device: str, gib: float) -> None:
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = time_it(lambda: dst.copy_(src), device, 10)
    entry.update(bytes=n, seconds_per_copy=t, gbps_read_plus_write=2 * n / t / 1e9)


def make_step(
    model: CausalLM, pool: KVPool, runner: GraphRunner | None, batch: ForwardBatch
) -> Callable[[], object]:
    """One decode step as the engine runs it: hidden rows (graph or eager), then the LM head."""
    if runner is not None:
        return lambda: model.logits_from_hidden(runner.run(batch))
    return lambda: model.logits_from_hidden(model.hidden(batch, pool))


def bench_decode(
    entry: dict[str, Any], shape: str, a: argparse.Namespace, roof: float | None
) -> None:
    """Step time per (batch, context) for eager / graph max-length / graph length-buckets / Triton."""
    dev, dtype = a.device, (torch.bfloat16 if a.device.startswith("cuda") else torch.float32)
    model = random_model(shape, dtype, dev)
    cfg = model.config
    batches, ctxs, max_len = a.batches, a.ctxs, a.max_len
    span = max(ctxs) + 2
    pool = KVPool(cfg, max(batches) * span, dtype, dev)
    wbytes, per_tok = weight_bytes(model), KVPool.bytes_per_token(cfg, dtype)
    entry.update(shape=shape, weight_bytes=wbytes, kv_bytes_per_token=per_tok, rows=[])
    tri = ta.available() and (dev.startswith("cuda") or ta._interpret())
    modes: list[tuple[str, list[int] | None, bool]] = [("eager", None, False)]
    modes += [
        ("graph_maxlen", [max_len], False),
        ("graph_lenbuckets", length_buckets(max_len), False),
    ]
    if tri:
        modes += [
            ("eager_triton", None, True),
            ("graph_lenbuckets_triton", length_buckets(max_len), True),
        ]
    gen = torch.Generator().manual_seed(1)
    for mode, lens_b, use_tri in modes:
        with attention_backend(model, use_tri):
            runner = None
            if lens_b is not None:
                runner = GraphRunner(
                    model,
                    pool,
                    max(batches),
                    max_len,
                    True,
                    dev,
                    batch_buckets=batches,
                    len_buckets=lens_b,
                    progress=False,
                )
                runner.capture()
                entry[f"{mode}_capture_s"] = round(runner.capture_seconds, 2)
            for ctx in ctxs:
                for b in batches:
                    toks = torch.randint(0, cfg.vocab_size, (b,), generator=gen).tolist()
                    batch = decode_batch(toks, [ctx - 1] * b, span, pool.pad_slot, dev)
                    if runner is not None:
                        assert runner.can_run(batch), (mode, b, ctx)
                    step = make_step(model, pool, runner, batch)
                    t = time_it(step, dev, a.iters)
                    moved = wbytes + b * ctx * per_tok
                    row = {
                        "mode": mode,
                        "batch": b,
                        "ctx": ctx,
                        "ms": round(t * 1e3, 3),
                        "tok_per_s": round(b / t, 1),
                        "gbps": round(moved / t / 1e9, 1),
                    }
                    if runner is not None:
                        row["bucket"] = list(runner.bucket_for(batch) or ())
                    if roof:
                        row["frac_of_copy"] = round(moved / t / 1e9 / roof, 3)
                    entry["rows"].append(row)
                    print(f"[{shape}] {row}", flush=True)
            del runner
            free(dev)
    del model, pool
    free(dev)


def bench_default_capture(entry: dict[str, Any], a: argparse.Namespace) -> None:
    """Start-up cost of the default buckets (46 batch x length buckets) on the small model."""
    dev = a.device
    model = random_model(a.shapes[0], torch.bfloat16, dev)
    pool = KVPool(model.config, 4096, torch.bfloat16, dev)
    before = torch.cuda.memory_reserved() if dev.startswith("cuda") else 0
    runner = GraphRunner(model, pool, 256, a.max_len, True, dev, progress=False)
    runner.capture()
    after = torch.cuda.memory_reserved() if dev.startswith("cuda") else 0
    entry.update(
        graphs=len(runner.keys()),
        batch_buckets=len(runner.batch_buckets),
        len_buckets=runner.len_buckets,
        capture_s=round(runner.capture_seconds, 2),
        pool_mib=round((after - before) / 2**20, 1),
    )
    del runner, model, pool
    free(dev)


def bench_penalties(entry: dict[str, Any], a: argparse.Namespace) -> None:
    """Numba kernel launched eagerly vs replayed from a CUDA graph, and the torch twin."""
    from cuda import penalties, penalties_numba

    dev = a.device
    arrays = penalty_inputs(64, SHAPES[a.shapes[0]]["vocab_size"], 256, dev)
    t = {k: torch.from_numpy(v).to(dev) for k, v in arrays.items()}
    base = t["logits"].clone()
    args = [t[k] for k in list(arrays)[1:]]
    entry["torch_twin_ms"] = (
        time_it(lambda: penalties.apply_penalties_(t["logits"], *args), dev, a.iters) * 1e3
    )
    if not (dev.startswith("cuda") and penalties_numba.available()):
        entry["numba"] = "skipped: numba-cuda or a GPU is missing"
        return
    kernel = penalties_numba.apply_penalties_cuda_
    entry["numba_eager_ms"] = time_it(lambda: kernel(t["logits"], *args), dev, a.iters) * 1e3
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            kernel(t["logits"], *args)  # compile before capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            kernel(t["logits"], *args)
        entry["numba_graph_ms"] = time_it(graph.replay, dev, a.iters) * 1e3
        t["logits"].copy_(base)
        graph.replay()
        got = t["logits"].clone()
        t["logits"].copy_(base)
        kernel(t["logits"], *args)
        entry["graph_equals_eager"] = bool(torch.equal(got, t["logits"]))
    except Exception as e:
        entry["numba_graph"] = f"capture failed: {type(e).__name__}: {e}"


# ---- report ------------------------------------------------------------------------------------
def report(
    tests: dict[str, Any],
    bench: dict[str, Any],
    env: dict[str, Any],
    steps: list[list[str]],
    out: Path,
) -> None:
    """Merge into `out.json` and write a short markdown summary `out.md`."""
    merged = {"env": env, "steps": steps, "tests": tests, "bench": bench}
    out.with_suffix(".json").write_text(json.dumps(merged, indent=1, default=str))
    lines = ["# GPU check results", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "| step | exit code (124 = timeout) | seconds |", "|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in steps]
    lines += ["", "## Checks", "", "| check | ok | seconds | details |", "|---|---|---|---|"]
    for name, r in tests.get("checks", {}).items():
        detail = r.get("error") or r.get("skipped") or r.get("summary", "")
        detail = str(detail)[:200].replace("|", "\\|")
        lines.append(f"| {name} | {r.get('ok')} | {r.get('seconds')} | {detail} |")
    copy = bench.get("copy", {}).get("gbps_read_plus_write")
    lines += ["", f"Device copy (read + write): {copy and round(copy, 1)} GB/s", ""]
    for key, sec in bench.items():
        if not key.startswith("decode_") or not sec.get("rows"):
            if key.startswith("decode_"):
                lines.append(f"{key}: {sec.get('error', 'no rows')}")
            continue
        lines += [f"## {key} (ms per decode step, incl. LM head; GB/s of weights + live KV)", ""]
        modes = list(dict.fromkeys(r["mode"] for r in sec["rows"]))
        lines += ["| batch | ctx | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
        cells: dict[tuple[int, int], dict[str, str]] = {}
        for r in sec["rows"]:
            cells.setdefault((r["batch"], r["ctx"]), {})[r["mode"]] = f"{r['ms']} ({r['gbps']})"
        for (b, c), row in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            lines.append(f"| {b} | {c} | " + " | ".join(row.get(m, "-") for m in modes) + " |")
        lines.append("")
    for key in ("default_capture", "penalties"):
        if key in bench:
            shown = {k: v for k, v in bench[key].items() if k != "trace"}
            lines += [f"{key}: {json.dumps(shown, default=str)}", ""]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["bench", "report"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU dry run)")
    ap.add_argument("--shapes", nargs="+", default=["smollm2-135m", "llama3-8b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--ctxs", nargs="+", type=int, default=[200, 1000, 3000])
    ap.add_argument("--max-len", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--copy-gib", type=float, default=2.0)
    ap.add_argument("--only", nargs="*", default=None, help="sections to run")
    ap.add_argument("--tests", type=Path)
    ap.add_argument("--bench", type=Path)
    ap.add_argument("--steps", type=Path, help="TSV of step, exit code, seconds (gpu_check.sh)")
    ap.add_argument("--out", type=Path, default=Path("gpu_bench.json"))
    a = ap.parse_args()
    if a.quick:
        a.shapes, a.batches, a.ctxs, a.max_len, a.iters, a.copy_gib = (
            ["tiny"],
            [1, 3],
            [20],
            64,
            2,
            0.01,
        )
    if a.what == "report":
        steps = [ln.split("\t") for ln in a.steps.read_text().splitlines()] if a.steps else []
        report(load_json(a.tests), load_json(a.bench), env_info(a.device), steps, a.out)
        return
    res: dict[str, Any] = {"env": env_info(a.device)}

    def want(name: str) -> bool:
        return a.only is None or name in a.only

    roof = None
    if want("copy"):
        with section(res, "copy") as e:
            bench_copy(e, a.device, a.copy_gib)
        roof = res["copy"].get("gbps_read_plus_write")
    if want("penalties"):
        with section(res, "penalties") as e:
            bench_penalties(e, a)
    for shape in a.shapes:
        if want("decode"):
            with section(res, f"decode_{shape}") as e:
                bench_decode(e, shape, a, roof)
        a.out.write_text(json.dumps(res, indent=1, default=str))
    if want("capture") and a.device.startswith("cuda"):
        with section(res, "default_capture") as e:
            bench_default_capture(e, a)
    a.out.write_text(json.dumps(res, indent=1, default=str))
    failed = [k for k, v in res.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"wrote {a.out}; failed sections: {failed}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
