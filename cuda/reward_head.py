"""Reward head as a kernel: gather each sequence's last hidden row, final RMSNorm, score head.

`reward_scores_torch` is the CPU twin (plain torch, any device); `reward_scores_cupy` is a CuPy
RawKernel with the same semantics, launched on torch's current stream, zero-copy through DLPack;
`reward_scores` picks the kernel for CUDA tensors when CuPy imports, else the twin.

Semantics, for each sequence b with row r = last_index[b] of `hidden_rows` (pre-final-norm):
    x  = hidden_rows[r] (fp32);  xn = x * rsqrt(mean(x^2) + eps) * norm_weight      (fp32)
    dot kinds ("seq_cls", "internlm2_reward"):  score = xn . weight                    (fp32)
    "qwen2_reward":  z = W1 @ xn.to(W1.dtype) (matmul in W1's dtype, fp32 accumulate)
                     score = relu(z + b1) . w2 + b2                                     (fp32)
Every reduction accumulates in fp32, whatever the input dtype (fp32, bf16, fp16). The norm and
head weights are all taken in the dtype of the head's main weight (`weight` or `w1`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DOT_KINDS",
    "KINDS",
    "cupy_available",
    "reward_scores",
    "reward_scores_cupy",
    "reward_scores_torch",
]

DOT_KINDS = ("seq_cls", "internlm2_reward")
KINDS = (*DOT_KINDS, "qwen2_reward")
BLOCK = 256  # threads per block (a multiple of 32, at most 1024)


def _check(
    hidden_rows: Tensor,
    last_index: Tensor,
    norm_weight: Tensor,
    head: Mapping[str, Tensor],
    kind: str,
) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown reward head kind {kind!r} (expected one of {', '.join(KINDS)})")
    if hidden_rows.dim() != 2 or last_index.dim() != 1:
        raise ValueError("hidden_rows must be [T, H] and last_index [B]")
    if last_index.dtype != torch.int64:
        raise ValueError(f"last_index must be int64 (got {last_index.dtype})")
    h = hidden_rows.shape[1]
    want = (
        {"weight": (h,)}
        if kind in DOT_KINDS
        else {"w1": (h, h), "b1": (h,), "w2": (h,), "b2": (1,)}
    )
    got = {"norm_weight": tuple(norm_weight.reshape(-1).shape)}
    got |= {
        k: tuple(head[k].shape if k == "w1" else head[k].reshape(-1).shape)
        for k in want
        if k in head
    }
    for name, shape in ({"norm_weight": (h,)} | want).items():
        if got.get(name) != shape:
            raise ValueError(f"{kind} head: {name} must have shape {shape} (got {got.get(name)})")


def _weights(norm_weight: Tensor, head: Mapping[str, Tensor], kind: str) -> dict[str, Tensor]:
    """Norm and head weights, detached, flat (but W1), contiguous, all in the head weight's dtype."""
    names = ("weight",) if kind in DOT_KINDS else ("w1", "b1", "w2", "b2")
    dtype = head[names[0]].dtype
    out = {k: head[k].detach().to(dtype) for k in names} | {"norm": norm_weight.detach().to(dtype)}
    return {k: (v if k == "w1" else v.reshape(-1)).contiguous() for k, v in out.items()}


@torch.no_grad()
def reward_scores_torch(
    hidden_rows: Tensor,  # [T, H] all tokens of the batch, before the final norm
    last_index: Tensor,  # [B] int64, each sequence's last row in hidden_rows
    norm_weight: Tensor,  # [H] final RMSNorm weight
    eps: float,
    head: Mapping[str, Tensor],
    kind: str,
) -> Tensor:
    """The CPU twin: `[B]` fp32 scores (see the module docstring for the exact semantics)."""
    _check(hidden_rows, last_index, norm_weight, head, kind)
    w = _weights(norm_weight, head, kind)
    x = hidden_rows.index_select(0, last_index).float()  # [B, H]
    inv = torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)  # [B, 1]
    xn = x * inv * w["norm"].float()  # [B, H]
    if kind in DOT_KINDS:
        return xn @ w["weight"].float()  # [B]
    z = F.linear(xn.to(w["w1"].dtype), w["w1"]).float() + w["b1"].float()  # [B, H]
    return z.relu() @ w["w2"].float() + w["b2"].float()  # [B]


