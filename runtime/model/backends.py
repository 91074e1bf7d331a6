"""Backends: the layer implementations a model is assembled with, chosen once when it loads.

A model's layers call `Backends` (norm, rotary + K/V store, SiLU*up, decode attention); which
ones is decided here, from the device, the dtype and the settings (`BackendSettings`), never per
call. `runtime.model.assemble` applies them, and the packed projections, to a loaded model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention
from runtime.kernels.cpu import fused as cpu_fused
from runtime.kernels.cpu import sample_greedy as cpu_greedy
from runtime.kernels.triton import decode_attention as triton_attention
from runtime.model.attention import DecodeAttention


@dataclass(frozen=True)
class BackendSettings:
    """The switches (`--cpu_linear`, `--cpu_attention`, `--cpu_kernels`, `--gpu_attention`)."""

    cpu_linear: str = "onednn"  # onednn: packed fp32 weights; aten: plain F.linear
    cpu_attention: str = "numba"  # numba: the paged decode kernel; torch: gather + SDPA
    cpu_kernels: str = "numba"  # numba: one-pass norm / rope / SiLU*up / greedy; torch: torch ops
    gpu_attention: str = "triton"  # triton: split-K decode kernel; torch: gather + SDPA


# (qkv [T, (nh + 2 nkv) hd], cos, sin [T, 1, hd], out_slots [T], k_cache, v_cache [S, nkv, hd],
#  n_heads) -> q [T, nh, hd]; k and v are stored at out_slots
Rotary = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int], Tensor]


def torch_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)  # [T, H]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half rotary embedding; x `[T, heads, hd]`, cos/sin `[T, 1, hd]`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


def torch_rope_store(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    out_slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
) -> Tensor:
    """Rotary of q and k, k and v written to the caches at `out_slots`; returns q."""
    t, n_kv, hd = qkv.shape[0], k_cache.shape[1], k_cache.shape[2]
    qk = apply_rope(qkv[:, : (n_heads + n_kv) * hd].view(t, n_heads + n_kv, hd), cos, sin)
    q, k = qk.split([n_heads, n_kv], dim=1)  # [T, nh, hd], [T, nkv, hd]
    v = qkv[:, (n_heads + n_kv) * hd :].view(t, n_kv, hd)  # [T, nkv, hd]
    k_cache.index_copy_(0, out_slots, k.to(k_cache.dtype))
    v_cache.index_copy_(0, out_slots, v.to(v_cache.dtype))
    return q


def torch_silu_mul(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)  # [T, I] each
    return F.silu(gate) * up


@dataclass(frozen=True)
class Backends:
    """What each layer calls; `decode_attention=None` is the torch path (gather + SDPA)."""

    name: str
    rms_norm: cpu_fused.NormFn = torch_rms_norm
    rope_store: Rotary = torch_rope_store
    silu_mul: cpu_fused.ActFn = torch_silu_mul
    decode_attention: DecodeAttention | None = None
    # all-greedy sampling: fp32 logits [B, V] -> (argmax [B] int64, its logprob [B] fp32) in one
    # pass; None: the sampler's torch ops
    greedy: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None


TORCH = Backends("torch")


def select_backends(
    device: torch.device, dtype: torch.dtype, settings: BackendSettings
) -> Backends:
    """The backends for a model of `dtype` on `device` (the CPU kernels need fp32 and Numba)."""
    if device.type == "cuda":
        if settings.gpu_attention == "triton" and triton_attention.available():
            return Backends("triton", decode_attention=triton_attention.decode_attention)
        return TORCH
    if device.type != "cpu" or dtype != torch.float32 or not cpu_attention.available():
        return TORCH
    fused = settings.cpu_kernels == "numba"
    attn = settings.cpu_attention == "numba"
    if not (fused or attn):
        return TORCH
    return Backends(
        name="+".join(n for n, on in (("numba-fused", fused), ("numba-attention", attn)) if on),
        rms_norm=cpu_fused.rms_norm if fused else torch_rms_norm,
        rope_store=cpu_fused.rope_store if fused else torch_rope_store,
        silu_mul=cpu_fused.silu_mul if fused else torch_silu_mul,
        decode_attention=cpu_attention.paged_decode_attention if attn else None,
        greedy=cpu_greedy.greedy_logprob_torch if fused else None,
    )
