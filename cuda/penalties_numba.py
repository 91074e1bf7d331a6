"""Numba CUDA kernel for the penalty + EOS-shaping step; same semantics as `cuda/penalties.py`.

One block per row: its threads stride over the row's CSR entries, then (after a block
barrier) over the EOS ids. numba is imported lazily, so importing this module never fails on
a machine without numba or CUDA. Under `NUMBA_ENABLE_CUDASIM=1` the kernel runs in numba's
simulator on numpy arrays (`apply_penalties_numpy_`), which is how CI tests it.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor

MIN_TOKENS_EOS_LOGIT = -1e7
DEFAULT_THREADS = 128

cuda: Any = None  # numba.cuda, bound on first use by _kernel()
float32: Any = None  # numba.float32, likewise


@functools.cache
def _kernel() -> Any:
    """Compile-on-first-launch kernel (cached). Over 60 lines on purpose: the CUDA kernel is one
    function (a device function per step would cost registers), defined after `numba.cuda`
    imports (optional) and against the simulator's `cuda` when NUMBA_ENABLE_CUDASIM is set."""
    import math

    global cuda, float32
    # Module globals, not closure cells: the simulator swaps in its fake `cuda` via globals.
    cuda = _numba_cuda()
    float32 = importlib.import_module("numba").float32

    @cuda.jit
    def penalties_kernel(
        logits,  # [B, V] fp32
        token_ids,  # [N] int64
        counts,  # [N] int32
        row_ptr,  # [B+1] int64
        repetition,  # [B] fp32
        frequency,  # [B] fp32
        presence,  # [B] fp32
        eos_ids,  # [E] int64
        generated_len,  # [B] int64
        min_new_tokens,  # [B] int64
        decay_start,  # [B] int64
        decay_factor,  # [B] fp32
    ):
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        step = cuda.blockDim.x
        rep = repetition[b]
        freq = frequency[b]
        pres = presence[b]
        i = row_ptr[b] + tid
        end = row_ptr[b + 1]
        while i < end:
            c = counts[i]
            if c > 0:
                t = token_ids[i]
                v = logits[b, t]
                if v > float32(0.0):
                    v = v / rep
                else:
                    v = v * rep
                v = v - float32(c) * freq
                v = v - pres
                logits[b, t] = v
            i += step
        cuda.syncthreads()  # an EOS id may also be a penalised token

        g = generated_len[b]
        k = g - decay_start[b]
        if k < 0:
            k = 0
        scale = float32(math.pow(decay_factor[b], float32(k))) - float32(1.0)
        banned = g < min_new_tokens[b] - 1
        j = tid
        while j < eos_ids.shape[0]:
            e = eos_ids[j]
            if banned:
                logits[b, e] = float32(MIN_TOKENS_EOS_LOGIT)
            else:
                v = logits[b, e]
                logits[b, e] = v + abs(v) * scale
            j += step

    return penalties_kernel


def _numba_cuda() -> Any:
    """numba.cuda, typed as Any (numba ships no useful stubs)."""
    return importlib.import_module("numba.cuda")


@functools.cache
def available() -> bool:
    """True when the kernel can run on torch CUDA tensors (numba importable, a real GPU)."""
    try:
        config: Any = importlib.import_module("numba.config")
        return not config.ENABLE_CUDASIM and bool(_numba_cuda().is_available())
    except Exception:
        return False


def apply_penalties_cuda_(
    logits: Tensor,  # [B, V] fp32 CUDA, modified in place
    token_ids: Tensor,  # [N] int64
    counts: Tensor,  # [N] int32
    row_ptr: Tensor,  # [B+1] int64
    repetition: Tensor,  # [B] fp32
    frequency: Tensor,  # [B] fp32
    presence: Tensor,  # [B] fp32
    eos_ids: Tensor,  # [E] int64
    generated_len: Tensor,  # [B] int64
    min_new_tokens: Tensor,  # [B] int64
    decay_start: Tensor,  # [B] int64
    decay_factor: Tensor,  # [B] fp32
    threads: int = DEFAULT_THREADS,
) -> None:
    """Launch the kernel on torch CUDA tensors, on torch's current stream, without a host sync."""
    import torch

    batch = logits.shape[0]
    if batch == 0:
        return
    if not logits.is_contiguous():
        raise ValueError("logits must be contiguous (the kernel writes into it)")
    cuda = _numba_cuda()
    stream = cuda.external_stream(torch.cuda.current_stream(logits.device).cuda_stream)
    tensors = (
        logits,
        token_ids,
        counts,
        row_ptr,
        repetition,
        frequency,
        presence,
        eos_ids,
        generated_len,
        min_new_tokens,
        decay_start,
        decay_factor,
    )
    # sync=False: the launch is ordered on the same stream, so no wait on the host.
    args = [cuda.as_cuda_array(t.contiguous(), sync=False) for t in tensors]
    _kernel()[batch, threads, stream](*args)


def apply_penalties_numpy_(
    logits: np.ndarray,  # [B, V] fp32, modified in place
    token_ids: np.ndarray,  # [N] int64
    counts: np.ndarray,  # [N] int32
    row_ptr: np.ndarray,  # [B+1] int64
    repetition: np.ndarray,  # [B] fp32
    frequency: np.ndarray,  # [B] fp32
    presence: np.ndarray,  # [B] fp32
    eos_ids: np.ndarray,  # [E] int64
    generated_len: np.ndarray,  # [B] int64
    min_new_tokens: np.ndarray,  # [B] int64
    decay_start: np.ndarray,  # [B] int64
    decay_factor: np.ndarray,  # [B] fp32
    threads: int = 8,
) -> None:
    """Run the kernel on host numpy arrays (the simulator, or a real GPU with copies)."""
    batch = logits.shape[0]
    if batch == 0:
        return
    _kernel()[batch, threads](
        logits,
        token_ids,
        counts,
        row_ptr,
        repetition,
        frequency,
        presence,
        eos_ids,
        generated_len,
        min_new_tokens,
        decay_start,
        decay_factor,
    )