# ---- CuPy kernel -------------------------------------------------------------------------------
# No headers: bf16/fp16 travel as raw 16-bit words and are converted by hand / with PTX cvt.
_KERNEL_SRC = r"""
typedef unsigned short u16;
__device__ __forceinline__ float ld_f32(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float ld_bf16(const u16* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ float ld_f16(const u16* p, long long i) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p[i])); return f;
}
__device__ __forceinline__ void st_f32(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void st_bf16(u16* p, long long i, float v) {  // round to nearest even
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (u16)((u >> 16) | 0x40u); return; }  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (u16)(u >> 16);
}
__device__ __forceinline__ void st_f16(u16* p, long long i, float v) {
    u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); p[i] = h;
}

// Sum a and b over the block; every thread gets the totals. blockDim.x is a multiple of 32.
__device__ __forceinline__ void block_sum2(float& a, float& b) {
    __shared__ float sa[32], sb[32];
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    a = lane < nw ? sa[lane] : 0.f;
    b = lane < nw ? sb[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) {
        a += __shfl_xor_sync(0xffffffffu, a, o);
        b += __shfl_xor_sync(0xffffffffu, b, o);
    }
}

// One block per sequence: score = rsqrt(mean(x^2) + eps) * sum(x * norm_w * head_w).
extern "C" __global__ void rms_dot(const XT* __restrict__ rows, const long long* __restrict__ idx,
                                   const WT* __restrict__ nw, const WT* __restrict__ hw,
                                   float eps, int H, long long stride, float* __restrict__ out) {
    const XT* x = rows + idx[blockIdx.x] * stride;
    float ss = 0.f, dot = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = LDX(x, i);
        ss += v * v;
        dot += v * LDW(nw, i) * LDW(hw, i);
    }
    block_sum2(ss, dot);
    if (threadIdx.x == 0) out[blockIdx.x] = dot * rsqrtf(ss / (float)H + eps);
}

// One block per sequence: xn[b] = x * rsqrt(mean(x^2) + eps) * norm_w, stored in W's dtype.
extern "C" __global__ void rms_norm_rows(const XT* __restrict__ rows, const long long* __restrict__ idx,
                                         const WT* __restrict__ nw, float eps, int H, long long stride,
                                         WT* __restrict__ xn) {
    const XT* x = rows + idx[blockIdx.x] * stride;
    float ss = 0.f, unused = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) { const float v = LDX(x, i); ss += v * v; }
    block_sum2(ss, unused);
    const float inv = rsqrtf(ss / (float)H + eps);
    WT* o = xn + (long long)blockIdx.x * H;
    for (int i = threadIdx.x; i < H; i += blockDim.x) STW(o, i, LDX(x, i) * inv * LDW(nw, i));
}

// One block per sequence: score = sum(relu(z[b] + b1) * w2) + b2, z = W1 @ xn from cuBLAS.
extern "C" __global__ void relu_dot(const WT* __restrict__ z, const WT* __restrict__ b1,
                                    const WT* __restrict__ w2, const WT* __restrict__ b2, int H,
                                    float* __restrict__ out) {
    const WT* zr = z + (long long)blockIdx.x * H;
    float acc = 0.f, unused = 0.f;
    for (int i = threadIdx.x; i < H; i += blockDim.x) {
        const float v = LDW(zr, i) + LDW(b1, i);
        acc += (v > 0.f ? v : 0.f) * LDW(w2, i);
    }
    block_sum2(acc, unused);
    if (threadIdx.x == 0) out[blockIdx.x] = acc + LDW(b2, 0);
}
"""

# torch dtype -> (C type, load fn, store fn, the torch dtype CuPy sees through DLPack)
_TYPES: dict[torch.dtype, tuple[str, str, str, torch.dtype]] = {
    torch.float32: ("float", "ld_f32", "st_f32", torch.float32),
    torch.bfloat16: ("u16", "ld_bf16", "st_bf16", torch.int16),
    torch.float16: ("u16", "ld_f16", "st_f16", torch.int16),
}
_cupy: Any = None  # the cupy module once imported; False when it cannot be
_modules: dict[tuple[torch.dtype, torch.dtype], Any] = {}


