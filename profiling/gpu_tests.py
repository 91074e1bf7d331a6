"""GPU correctness checks for the borrowed H100 (random-weight SmolLM2-135M shapes, bf16).

- graph replay vs eager for every captured (batch, length) bucket, and 64 greedy steps per batch size
  (torch attention, then Triton attention inside the graphs);
- Triton decode attention vs the torch reference, eagerly and replayed from a CUDA graph;
- the Numba penalty kernel vs numpy at full vocabulary (skipped if `cuda/penalties_numba.py` is absent);
- batch invariance: a sequence's row does not depend on its neighbours within a bucket.

    PYTHONPATH=. python profiling/gpu_tests.py --out $OUT/gpu_tests.json
    PYTHONPATH=. python profiling/gpu_tests.py --device cpu --quick     # dry run of the logic
Each check records ok / seconds / summary (or error) and the script goes on after a failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_common as gb  # noqa: E402

from runtime.kernels.triton import decode_attention as ta  # noqa: E402
from runtime.model.graphs import GraphRunner  # noqa: E402
from runtime.model.kv_pool import KVPool  # noqa: E402
from runtime.model.llama import CausalLM  # noqa: E402

CheckFn = Callable[[dict[str, Any], argparse.Namespace], None]
CHECKS: dict[str, CheckFn] = {}


def check(fn: CheckFn) -> CheckFn:
    CHECKS[fn.__name__] = fn
    return fn


class Setup:
    """One model, a prefilled pristine pool, a working pool, and runners (built on demand)."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
        self.tol = 2e-2 if self.dtype == torch.bfloat16 else 1e-4
        self.model: CausalLM = gb.random_model(a.shape, self.dtype, a.device, seed=3)
        self.span = a.max_len
        n_seqs = max(a.batch_buckets)
        self.prefilled = a.max_len - 24  # tokens cached per sequence
        gen = torch.Generator().manual_seed(0)
        v = self.model.config.vocab_size
        prompts = torch.randint(1, v, (n_seqs, self.prefilled), generator=gen).tolist()
        self.pristine = KVPool(self.model.config, n_seqs * self.span, self.dtype, a.device)
        gb.prefill(self.model, self.pristine, prompts, self.span, a.device)
        self.pool = gb.clone_pool(self.pristine)
        self.runners: dict[bool, GraphRunner] = {}

    def runner(self, triton: bool) -> GraphRunner:
        if triton not in self.runners:
            a = self.a
            r = GraphRunner(
                self.model,
                self.pool,
                max(a.batch_buckets),
                a.max_len,
                True,
                a.device,
                batch_buckets=a.batch_buckets,
                len_buckets=a.len_buckets,
            )
            with gb.attention_backend(self.model, triton):
                r.capture()
            self.runners[triton] = r
        return self.runners[triton]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_hidden(hidden)  # [B, V] fp32


_SETUP: list[Setup] = []


def setup(a: argparse.Namespace) -> Setup:
    """The shared model and pools, built by the first check that needs them."""
    if not _SETUP:
        _SETUP.append(Setup(a))
    return _SETUP[0]


def lens_for(key: tuple[int, int], prev_len: int, cap: int, gen: torch.Generator) -> list[int]:
    """Cached lengths of `bs` rows whose longest row lands in length bucket `n` (prev_len, n]."""
    bs, n = key
    hi = min(n - 1, cap)
    lens = torch.randint(1, hi + 1, (bs,), generator=gen).tolist()
    lens[0] = int(torch.randint(max(prev_len, 1), hi + 1, (1,), generator=gen))
    return lens


def skip_without_triton(e: dict[str, Any], a: argparse.Namespace) -> bool:
    if ta.available() and (a.device.startswith("cuda") or ta._interpret()):
        return False
    e.update(ok=True, skipped="needs CUDA and triton")
    return True


