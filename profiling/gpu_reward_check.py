"""GPU check of the reward-head kernel: CuPy kernel vs the torch twin vs numpy (float64).

Usage: python profiling/gpu_reward_check.py OUT.json
Sizes: InternLM2-7B-reward-like (H=4096, dot head) and Qwen2.5-Math-RM-like (H=3584, MLP head),
B=64 sequences of 512 tokens (T=32768 rows, bf16), plus fp16/fp32/odd-size/side-stream cases and
a tiny bf16 reward model end to end (`score_batch` vs `CausalLM.score`). Writes JSON to OUT.json;
exit 0 when everything matches, 1 on a mismatch, 2 when CUDA or CuPy is missing (without CuPy the
torch twin on the GPU is still checked against numpy: "mode": "twin_only").
Imports only torch, numpy, cupy and the repo's own modules.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from cuda import reward_head as rh  # noqa: E402

ITERS = 50
DEVICE = "cuda"


def make_case(
    kind: str, h: int, b: int, seq: int, dtype: torch.dtype, w_dtype: torch.dtype, seed: int
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """Random rows `[b*seq, h]` with outlier channels, last indices `[b]`, norm weight, head."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    dev = torch.device(DEVICE)

    def rnd(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, device=dev)

    rows = rnd(b * seq, h) * 2.0
    rows[:, :: max(1, h // 16)] *= 25.0  # a few large channels, as real residual streams have
    rows = rows.to(dtype)
    lens = torch.randint(seq // 2, seq + 1, (b,), generator=g, device=dev)
    last = torch.arange(b, device=dev) * seq + lens - 1  # [b] int64, ragged lengths
    nw = (1.0 + 0.2 * rnd(h)).to(w_dtype)
    if kind in rh.DOT_KINDS:
        head = {"weight": (rnd(h) / h**0.5).to(w_dtype)}
    else:
        head = {
            "w1": (rnd(h, h) / h**0.5).to(w_dtype),
            "b1": (0.1 * rnd(h)).to(w_dtype),
            "w2": (rnd(h) / h**0.5).to(w_dtype),
            "b2": rnd(1).to(w_dtype),
        }
    return rows, last, nw, head


def np64(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64)


def numpy_ref(
    rows: Tensor, last: Tensor, nw: Tensor, eps: float, head: dict[str, Tensor], kind: str
) -> tuple[np.ndarray, np.ndarray, float]:
    """float64 scores `[B]`, per-row term scale sqrt(sum(terms^2)) `[B]`, and seconds taken."""
    x = np64(rows.index_select(0, last))  # [B, H]; the gather itself is not timed
    w = {k: np64(v) for k, v in head.items()}
    nwf = np64(nw)
    t0 = time.perf_counter()
    xn = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * nwf
    if kind in rh.DOT_KINDS:
        terms = xn * w["weight"].reshape(-1)[None]
        out = terms.sum(-1)
    else:
        z = xn @ w["w1"].T + w["b1"]
        terms = np.maximum(z, 0.0) * w["w2"].reshape(-1)[None]
        out = terms.sum(-1) + w["b2"].reshape(-1)[0]
    return out, np.sqrt((terms**2).sum(-1)), time.perf_counter() - t0


def cuda_ms(fn: Any, iters: int = ITERS) -> float:
    """Mean milliseconds of `fn()` on the current stream (CUDA events)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def run_case(
    name: str,
    kind: str,
    h: int,
    b: int,
    seq: int,
    dtype: torch.dtype,
    w_dtype: torch.dtype | None = None,
    side_stream: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    w_dtype = w_dtype or dtype
    eps = 1e-6
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):  # data made and consumed on this stream, no sync in between
        rows, last, nw, head = make_case(kind, h, b, seq, dtype, w_dtype, seed)
        t0 = time.perf_counter()
        kfn = rh.reward_scores_cupy if rh.cupy_available() else rh.reward_scores_torch
        kern = kfn(rows, last, nw, eps, head, kind)
        stream.synchronize()
        first_ms = (time.perf_counter() - t0) * 1e3  # includes NVRTC compile on first use
        twin = rh.reward_scores_torch(rows, last, nw, eps, head, kind)
        disp = rh.reward_scores(rows, last, nw, eps, head, kind)
        ms_kernel = cuda_ms(lambda: kfn(rows, last, nw, eps, head, kind))
        ms_twin = cuda_ms(lambda: rh.reward_scores_torch(rows, last, nw, eps, head, kind))
    stream.synchronize()
    ref, scale, np_s = numpy_ref(rows, last, nw, eps, head, kind)
    k, tw = np64(kern), np64(twin)
    mlp_low = kind == "qwen2_reward" and w_dtype != torch.float32
    rtol_ref = 2e-2 if mlp_low else 1e-4  # bf16/fp16 roundings of xn and W1 @ xn in the MLP
    rtol_twin = 2e-3 if mlp_low else 1e-4
    tol_ref, tol_twin = rtol_ref * scale + 1e-5, rtol_twin * scale + 1e-5
    checks = {
        "kernel_vs_numpy": bool((np.abs(k - ref) <= tol_ref).all()),
        "twin_vs_numpy": bool((np.abs(tw - ref) <= tol_ref).all()),
        "kernel_vs_twin": bool((np.abs(k - tw) <= tol_twin).all()),
        "dispatch_is_kernel": bool(torch.equal(disp, kern)),
        "finite": bool(np.isfinite(k).all()),
    }
    return {
        "name": name,
        "kind": kind,
        "dtype": str(dtype),
        "w_dtype": str(w_dtype),
        "H": h,
        "B": b,
        "T": b * seq,
        "side_stream": side_stream,
        "max_abs_diff": {
            "kernel_vs_numpy": float(np.abs(k - ref).max()),
            "twin_vs_numpy": float(np.abs(tw - ref).max()),
            "kernel_vs_twin": float(np.abs(k - tw).max()),
        },
        "max_err_over_scale": {
            "kernel_vs_numpy": float((np.abs(k - ref) / scale).max()),
            "kernel_vs_twin": float((np.abs(k - tw) / scale).max()),
        },
        "rtol": {"vs_numpy": rtol_ref, "kernel_vs_twin": rtol_twin},
        "score_range": [float(ref.min()), float(ref.max())],
        "ms": {"kernel": ms_kernel, "twin": ms_twin, "numpy_f64": np_s * 1e3},
        "kernel_first_call_ms": first_ms,
        "checks": checks,
        "ok": all(checks.values()),
    }


def model_case() -> dict[str, Any]:
    """A tiny random bf16 reward model on CUDA: `score_batch` (kernel) vs `CausalLM.score`."""
    from runtime.model import reward
    from runtime.model.batch import SeqChunk, make_forward_batch
    from runtime.model.config import ModelConfig
    from runtime.model.kv_pool import KVPool
    from runtime.model.llama import CausalLM

    out: dict[str, Any] = {"name": "tiny_model_end_to_end", "kinds": {}}
    for arch in (
        "InternLM2ForRewardModel",
        "Qwen2ForRewardModel",
        "LlamaForSequenceClassification",
    ):
        cfg = ModelConfig.from_hf_dict(
            {
                "architectures": [arch],
                "vocab_size": 512,
                "hidden_size": 256,
                "intermediate_size": 512,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "rms_norm_eps": 1e-6,
            }
        )
        torch.manual_seed(0)
        model = CausalLM(cfg, torch.bfloat16).to(DEVICE)
        pool = KVPool(cfg, 1024, torch.bfloat16, DEVICE)
        seqs = [list(range(3, 3 + n)) for n in (37, 5, 300, 1)]
        chunks, start = [], 0
        for s in seqs:
            chunks.append(SeqChunk(s, 0, list(range(start, start + len(s)))))
            start += len(s)
        batch = make_forward_batch(chunks, pool.pad_slot, DEVICE)
        want = model.score(batch, pool)[:, 0].float()  # [B]
        got = reward.score_batch(model, batch, pool)  # [B], kernel path
        rows = model.hidden_rows(batch, pool)
        args = (rows, batch.logits_index, model.norm, cfg.rms_norm_eps, reward.head_tensors(model))
        twin = rh.reward_scores_torch(*args, cfg.head_kind)
        diff = (got - want).abs()
        ok = bool((diff <= 3e-2 * (1 + want.abs())).all()) and bool(
            ((got - twin).abs() <= 1e-2 * (1 + twin.abs())).all()
        )
        out["kinds"][cfg.head_kind] = {
            "max_abs_diff_vs_model": float(diff.max()),
            "max_abs_diff_vs_twin": float((got - twin).abs().max()),
            "scores": got.tolist(),
            "ok": ok,
        }
    out["ok"] = all(v["ok"] for v in out["kinds"].values())
    return out


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(sys.argv[1])
    report: dict[str, Any] = {"torch": torch.__version__, "cases": [], "ok": False}
    if not torch.cuda.is_available():
        report["error"] = "needs CUDA"
        path.write_text(json.dumps(report, indent=1))
        print(report["error"], file=sys.stderr)
        return 2
    report["device"] = torch.cuda.get_device_name()
    report["mode"] = "kernel" if rh.cupy_available() else "twin_only"
    if rh.cupy_available():
        import cupy

        report["cupy"] = cupy.__version__
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    cases = [
        ("internlm2_7b_reward_bf16", "internlm2_reward", 4096, 64, 512, bf16, None, False),
        ("qwen25_math_rm_bf16", "qwen2_reward", 3584, 64, 512, bf16, None, False),
        ("internlm2_fp16", "internlm2_reward", 4096, 64, 64, f16, None, False),
        ("seq_cls_fp32", "seq_cls", 4096, 64, 64, f32, None, False),
        ("qwen2_rm_fp32", "qwen2_reward", 3584, 16, 64, f32, None, False),
        ("qwen2_rm_fp16", "qwen2_reward", 3584, 16, 64, f16, None, False),
        ("rows_fp32_weights_bf16", "internlm2_reward", 4096, 8, 64, f32, bf16, False),
        ("odd_h_b1", "seq_cls", 1000, 1, 7, bf16, None, False),
        ("odd_h_mlp", "qwen2_reward", 896, 3, 9, bf16, None, False),
        ("side_stream_dot", "internlm2_reward", 4096, 64, 512, bf16, None, True),
        ("side_stream_mlp", "qwen2_reward", 3584, 64, 512, bf16, None, True),
    ]
    for i, (name, kind, h, b, seq, dt, wdt, side) in enumerate(cases):
        try:
            report["cases"].append(run_case(name, kind, h, b, seq, dt, wdt, side, seed=i))
        except Exception:
            report["cases"].append({"name": name, "ok": False, "error": traceback.format_exc()})
        torch.cuda.empty_cache()
    try:
        report["cases"].append(model_case())
    except Exception:
        report["cases"].append(
            {"name": "tiny_model_end_to_end", "ok": False, "error": traceback.format_exc()}
        )
    if rh.cupy_available():
        report["cupy_pool_used_bytes"] = int(cupy.get_default_memory_pool().used_bytes())
    report["ok"] = all(c["ok"] for c in report["cases"])
    path.write_text(json.dumps(report, indent=1))
    for c in report["cases"]:
        print(
            c["name"], "ok" if c["ok"] else "MISMATCH", c.get("max_abs_diff", ""), c.get("ms", "")
        )
    if not rh.cupy_available():
        print("CuPy is not importable: only the torch twin was checked", file=sys.stderr)
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
