"""Helpers shared by `profiling/gpu_tests.py` and `profiling/gpu_bench.py`: model shapes, random
models, decode batches over per-sequence slot spans, penalty inputs and a numpy reference, timing."""

from __future__ import annotations

import contextlib
import gc
import json
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.kernels.triton import decode_attention as triton_attention
from runtime.model.backends import TORCH, Backends
from runtime.model.batch import ForwardBatch
from runtime.model.config import ModelConfig
from runtime.model.kv_pool import KVPool
from runtime.model.llama import CausalLM


def llama_shape(
    vocab: int, hidden: int, inter: int, layers: int, heads: int, kv: int, theta: float, tied: bool
) -> dict[str, Any]:
    """An HF `config.json` dict of a Llama-architecture model with these shapes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
    }


SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": llama_shape(49152, 576, 1536, 30, 9, 3, 100000.0, True),  # head_dim 64
    "llama3-8b": llama_shape(128256, 4096, 14336, 32, 32, 8, 500000.0, False),  # head_dim 128
    "tiny": llama_shape(512, 64, 128, 2, 4, 2, 10000.0, True),  # CPU dry runs
}


def random_model(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> CausalLM:
    """A `CausalLM` of `SHAPES[shape]` with N(0, 0.02) weights and unit norms, built on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = CausalLM(ModelConfig.from_hf_dict(SHAPES[shape]), dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return model.eval()


@contextlib.contextmanager
def attention_backend(model: CausalLM, triton: bool) -> Iterator[None]:
    """Decode attention through the Triton kernel (`triton`) or the torch path, then restore."""
    before = model.ops
    ops = (
        Backends("triton", decode_attention=triton_attention.decode_attention) if triton else TORCH
    )
    model.use_backends(ops)
    try:
        yield
    finally:
        model.use_backends(before)


def weight_bytes(model: CausalLM) -> int:
    """Bytes a decode step reads: every weight, the input embedding only if it is the LM head."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.lm_head is not None:
        total -= model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    return total


def decode_batch(
    tokens: list[int], lens: list[int], span: int, pad: int, device: str, scratch: bool = False
) -> ForwardBatch:
    """Sequence i owns slots [i*span, (i+1)*span) and has lens[i] tokens cached.

    With `scratch`, the new token goes to the sequence's last slot instead of slot lens[i], so the
    cache is never changed: the same pool serves any number of comparisons.
    """
    b = len(tokens)
    width = max(lens) + 1
    base = torch.arange(b, dtype=torch.int64)[:, None] * span  # [B, 1]
    cols = torch.arange(width, dtype=torch.int64)[None, :]  # [1, W]
    n = torch.tensor(lens, dtype=torch.int64)[:, None]  # [B, 1]
    new_slot = base[:, 0] + (span - 1 if scratch else n[:, 0])  # [B]
    table = torch.where(cols < n, base + cols, torch.full_like(cols, pad))  # [B, W]
    table[torch.arange(b), n[:, 0]] = new_slot
    return ForwardBatch(
        input_ids=torch.tensor(tokens, dtype=torch.int64, device=device),  # [B]
        positions=n[:, 0].to(device),  # [B]
        out_slots=new_slot.to(device),  # [B]
        block_table=table.to(device),  # [B, W]
        seq_lens=(n[:, 0] + 1).to(device),  # [B]
        query_lens=[1] * b,
        logits_index=torch.arange(b, device=device),  # [B]
    )


def prefill(
    model: CausalLM, pool: KVPool, prompts: list[list[int]], span: int, device: str
) -> None:
    """Prefill each prompt into its slot span, a few sequences per forward."""
    from runtime.model.batch import SeqChunk, make_forward_batch

    for lo in range(0, len(prompts), 16):
        chunks = [
            SeqChunk(p, 0, list(range(i * span, (i + 1) * span)))
            for i, p in enumerate(prompts[lo : lo + 16], start=lo)
        ]
        model.hidden(make_forward_batch(chunks, pool.pad_slot, device), pool)


def penalty_inputs(b: int, vocab: int, per_row: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Numpy arrays for `apply_penalties_*_` (unique tokens per row, two EOS ids)."""
    rng = np.random.default_rng(seed)
    toks = [
        rng.choice(vocab, size=int(rng.integers(0, per_row + 1)), replace=False) for _ in range(b)
    ]
    return {
        "logits": (rng.normal(size=(b, vocab)) * 3).astype(np.float32),
        "token_ids": np.concatenate(toks).astype(np.int64),
        "counts": rng.integers(0, 6, size=sum(len(t) for t in toks)).astype(np.int32),
        "row_ptr": np.cumsum([0] + [len(t) for t in toks]).astype(np.int64),
        "repetition": rng.uniform(0.8, 1.5, b).astype(np.float32),
        "frequency": rng.uniform(-1, 1, b).astype(np.float32),
        "presence": rng.uniform(-1, 1, b).astype(np.float32),
        "eos_ids": np.array([2, vocab - 1], np.int64),
        "generated_len": rng.integers(0, 60, b).astype(np.int64),
        "min_new_tokens": rng.integers(0, 20, b).astype(np.int64),
        "decay_start": rng.integers(0, 30, b).astype(np.int64),
        "decay_factor": rng.uniform(1.0, 1.05, b).astype(np.float32),
    }


def penalties_ref(a: dict[str, np.ndarray]) -> np.ndarray:
    """Vectorised float64 numpy reference of spec §4 steps 1-2 (penalties, then EOS shaping)."""
    out = a["logits"].astype(np.float64)
    rows = np.repeat(np.arange(out.shape[0]), np.diff(a["row_ptr"]))
    tok, c = a["token_ids"], a["counts"].astype(np.float64)
    x = out[rows, tok]
    rep = a["repetition"][rows].astype(np.float64)
    y = np.where(x > 0, x / rep, x * rep) - c * a["frequency"][rows] - a["presence"][rows]
    out[rows, tok] = np.where(c > 0, y, x)
    k = np.maximum(a["generated_len"] - a["decay_start"], 0)
    scale = a["decay_factor"].astype(np.float64) ** k - 1.0  # [B]
    eos = out[:, a["eos_ids"]]
    eos = eos + np.abs(eos) * scale[:, None]
    banned = (a["generated_len"] < a["min_new_tokens"] - 1)[:, None]
    out[:, a["eos_ids"]] = np.where(banned, -1e7, eos)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device: str, iters: int, warmup: int = 3) -> float:
    """Mean wall seconds per call (synchronised), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


@contextlib.contextmanager
def section(results: dict[str, Any], name: str) -> Iterator[dict[str, Any]]:
    """Yield a dict to fill; record the error (and go on) if the body fails."""
    entry: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        yield entry
        entry.setdefault("ok", True)
    except Exception as e:  # a benchmark failing must not stop the others
        entry.update(
            ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:]
        )
        print(f"[{name}] FAILED: {e}", flush=True)
    entry["seconds"] = round(time.perf_counter() - t0, 2)
    results[name] = entry


def clone_pool(pool: KVPool) -> KVPool:
    """A KVPool sharing `pool`'s settings with its own copy of K and V."""
    twin = KVPool.__new__(KVPool)
    twin.__dict__.update(pool.__dict__)
    twin.k, twin.v = pool.k.clone(), pool.v.clone()
    return twin


def load_json(path: Path | None) -> dict[str, Any]:
    return json.loads(path.read_text()) if path and path.exists() else {}


def env_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1)
        )
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