# ---- checks ------------------------------------------------------------------------------------
@check
def graph_every_bucket_vs_eager(e: dict[str, Any], a: argparse.Namespace) -> None:
    """Every captured (batch, length) key: graph logits vs unpadded eager logits."""
    s = setup(a)
    r = s.runner(False)
    gen = torch.Generator().manual_seed(1)
    worst, keys, bitwise = 0.0, 0, 0
    for key in sorted(r.keys()):
        i = r.len_buckets.index(key[1])
        lens = lens_for(key, r.len_buckets[i - 1] if i else 1, s.prefilled, gen)
        toks = torch.randint(1, s.model.config.vocab_size, (key[0],), generator=gen).tolist()
        batch = gb.decode_batch(toks, lens, s.span, s.pool.pad_slot, a.device, scratch=True)
        assert r.bucket_for(batch) == key, (r.bucket_for(batch), key)
        h_e = s.model.hidden(batch, s.pool)
        h_g = r.run(batch)
        bitwise += bool(torch.equal(h_e, h_g))
        worst = max(worst, float((s.logits(h_g) - s.logits(h_e)).abs().max()))
        keys += 1
    e.update(
        ok=worst <= s.tol,
        keys=keys,
        max_abs_logit_diff=worst,
        bitwise_equal_keys=bitwise,
        capture_s=r.capture_seconds,
        summary=f"{keys} keys, max|dlogit| {worst:.3g} (tol {s.tol}), {bitwise} bitwise equal",
    )


def greedy_compare(a: argparse.Namespace, triton: bool) -> dict[str, Any]:
    """`a.steps` greedy steps per batch size: graph path (pool A) vs eager torch path (pool B)."""
    s = setup(a)
    r = s.runner(triton)
    out: dict[str, Any] = {"per_batch": {}}
    ok = True
    gen = torch.Generator().manual_seed(2)
    for b in a.greedy_batches:
        s.pool.k.copy_(s.pristine.k)
        s.pool.v.copy_(s.pristine.v)
        eager_pool = gb.clone_pool(s.pristine)
        lens = torch.randint(a.prompt_lo, a.prompt_hi + 1, (b,), generator=gen).tolist()
        tok_e = torch.randint(1, s.model.config.vocab_size, (b,), generator=gen)
        tok_g = tok_e.clone()
        worst, diverged, gap, used = 0.0, None, None, set()
        for step in range(a.steps):
            be = gb.decode_batch(tok_e.tolist(), lens, s.span, s.pool.pad_slot, a.device)
            bg = gb.decode_batch(tok_g.tolist(), lens, s.span, s.pool.pad_slot, a.device)
            used.add(r.bucket_for(bg))
            lg_e = s.logits(s.model.hidden(be, eager_pool))  # [b, V]
            with gb.attention_backend(s.model, triton):  # CPU: eager twin
                lg_g = s.logits(r.run(bg))  # [b, V]
            if diverged is None:
                worst = max(worst, float((lg_e - lg_g).abs().max()))
            tok_e, tok_g = lg_e.argmax(-1).cpu(), lg_g.argmax(-1).cpu()
            if diverged is None and not torch.equal(tok_e, tok_g):
                diverged = step
                row = int((tok_e != tok_g).nonzero()[0])
                top2 = lg_e[row].topk(2).values
                gap = float(top2[0] - top2[1])
            lens = [n + 1 for n in lens]
        tie = diverged is not None and gap is not None and gap <= s.tol
        row_ok = worst <= s.tol and (diverged is None or tie)
        ok &= row_ok
        out["per_batch"][b] = {
            "max_abs_logit_diff": worst,
            "identical_tokens": diverged is None,
            "diverged_at": diverged,
            "eager_top2_gap_there": gap,
            "buckets": sorted(k for k in used if k),
            "ok": row_ok,
        }
    worst_all = max(v["max_abs_logit_diff"] for v in out["per_batch"].values())
    same = sum(v["identical_tokens"] for v in out["per_batch"].values())
    out.update(
        ok=ok,
        summary=f"{same}/{len(a.greedy_batches)} batch sizes token-identical over "
        f"{a.steps} steps, max|dlogit| {worst_all:.3g} (tol {s.tol})",
    )
    return out


@check
def greedy_graph_vs_eager(e: dict[str, Any], a: argparse.Namespace) -> None:
    e.update(greedy_compare(a, triton=False))


@check
def greedy_graph_triton_vs_eager_torch(e: dict[str, Any], a: argparse.Namespace) -> None:
    if not skip_without_triton(e, a):
        e.update(greedy_compare(a, triton=True))


