"""Fused elementwise kernels for the CPU (Numba): RMSNorm, rotary + K/V store, SiLU * up.

On the CPU every torch op is a pass over memory plus a dispatch, and RMSNorm alone is six ops;
these kernels do each step in one pass (figures in profiling/README.md). fp32 tensors only;
results equal the torch path up to fp32 rounding (tests compare them). `--cpu_kernels torch`
assembles models without them (`runtime.model.backends`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention

# A parallel Numba call costs 50-100 us of thread wake-up here; below this many elements one
# thread is faster (a batch-64 decode step's rows take 10-40 us in one thread)
PARALLEL_MIN_ELEMS = 1 << 17


NormFn = Callable[[Tensor, Tensor, float], Tensor]  # (x [T, H], weight [H], eps) -> [T, H]
ActFn = Callable[[Tensor], Tensor]  # gate_up [T, 2I] -> [T, I]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`x / sqrt(mean(x^2) + eps) * weight` over the last axis; x `[T, H]`."""
    x = x.contiguous()
    out = torch.empty_like(x)  # [T, H]
    kernel = cpu_attention.driver("rms_norm", x.numel() >= PARALLEL_MIN_ELEMS)
    kernel(x.numpy(), weight.detach().numpy(), np.float32(eps), out.numpy())
    return out


def silu_mul(gate_up: Tensor) -> Tensor:
    """`silu(gate) * up` for `gate_up = [gate | up]` `[T, 2I]` -> `[T, I]`."""
    gate_up = gate_up.contiguous()
    t, two_i = gate_up.shape
    out = gate_up.new_empty(t, two_i // 2)  # [T, I]
    kernel = cpu_attention.driver("silu_mul", gate_up.numel() >= PARALLEL_MIN_ELEMS)
    kernel(gate_up.numpy(), out.numpy())
    return out


def rope_store(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    out_slots: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    n_heads: int,
) -> Tensor:
    """Rotary embedding of q and k from the fused projection `qkv` `[T, (nh + 2 nkv) hd]`; k and
    v are written to the caches at `out_slots`, q is returned `[T, nh, hd]`. cos/sin are the
    model's rotate-half tables `[T, 1, hd]` (their halves are equal: the kernel reads the first)."""
    qkv = qkv.contiguous()
    t, hd = qkv.shape[0], k_cache.shape[2]
    q = qkv.new_empty(t, n_heads, hd)  # [T, nh, hd]
    kernel = cpu_attention.driver("rope_store", qkv.numel() >= PARALLEL_MIN_ELEMS)
    kernel(
        qkv.numpy(),
        cos.reshape(t, hd).numpy(),  # [T, hd], a view
        sin.reshape(t, hd).numpy(),
        out_slots.numpy(),
        k_cache.numpy(),
        v_cache.numpy(),
        q.numpy(),
    )
    return q
