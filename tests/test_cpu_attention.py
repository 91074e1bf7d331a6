"""The CPU paged decode kernel equals the torch gather + SDPA path it replaces."""

from __future__ import annotations

import pytest
import torch

from runtime.kernels.cpu import attention as cpu_attention
from runtime.model.attention import decode_group, sdpa_attend


@pytest.fixture(params=["serial", "parallel"], autouse=True)
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel has a serial and a parallel driver, picked by size: run both."""
    limit = 0 if request.param == "parallel" else 1 << 60
    monkeypatch.setattr(cpu_attention, "PARALLEL_MIN_ROWS", limit)
    return str(request.param)


@pytest.mark.parametrize(
    ("nh", "nkv", "hd"), [(9, 3, 64), (4, 4, 32), (8, 2, 40), (7, 1, 16), (10, 2, 8)]
)
def test_kernel_matches_torch_path(nh: int, nkv: int, hd: int) -> None:
    gen = torch.Generator().manual_seed(nh * 100 + hd)
    slots, b, l_max = 500, 7, 33
    k = torch.randn(slots + 1, nkv, hd, generator=gen)  # [S+1, nkv, hd]; slot S is the pad slot
    v = torch.randn(slots + 1, nkv, hd, generator=gen)
    table = torch.randint(0, slots, (b, l_max), generator=gen)  # [B, L]
    seq_lens = torch.tensor([1, 33, 5, 17, 2, 33, 9])  # [B]
    table[0, 1:] = slots  # a padding row: one live slot, the rest pad
    q = torch.randn(b, nh, hd, generator=gen)  # [B, nh, hd]
    got = cpu_attention.paged_decode_attention(q, k, v, table, seq_lens)
    want = sdpa_attend(q, k, v, decode_group(table, seq_lens))  # the torch path
    assert got.shape == (b, nh * hd)
    assert (got - want).abs().max().item() <= 1e-5


def test_kernel_ignores_slots_past_seq_len() -> None:
    k = torch.randn(11, 1, 8)
    v = torch.randn(11, 1, 8)
    table = torch.tensor([[3, 4, 5, 6]])
    q = torch.randn(1, 1, 8)
    short = cpu_attention.paged_decode_attention(q, k, v, table, torch.tensor([2]))
    k[5:7] = 1e6  # garbage past the live length must not matter
    v[5:7] = float("nan")
    assert torch.equal(
        short, cpu_attention.paged_decode_attention(q, k, v, table, torch.tensor([2]))
    )
