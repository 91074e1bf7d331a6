"""Decode attention over the token-slot KV pool: a Triton split-K ("flash decoding") kernel.

Stage 1: one program per (sequence, kv head, split) walks its share of the sequence's slots in
blocks of `BLOCK_N`, gathers K/V rows through the block table, and keeps an online softmax for the
whole GQA group (the group's query heads are the M dimension of `tl.dot`). Slots equal to the pad
slot and positions >= seq_len are skipped, so the work follows the live length. Stage 2 merges the
splits by their log-sum-exp. Shapes decide the grid and the scratch sizes, never the data, so the
launch is capturable in a CUDA graph (no host syncs, no data-dependent allocation).

Triton is imported lazily: this module imports on CPU without it. `decode_attention_ref` is the
pure-torch reference (same semantics) the kernel is tested against. With `TRITON_INTERPRET=1`
the kernel also runs on CPU tensors in Triton's interpreter (slow; tests only).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from torch import Tensor

BLOCK_N = 64  # keys per inner step

# The kernels' helper, bound by _kernels(): a module global, because Triton (compiler and
# interpreter alike) resolves a kernel's callees through its module's globals.
_block_step: Any = None


def decode_attention_ref(
    q: Tensor,  # [B, nh, hd]
    k_cache: Tensor,  # [S, nkv, hd]
    v_cache: Tensor,  # [S, nkv, hd]
    block_table: Tensor,  # [B, L] int64
    seq_lens: Tensor,  # [B] int64
    pad_slot: int | None = None,
) -> Tensor:
    """fp32 torch reference: softmax(q k^T / sqrt(hd)) v over slots [:seq_len] that are not pad.

    A row with no live slot (padding rows) gives zeros. Returns `[B, nh * hd]` in q's dtype.
    """
    b, nh, hd = q.shape
    n_kv = k_cache.shape[1]
    pad = k_cache.shape[0] - 1 if pad_slot is None else pad_slot
    length = block_table.shape[1]
    k = k_cache.index_select(0, block_table.reshape(-1)).view(b, length, n_kv, hd).float()
    v = v_cache.index_select(0, block_table.reshape(-1)).view(b, length, n_kv, hd).float()
    qg = q.float().view(b, n_kv, nh // n_kv, hd)  # [B, nkv, g, hd]
    scores = torch.einsum("bkgd,blkd->bkgl", qg, k) / math.sqrt(hd)  # [B, nkv, g, L]
    key_pos = torch.arange(length, device=q.device)  # [L]
    live = (key_pos[None, :] < seq_lens[:, None]) & (block_table != pad)  # [B, L]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
    out = torch.einsum("bkgl,blkd->bkgd", probs, v)  # [B, nkv, g, hd]
    return out.reshape(b, nh * hd).to(q.dtype)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def available() -> bool:
    """True when Triton imports and there is a CUDA device (or the interpreter is on)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return _interpret() or torch.cuda.is_available()


