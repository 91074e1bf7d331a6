"""int16 mode's fused decode step: the decoder stack of a decode-only batch in one Numba call.

`FusedDecode.build` takes a model's per-layer projections and norms once, at load, and returns
None unless every projection is an int16-mode `QuantLinear` of one q4_0 / q4_1 / q8_0 part
(a qkv bias is allowed, no other). A call runs `decode_numba.decode_layers`: the per-op path's
kernels in its order, so it gives the same bits (tests compare them) in ~half the time at batch
1 (profiling/README.md, session 10). Prefill chunks, and batches past `INT16_GEMV_MAX_TOKENS`
tokens, take the per-op path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from runtime.kernels.cpu import attention as cpu_attention
from runtime.kernels.cpu.quant import FMT_ID, QuantMatrix
from runtime.kernels.cpu.quant_linear import (
    INT16_FORMATS,
    INT16_GEMV_MAX_TOKENS,
    QuantLinear,
    int16_tile,
)

# (qkv, o, gate_up, down) of one layer
LayerLinears = tuple[Any, Any, Any, Any]


@functools.cache
def _kernels() -> Any:
    assert cpu_attention.available(), "Numba is not available"  # sets the threading layer
    from runtime.kernels.cpu import decode_numba  # module level: Numba can cache it

    return decode_numba


def _blocks(linear: Any, bias_ok: bool) -> QuantMatrix | None:
    """The one int16-format part of an int16-mode `QuantLinear`, else None."""
    if not isinstance(linear, QuantLinear) or linear.mode != "int16" or len(linear.parts) != 1:
        return None
    part = linear.parts[0]
    if not isinstance(part, QuantMatrix) or part.fmt not in INT16_FORMATS:
        return None
    return part if bias_ok or linear.bias is None else None


@dataclass
class FusedDecode:
    """The stack's arguments to `decode_layers`, built once (numba typed lists of the blocks)."""

    fmts: np.ndarray  # [L, 4] format ids of (qkv, o, gate_up, down)
    weights: tuple[Any, Any, Any, Any]  # numba.typed.List of [rows, row_bytes] uint8, per layer
    qkv_bias: Any  # numba.typed.List of [qkv rows] fp32 (empty: no bias)
    ln_in: np.ndarray  # [L, H]
    ln_post: np.ndarray  # [L, H]
    eps: np.float32
    n_kv: int
    head_dim: int

    @classmethod
    def build(
        cls,
        linears: Sequence[LayerLinears],
        ln_in: Sequence[Tensor],
        ln_post: Sequence[Tensor],
        eps: float,
        n_kv: int,
        head_dim: int,
    ) -> FusedDecode | None:
        """The fused step for these layers, or None where a layer does not qualify."""
        parts = [[_blocks(lin, i == 0) for i, lin in enumerate(layer)] for layer in linears]
        if not parts or any(p is None for layer in parts for p in layer):
            return None
        from numba.typed import List

        weights = tuple(List([layer[i].data for layer in parts]) for i in range(4))  # type: ignore[union-attr]
        empty = np.empty(0, np.float32)
        bias = List([_bias(layer[0]) if layer[0].bias is not None else empty for layer in linears])
        fmts = np.array([[FMT_ID[p.fmt] for p in layer] for layer in parts], np.int64)  # type: ignore[union-attr]
        return cls(
            fmts=fmts,
            weights=weights,  # type: ignore[arg-type]
            qkv_bias=bias,
            ln_in=torch.stack([w.detach() for w in ln_in]).float().contiguous().numpy(),
            ln_post=torch.stack([w.detach() for w in ln_post]).float().contiguous().numpy(),
            eps=np.float32(eps),
            n_kv=n_kv,
            head_dim=head_dim,
        )

    @staticmethod
    def applies(query_lens: Sequence[int]) -> bool:
        """Whether a batch of these new tokens per sequence runs fused: one each (decode-only),
        within the integer GEMV's rows."""
        return 0 < len(query_lens) <= INT16_GEMV_MAX_TOKENS and all(n == 1 for n in query_lens)

    def __call__(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        out_slots: Tensor,
        k: Tensor,
        v: Tensor,
        table: Tensor,
        seq_lens: Tensor,
    ) -> Tensor:
        """Every layer on the embeddings x `[T, H]` (updated in place, and returned): cos, sin
        `[T, 1, hd]`, K/V pools `[L, S, nkv, hd]`, token t's slots `table[t]` `[T, Lmax]`."""
        n_t, hd = x.shape[0], self.head_dim
        x = x.to(torch.float32).contiguous()
        tile = int16_tile(n_t)
        n_chunks = cpu_attention.numba_threads(torch.get_num_threads())
        attn_parallel = n_t > 1 and n_t * table.shape[1] >= cpu_attention.PARALLEL_MIN_ROWS
        _kernels().decode_layers(
            x.numpy(),
            self.fmts,
            *self.weights[:1],
            self.qkv_bias,
            *self.weights[1:],
            self.ln_in,
            self.ln_post,
            self.eps,
            cos.reshape(n_t, hd).numpy(),  # [T, hd], a view
            sin.reshape(n_t, hd).numpy(),
            out_slots.numpy(),
            k.numpy(),
            v.numpy(),
            table.numpy(),
            seq_lens.numpy(),
            np.float32(1.0 / np.sqrt(hd)),
            self.n_kv,
            tile,
            n_chunks,
            attn_parallel,
        )
        return x


def _bias(linear: QuantLinear) -> np.ndarray:
    assert linear.bias is not None
    return linear.bias.numpy()