def kernel_source(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """The CUDA source specialised for hidden rows of `x_dtype` and weights of `w_dtype`."""
    if x_dtype not in _TYPES or w_dtype not in _TYPES:
        raise ValueError(f"unsupported dtypes {x_dtype}, {w_dtype} (fp32, bf16, fp16 only)")
    xt, ldx, _, _ = _TYPES[x_dtype]
    wt, ldw, stw, _ = _TYPES[w_dtype]
    defs = f"#define XT {xt}\n#define LDX {ldx}\n#define WT {wt}\n#define LDW {ldw}\n#define STW {stw}\n"
    return defs + _KERNEL_SRC


def _import_cupy() -> Any:
    global _cupy
    if _cupy is None:
        try:
            import cupy

            _cupy = cupy
        except Exception:  # not installed, or no usable CUDA runtime
            _cupy = False
    return _cupy


def cupy_available() -> bool:
    """Whether CuPy imports (checked once; the import is lazy so CPU machines never need it)."""
    return bool(_import_cupy())


def _module(x_dtype: torch.dtype, w_dtype: torch.dtype) -> Any:
    key = (x_dtype, w_dtype)
    if key not in _modules:
        _modules[key] = _import_cupy().RawModule(
            code=kernel_source(x_dtype, w_dtype), options=("--std=c++11",)
        )
    return _modules[key]


def _cp(t: Tensor) -> Any:
    """A zero-copy CuPy view of `t` (bf16/fp16 as int16 words); call inside the stream context."""
    t = t.detach()
    return _cupy.from_dlpack(t.view(_TYPES[t.dtype][3]) if t.dtype in _TYPES else t)


@torch.no_grad()
def reward_scores_cupy(
    hidden_rows: Tensor,  # [T, H] on CUDA, pre-final-norm
    last_index: Tensor,  # [B] int64 on the same device
    norm_weight: Tensor,  # [H]
    eps: float,
    head: Mapping[str, Tensor],
    kind: str,
) -> Tensor:
    """The CuPy kernel: `[B]` fp32 scores, same semantics as `reward_scores_torch`.

    Launched on torch's current stream; outputs are torch-allocated (no CuPy memory pool use);
    `last_index` is not range-checked on the device (the twin's index_select is).
    """
    _check(hidden_rows, last_index, norm_weight, head, kind)
    cp = _import_cupy()
    if not cp:
        raise RuntimeError("CuPy is not importable")
    dev = hidden_rows.device
    if dev.type != "cuda":
        raise ValueError("reward_scores_cupy needs CUDA tensors")
    if hidden_rows.stride(1) != 1:
        hidden_rows = hidden_rows.contiguous()
    t, h = hidden_rows.shape
    b = last_index.shape[0]
    out = torch.empty(b, dtype=torch.float32, device=dev)  # [B]
    if b == 0:
        return out
    w = _weights(norm_weight, head, kind)
    w_dtype, nw = w["norm"].dtype, w["norm"]
    idx = last_index.contiguous()
    args_common = (np.float32(eps), np.int32(h), np.int64(hidden_rows.stride(0)))
    mod = _module(hidden_rows.dtype, w_dtype)
    stream = torch.cuda.current_stream(dev)
    with cp.cuda.Device(dev.index), cp.cuda.ExternalStream(stream.cuda_stream):
        grid, block = (b,), (BLOCK,)
        if kind in DOT_KINDS:
            fn = mod.get_function("rms_dot")
            fn(
                grid,
                block,
                (_cp(hidden_rows), _cp(idx), _cp(nw), _cp(w["weight"]), *args_common, _cp(out)),
            )
            return out
        xn = torch.empty(b, h, dtype=w_dtype, device=dev)  # [B, H] normed rows in W1's dtype
        fn = mod.get_function("rms_norm_rows")
        fn(grid, block, (_cp(hidden_rows), _cp(idx), _cp(nw), *args_common, _cp(xn)))
    z = F.linear(xn, w["w1"]).contiguous()  # [B, H] cuBLAS on the same (current) stream
    b1, w2, b2 = w["b1"], w["w2"], w["b2"]
    with cp.cuda.Device(dev.index), cp.cuda.ExternalStream(stream.cuda_stream):
        fn = mod.get_function("relu_dot")
        fn(grid, block, (_cp(z), _cp(b1), _cp(w2), _cp(b2), np.int32(h), _cp(out)))
    return out


def reward_scores(
    hidden_rows: Tensor,
    last_index: Tensor,
    norm_weight: Tensor,
    eps: float,
    head: Mapping[str, Tensor],
    kind: str,
    use_kernel: bool = True,
) -> Tensor:
    """`[B]` fp32 scores: the CuPy kernel for CUDA tensors when CuPy imports and `use_kernel`,
    else the torch twin."""
    if use_kernel and hidden_rows.is_cuda and cupy_available():
        return reward_scores_cupy(hidden_rows, last_index, norm_weight, eps, head, kind)
    return reward_scores_torch(hidden_rows, last_index, norm_weight, eps, head, kind)
