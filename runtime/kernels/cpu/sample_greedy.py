"""One-pass greedy sampling for the CPU: each row's argmax and its log-softmax in one read.

The torch path (`Sampler.sample`, greedy batches) makes an argmax pass, then logsumexp's max,
subtract-exp-sum and log passes over the [B, V] logits. Here each row is read once, in
8 KiB blocks: the block's max, then (still in L1) its sum of e^(x - running max), and the
running sum is rescaled when the max grows (an online logsumexp). Every loop vectorises without
fastmath (so NaN and inf keep their IEEE meaning), and e^z is the polynomial the other CPU
kernels use (no SVML here: `np.exp` is a libm call per element); sums in fp64.

Semantics equal torch's `argmax` (first index on ties; NaN counts as the max) and
`x[argmax] - logsumexp(x)`, up to rounding (~1e-6): rows with a NaN or +inf, and rows that are
all -inf, get torch's token and torch's NaN logprob. Values more than 87 below the row's max add
e^-87 (~2e-38) each, below the resolution of a sum >= 1. The kernels live in `numba_kernels`
(Numba's cache watches a function's own file only: callers and callees together).
"""

from __future__ import annotations

import torch
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention

# Two rows or more go parallel: with OpenMP's workers spinning (runtime/__init__.py) a parallel
# call costs less than one 49,152-value row (~50 us); profiling/README.md has the figures.
PARALLEL_MIN_ROWS = 2


def greedy_logprob_torch(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(argmax [B] int64, logprob of it [B] fp32) of contiguous fp32 CPU `logits` [B, V]."""
    x = logits.detach().numpy()  # [B, V], no copy
    kernel = cpu_attention.driver("greedy_logprob", x.shape[0] >= PARALLEL_MIN_ROWS)
    tokens, logprob = kernel(x)  # [B], [B]
    return torch.from_numpy(tokens), torch.from_numpy(logprob)