ATTN_CASES = [  # (batch, heads, kv heads, head_dim, table width)
    (1, 9, 3, 64, 1),
    (5, 9, 3, 64, 37),
    (8, 9, 3, 64, 1000),
    (3, 32, 8, 128, 5000),
    (64, 32, 8, 128, 700),
    (4, 8, 8, 128, 300),
    (6, 12, 4, 80, 257),
    (2, 14, 2, 64, 129),
]


@check
def triton_attention_vs_reference(e: dict[str, Any], a: argparse.Namespace) -> None:
    if skip_without_triton(e, a):
        return
    dtypes = (
        [torch.bfloat16, torch.float16, torch.float32]
        if a.device.startswith("cuda")
        else [torch.float32]
    )
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
    cases = ATTN_CASES if not a.quick else ATTN_CASES[:2]
    worst: dict[str, float] = {}
    ok = True
    for dt in dtypes:
        for case in cases if dt != torch.float32 else cases[:4]:  # fewer compiles for fp32
            q, k, v, table, lens = attn_inputs(*case, dt, a.device)
            got = ta.decode_attention(q, k, v, table, lens).float()
            ref = ta.decode_attention_ref(q, k, v, table, lens).float()
            err = float(((got - ref).abs() / (1 + ref.abs())).max())  # atol = rtol = tol
            worst[str(dt)] = max(worst.get(str(dt), 0.0), err)
            ok &= err <= tol[dt]
    e.update(
        ok=ok, max_abs_err=worst, summary=f"{len(cases)} shapes x {len(dtypes)} dtypes: {worst}"
    )


