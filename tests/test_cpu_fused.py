"""The CPU one-pass kernels equal the torch ops they replace."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.kernels.cpu import fused as cpu_fused
from runtime.model.backends import apply_rope


@pytest.fixture(params=["serial", "parallel"], autouse=True)
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel has a serial and a parallel driver, picked by size: run both."""
    limit = 0 if request.param == "parallel" else 1 << 60
    monkeypatch.setattr(cpu_fused, "PARALLEL_MIN_ELEMS", limit)
    return str(request.param)


@pytest.mark.parametrize(("t", "h"), [(1, 8), (5, 576), (70, 96)])
def test_rms_norm_matches_torch(t: int, h: int) -> None:
    gen = torch.Generator().manual_seed(t * h)
    x = torch.randn(t, h, generator=gen) * 3  # [T, H]
    x[0, 0] = 80.0  # an outlier channel, as real activations have
    w = torch.randn(h, generator=gen)
    want = F.rms_norm(x, (h,), w, 1e-5)
    got = cpu_fused.rms_norm(x, w, 1e-5)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_exp_poly_accuracy() -> None:
    from runtime.kernels.cpu import numba_kernels as cpu_kernels_numba

    x = np.linspace(-87.0, 87.0, 200_001, dtype=np.float32)  # the fp32 normal range of exp(-x)
    out = np.empty_like(x)
    cpu_kernels_numba.exp_neg_rows(x, out, np.empty(x.shape, dtype=np.int32))
    want = np.exp(-x.astype(np.float64))
    assert np.max(np.abs(out / want - 1.0)) < 1e-6


@pytest.mark.parametrize(("t", "i"), [(1, 4), (3, 1536), (65, 40)])
def test_silu_mul_matches_torch(t: int, i: int) -> None:
    gen = torch.Generator().manual_seed(t + i)
    gate_up = torch.randn(t, 2 * i, generator=gen) * 6  # [T, 2I]
    gate_up[0, 0], gate_up[0, 1 % i] = -200.0, 200.0  # saturated ends of the sigmoid
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = cpu_fused.silu_mul(gate_up)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("nh", "nkv", "hd"), [(9, 3, 64), (4, 4, 8), (7, 1, 16), (6, 2, 128)])
def test_rope_store_matches_torch(nh: int, nkv: int, hd: int) -> None:
    gen = torch.Generator().manual_seed(nh * hd)
    t, slots = 6, 20
    qkv = torch.randn(t, (nh + 2 * nkv) * hd, generator=gen)  # [T, (nh + 2 nkv) hd]
    pos = torch.tensor([0, 1, 2, 7, 300, 4095])  # [T]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd))  # [hd/2]
    freqs = pos.float()[:, None] * inv_freq[None, :]  # [T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # [T, 1, hd]
    out_slots = torch.tensor([3, 9, 0, slots, slots, 17])  # two padding rows on the pad slot
    k_want = torch.randn(slots + 1, nkv, hd, generator=gen)  # [S+1, nkv, hd]
    v_want = torch.randn(slots + 1, nkv, hd, generator=gen)
    k_got, v_got = k_want.clone(), v_want.clone()

    qk = apply_rope(qkv[:, : (nh + nkv) * hd].view(t, nh + nkv, hd), cos, sin)
    q_want, k_new = qk.split([nh, nkv], dim=1)
    live = out_slots != slots
    k_want.index_copy_(0, out_slots[live], k_new[live])
    v_want.index_copy_(0, out_slots[live], qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)[live])

    q_got = cpu_fused.rope_store(qkv, cos, sin, out_slots, k_got, v_got, nh)
    assert torch.allclose(q_got, q_want, rtol=1e-5, atol=1e-5)
    # every real slot as the torch path writes it; the pad slot's contents do not matter
    assert torch.allclose(k_got[:slots], k_want[:slots], rtol=1e-5, atol=1e-5)
    assert torch.equal(v_got[:slots], v_want[:slots])