# fmt: off
@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Define (JIT-compile lazily) the two Triton kernels; argument lists kept dense on purpose.

    Over 60 lines on purpose: both kernels and their helper must be defined after `import
    triton` (it is optional: the module imports without it) and together, under the interpreter
    setting in force when they are first built (`TRITON_INTERPRET`, Triton's own switch)."""
    global _block_step
    import triton
    import triton.language as tl

    @triton.jit
    def block_step(
        q, K, V, Table, b, kvh, n0, end, m_i, l_i, acc,
        stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_tl, sm_scale, pad_slot,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr,
    ):
        """One block of BLOCK slots: gather K/V, update the online softmax of the group."""
        offs_d = tl.arange(0, HEAD_PAD)
        d_mask = offs_d < HEAD_DIM
        offs_n = n0 + tl.arange(0, BLOCK)
        n_mask = offs_n < end
        slots = tl.load(Table + b * stride_tb + offs_n * stride_tl, mask=n_mask, other=pad_slot)
        live = n_mask & (slots != pad_slot)  # [N]
        slots = slots.to(tl.int64)
        kv_mask = live[:, None] & d_mask[None, :]  # [N, D]
        k = tl.load(K + slots[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [N, D]
        if IEEE:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # [G, N] fp32
        else:
            qk = tl.dot(q, tl.trans(k))  # [G, N] fp32
        qk = tl.where(live[None, :], qk * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))  # [G]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)  # [G]
        p = tl.exp(qk - m_safe[:, None])  # [G, N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slots[:, None] * stride_vs + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # [N, D]
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")  # [G, D]
        else:
            pv = tl.dot(p.to(v.dtype), v)  # [G, D]
        return m_new, l_i, acc * alpha[:, None] + pv

    _block_step = block_step

    @triton.jit
    def split_kernel(
        Q, K, V, Table, Lens, MidO, MidL,
        stride_qb, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
        stride_tb, stride_tl, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        sm_scale, pad_slot, chunk,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        HEAD_PAD: tl.constexpr, BLOCK: tl.constexpr, IEEE: tl.constexpr, FOR_LOOP: tl.constexpr,
    ):
        """Program (b, kv head, split): partial softmax-weighted V and log-sum-exp per head."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        seq_len = tl.load(Lens + b)
        start = s * chunk
        end = tl.minimum(start + chunk, seq_len)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        g_mask = offs_g < GROUP
        gd_mask = g_mask[:, None] & (offs_d < HEAD_DIM)[None, :]  # [G, D]
        heads = kvh * GROUP + offs_g  # [G]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=gd_mask, other=0.0)  # [G, D]
        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_PAD], tl.float32)
        if FOR_LOOP:  # compiled: a pipelined for loop with run-time bounds
            for n0 in range(start, end, BLOCK):
                m_i, l_i, acc = _block_step(
                    q, K, V, Table, b, kvh, n0, end, m_i, l_i, acc,
                    stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_tl,
                    sm_scale, pad_slot, HEAD_DIM, HEAD_PAD, BLOCK, IEEE,
                )
        else:  # the interpreter cannot range() over tensors
            n0 = start
            while n0 < end:
                m_i, l_i, acc = _block_step(
                    q, K, V, Table, b, kvh, n0, end, m_i, l_i, acc,
                    stride_ks, stride_kh, stride_vs, stride_vh, stride_tb, stride_tl,
                    sm_scale, pad_slot, HEAD_DIM, HEAD_PAD, BLOCK, IEEE,
                )
                n0 += BLOCK
        has = l_i > 0.0
        out = acc / tl.where(has, l_i, 1.0)[:, None]  # [G, D]
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))  # [G]
        o_ptr = MidO + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + offs_d[None, :]
        tl.store(o_ptr, out, mask=gd_mask)
        tl.store(MidL + b * stride_lb + heads * stride_lh + s, lse, mask=g_mask)

    @triton.jit
    def combine_kernel(
        MidO, MidL, Out,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, num_splits,
        HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
    ):
        """Program (b, head): merge the splits' partial outputs by their log-sum-exp."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        d_mask = offs_d < HEAD_DIM
        s_mask = offs_s < num_splits
        lse = tl.load(MidL + b * stride_lb + h * stride_lh + offs_s, mask=s_mask,
                      other=float("-inf"))  # [S]
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp(lse - m)  # [S], dead splits -> 0
        o = tl.load(MidO + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os
                    + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [S, D]
        denom = tl.sum(w, 0)
        out = tl.sum(o * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)  # [D]
        out_ptr = Out + b * stride_outb + h * HEAD_DIM + offs_d
        tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=d_mask)

    return split_kernel, combine_kernel
# fmt: on


@functools.cache
def _target_programs(device_index: int | None) -> int:
    """About two waves of programs: 2 x the multiprocessor count (8 in the interpreter)."""
    if device_index is None:
        return 8
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def split_plan(batch: int, n_kv: int, length: int, target: int) -> tuple[int, int]:
    """(num_splits, chunk): shapes only, so a captured graph never needs a different grid."""
    max_splits = max(1, math.ceil(length / BLOCK_N))
    splits = min(max_splits, max(1, math.ceil(target / max(1, batch * n_kv))))
    chunk = math.ceil(math.ceil(length / splits) / BLOCK_N) * BLOCK_N
    return math.ceil(length / chunk), chunk


def decode_attention(
    q: Tensor,  # [B, nh, hd]
    k_cache: Tensor,  # [S, nkv, hd]
    v_cache: Tensor,  # [S, nkv, hd]
    block_table: Tensor,  # [B, L] int64 slots, pad = S - 1 unless `pad_slot`
    seq_lens: Tensor,  # [B] int64
    pad_slot: int | None = None,
) -> Tensor:
    """Triton decode attention -> `[B, nh * hd]` in q's dtype (semantics of `decode_attention_ref`)."""
    b, nh, hd = q.shape
    n_kv = k_cache.shape[1]
    if nh % n_kv:
        raise ValueError(f"{nh} query heads are not a multiple of {n_kv} kv heads")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension")
    pad = k_cache.shape[0] - 1 if pad_slot is None else pad_slot
    out = torch.empty(b, nh * hd, dtype=q.dtype, device=q.device)  # [B, nh*hd]
    q = q.to(k_cache.dtype)  # tl.dot wants one dtype
    length = block_table.shape[1]
    if b == 0:
        return out
    if length == 0:
        return out.zero_()
    split_kernel, combine_kernel = _kernels()
    dev = q.device.index if q.is_cuda else None
    if q.is_cuda and dev is None:
        dev = torch.cuda.current_device()
    splits, chunk = split_plan(b, n_kv, length, _target_programs(dev))
    group = nh // n_kv
    group_pad = max(16, 1 << (group - 1).bit_length())
    head_pad = max(16, 1 << (hd - 1).bit_length())
    mid_o = torch.empty(b, nh, splits, hd, dtype=torch.float32, device=q.device)  # [B, nh, S, hd]
    mid_l = torch.empty(b, nh, splits, dtype=torch.float32, device=q.device)  # [B, nh, S]
    # fmt: off
    split_kernel[(b, n_kv, splits)](
        q, k_cache, v_cache, block_table, seq_lens, mid_o, mid_l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_table.stride(0), block_table.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        1.0 / math.sqrt(hd), pad, chunk,
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=hd, HEAD_PAD=head_pad, BLOCK=BLOCK_N,
        IEEE=q.dtype == torch.float32, FOR_LOOP=not _interpret(), num_warps=4,
    )
    combine_kernel[(b, nh)](
        mid_o, mid_l, out,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_l.stride(0), mid_l.stride(1),
        out.stride(0), splits,
        HEAD_DIM=hd, HEAD_PAD=head_pad, SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()), num_warps=4,
    )
    # fmt: on
    return out