def attn_inputs(
    b: int, nh: int, nkv: int, hd: int, width: int, dt: torch.dtype, dev: str, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random q/K/V, shuffled slots, random seq_lens, a pad slot inside a table and a padding row."""
    gen = torch.Generator().manual_seed(seed + b * width)
    slots = b * width + 1
    k = torch.randn(slots, nkv, hd, generator=gen).to(dt)
    v = torch.randn(slots, nkv, hd, generator=gen).to(dt)
    q = torch.randn(b, nh, hd, generator=gen).to(dt)
    table = torch.randperm(slots - 1, generator=gen)[: b * width].view(b, width)
    lens = torch.randint(1, width + 1, (b,), generator=gen)
    lens[0] = width
    for i in range(b):
        table[i, int(lens[i]) :] = slots - 1
    if width > 4:
        table[0, 2] = slots - 1  # a pad slot inside the live range is skipped
    if b > 1:
        table[-1], lens[-1] = slots - 1, 1  # a padding row: zeros out
    return tuple(t.to(dev) for t in (q, k, v, table, lens))


@check
def triton_attention_in_cuda_graph(e: dict[str, Any], a: argparse.Namespace) -> None:
    if skip_without_triton(e, a) or not a.device.startswith("cuda"):
        e.setdefault("skipped", "needs CUDA")
        e.setdefault("ok", True)
        return
    q, k, v, table, lens = attn_inputs(16, 32, 8, 128, 2048, torch.bfloat16, a.device)
    ta.decode_attention(q, k, v, table, lens)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.decode_attention(q, k, v, table, lens)
    worst = 0.0
    for seed in (1, 2, 3):  # new contents in the same buffers, then replay
        q2, k2, v2, t2, l2 = attn_inputs(16, 32, 8, 128, 2048, torch.bfloat16, a.device, seed)
        for dst, src in ((q, q2), (k, k2), (v, v2), (table, t2), (lens, l2)):
            dst.copy_(src)
        graph.replay()
        ref = ta.decode_attention_ref(q, k, v, table, lens)
        worst = max(worst, float((out.float() - ref.float()).abs().max()))
    e.update(
        ok=worst <= 2e-2, max_abs_err=worst, summary=f"3 replays on new data, max|d| {worst:.3g}"
    )


@check
def penalties_numba_vs_numpy(e: dict[str, Any], a: argparse.Namespace) -> None:
    try:
        from cuda import penalties, penalties_numba

        kernel = penalties_numba.apply_penalties_cuda_
    except (ImportError, AttributeError) as err:
        e.update(ok=True, skipped=f"cuda/penalties_numba.py not usable: {err}")
        return
    if not (a.device.startswith("cuda") and penalties_numba.available()):
        e.update(
            ok=True, skipped="needs CUDA and numba-cuda (penalties_numba.available() is False)"
        )
        return
    worst, ok = {}, True
    for vocab in (49152, 128256):
        arrays = gb.penalty_inputs(64, vocab, 2048, a.device, seed=vocab)
        want = gb.penalties_ref(arrays)
        for name, fn in (("numba", kernel), ("torch_twin", penalties.apply_penalties_)):
            t = {k: torch.from_numpy(v.copy()).to(a.device) for k, v in arrays.items()}
            fn(t["logits"], *[t[k] for k in list(arrays)[1:]])
            got = t["logits"].cpu().numpy().astype(np.float64)
            err = np.abs(got - want) / (1e-4 + 1e-5 * np.abs(want))
            worst[f"{name}_{vocab}"] = float(np.abs(got - want).max())
            ok &= bool((err <= 1.0).all())
    e.update(ok=ok, max_abs_err=worst, summary=f"B=64, 2 vocabularies, <=2048 tokens/row: {worst}")


@check
def batch_invariance(e: dict[str, Any], a: argparse.Namespace) -> None:
    """Same bucket: a row is bitwise independent of its neighbours; across buckets: within tol."""
    s = setup(a)
    res: dict[str, Any] = {}
    ok = True
    variants = [False] + ([True] if not skip_without_triton({}, a) else [])
    for tri in variants:
        r = s.runner(tri)
        mid = s.a.batch_buckets[len(s.a.batch_buckets) // 2]
        big = max(s.a.batch_buckets)
        gen = torch.Generator().manual_seed(5)
        lens_x = torch.randint(a.prompt_lo, a.prompt_hi, (big,), generator=gen).tolist()
        lens_y = torch.randint(a.prompt_lo, a.prompt_hi, (big,), generator=gen).tolist()
        lens_y[0] = lens_x[0]
        v = s.model.config.vocab_size
        tx = torch.randint(1, v, (big,), generator=gen).tolist()
        ty = torch.randint(1, v, (big,), generator=gen).tolist()
        ty[0] = tx[0]

        def row0(
            toks: list[int], lens: list[int], r: GraphRunner = r, tri: bool = tri
        ) -> torch.Tensor:
            batch = gb.decode_batch(toks, lens, s.span, s.pool.pad_slot, a.device, scratch=True)
            with gb.attention_backend(s.model, tri):
                return r.run(batch)[0]

        same = torch.equal(row0(tx[:mid], lens_x[:mid]), row0(ty[:mid], lens_y[:mid]))
        alone = row0(tx[:1], lens_x[:1])
        cross = max(float((alone - row0(tx[:n], lens_x[:n])).abs().max()) for n in (mid, big))
        ok &= same and cross <= s.tol
        res["triton" if tri else "torch"] = {
            "same_bucket_bitwise": same,
            "cross_bucket_max_abs": cross,
        }
    e.update(ok=ok, **res, summary=json.dumps(res))


# ---- driver ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (CPU dry run)")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--out", type=Path, default=Path("gpu_tests.json"))
    a = ap.parse_args()
    a.shape, a.max_len, a.len_buckets, a.steps = "smollm2-135m", 1024, [256, 1024], 64
    a.batch_buckets = [*range(1, 33), 48, 64]
    a.greedy_batches, a.prompt_lo, a.prompt_hi = [1, 3, 17, 33, 40, 64], 180, 250
    if a.quick:
        a.shape, a.max_len, a.len_buckets, a.steps = "tiny", 64, [16, 64], 4
        a.batch_buckets, a.greedy_batches, a.prompt_lo, a.prompt_hi = [1, 2, 4, 8], [1, 3], 10, 14
    results: dict[str, Any] = {"env": gb.env_info(a.device), "checks": {}}
    for name, fn in CHECKS.items():
        if a.only is not None and name not in a.only:
            continue
        print(f"== {name}", flush=True)
        with gb.section(results["checks"], name) as entry:
            fn(entry, a)
        shown = {k: v for k, v in results["checks"][name].items() if k != "trace"}
        print(f"   {json.dumps(shown, default=str)[:600]}", flush=True)
        a.out.write_text(json.dumps(results, indent=1, default=str))
    failed = [n for n, r in results["checks"].items() if not r.get("ok")]
    print(f"checks failed: {failed}" if failed else "all checks passed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
