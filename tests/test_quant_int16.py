"""int16 mode (`quant_int16`): the integer GEMV over GGUF blocks equals its fp32 twin, the
rounded activations' product `x~ @ W.T`; a token's result does not depend on its batch; every
path (GEMV, K-format GEMV, prefill) multiplies the same x~."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.kernels.cpu import quant as Q
from runtime.kernels.cpu import quant_linear as QL
from tests.test_quant_kernels import _close, _random_blocks

INT16 = QL.INT16_FORMATS


@pytest.fixture(params=["serial", "parallel"])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel has a serial and a parallel driver, picked by size: run both."""
    limit = 0 if request.param == "parallel" else 1 << 60
    monkeypatch.setattr(QL, "PARALLEL_MIN_WORK", limit)
    return str(request.param)


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """x~: x rounded to int16 per 32-block (max|x| / 32767 steps), in float64, by torch."""
    xb = x.double().view(x.shape[0], -1, 32)  # [T, nb, 32]
    d = (xb.abs().amax(-1, keepdim=True).float() / 32767.0).double()  # fp32 scale, as the kernel
    q = torch.where(d > 0, (xb.float() * (1.0 / d.float()) + 0.5).floor().double(), 0.0)
    return (q * d).view_as(x)


def _gemv(m: Q.QuantMatrix, x: np.ndarray, tile: int) -> np.ndarray:
    n_t = x.shape[0]
    n_pad = -(-n_t // tile) * tile
    out = np.empty((n_t, m.rows), np.float32)
    k16 = QL._int16_kernels()
    kernel, n_chunks = QL._driver("linear", m.rows * m.cols * n_t, kernels=k16)
    kernel(Q.FMT_ID[m.fmt], tile, m.data, x, n_pad, out, 0, False, out, n_chunks)
    return out


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("fmt", INT16)
@pytest.mark.parametrize("t", [1, 3, 8, 11])
def test_gemv_equals_rounded_product(fmt: str, t: int) -> None:
    """Random blocks (any nibble, any finite scale): the GEMV is x~ @ W.T to fp32 rounding,
    and within int16 rounding (~1.5e-5 of a block's max) of x @ W.T; every tile gives the
    same bits for every token."""
    m = _random_blocks(fmt, 40, 512, seed=t)
    w = Q.dequantize(m).double()  # [out, in]
    x = torch.randn(t, 512, generator=torch.Generator().manual_seed(t))  # [T, in]
    x[0, 32:64] = 0  # an all-zero block
    outs = [_gemv(m, x.numpy(), tile) for tile in QL._int16_kernels().TILES]
    _close(torch.from_numpy(outs[0]).double(), _rounded(x) @ w.T, 1e-6)
    _close(torch.from_numpy(outs[0]).double(), x.double() @ w.T, 2e-4)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


@pytest.mark.usefixtures("driver")
def test_a_token_alone_equals_it_in_a_batch() -> None:
    m = _random_blocks("q4_1", 64, 576, seed=5)
    x = torch.randn(13, 576, generator=torch.Generator().manual_seed(2)).numpy()  # [T, in]
    lin = QL.QuantLinear([m], mode="int16")
    alone = np.stack([lin(torch.from_numpy(x[i : i + 1])).numpy()[0] for i in range(13)])
    for n in (2, 5, 8, 13):
        assert np.array_equal(lin(torch.from_numpy(x[:n])).numpy(), alone[:n])


def test_act_round_is_what_act_quantize_encodes() -> None:
    k16 = QL._int16_kernels()
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(9)) * 10  # [T, in]
    x[1, :32] = 0
    xq = np.empty((8, 256), np.int16)
    sx, xs = np.empty((8, 8), np.float32), np.empty((8, 8), np.float32)
    k16.act_quantize(x.numpy(), xq, sx, xs)
    xr = np.empty((5, 256), np.float32)
    k16.act_round(x.numpy(), xr)
    dq = (xq[:5].reshape(5, 8, 32) * sx.T[:5, :, None]).reshape(5, 256)
    assert np.array_equal(xr, dq.astype(np.float32))
    assert np.abs(xq).max() == 32767 and not xq[5:].any() and not sx[:, 5:].any()
    sums = dq.reshape(5, 8, 32).sum(-1).T  # [nb, T]
    assert np.allclose(xs[:, :5], sums, rtol=1e-5, atol=1e-4)
    assert torch.allclose(torch.from_numpy(xr).double(), _rounded(x), rtol=0, atol=1e-6)


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("t", [1, 8, QL.INT16_GEMV_MAX_TOKENS, QL.INT16_GEMV_MAX_TOKENS + 1])
def test_linear_mixed_formats_bias_and_residual(t: int) -> None:
    """q, k, v-like parts of every format (K formats take the fp32 GEMV on x~): every path's
    result is x~ @ W.T (+ bias, + residual), adjacent parts of a format merged into one."""
    gen = torch.Generator().manual_seed(t)
    rows = {"q4_0": 24, "q4_1": 40, "q8_0": 16, "q4_k": 8, "q6_k": 12}
    parts = [Q.quantize(torch.randn(r, 512, generator=gen), f) for f, r in rows.items()]
    parts.insert(1, Q.quantize(torch.randn(8, 512, generator=gen), "q4_0"))
    w = torch.cat([Q.dequantize(p) for p in parts]).double()  # [out, in]
    x = torch.randn(t, 512, generator=gen)  # [T, in]
    bias, residual = torch.randn(w.shape[0]), torch.randn(t, w.shape[0])
    lin = QL.QuantLinear(parts, bias, mode="int16")
    assert len(lin.parts) == len(parts) - 1 and lin.parts[0].rows == 32
    want = _rounded(x) @ w.T
    _close(lin(x).double(), want + bias.double(), 1e-5)
    _close(lin.add_to(x, residual).double(), want + bias.double() + residual.double(), 1e-5)
    plain = QL.QuantLinear(parts, mode="int16")
    _close(plain(x).double(), want, 1e-5)


def test_int16_rejects_the_lane_layout() -> None:
    from runtime.kernels.cpu import quant_pack as QP

    lanes = QP.pack(_random_blocks("q4_1", 8, 64, seed=1))
    with pytest.raises(ValueError, match="int16 mode runs on GGUF blocks"):
        QL.QuantLinear([lanes], mode="int16")


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("fmt", INT16)
def test_vector_dequant_is_bit_equal(fmt: str) -> None:
    """The prefill scratch's vector dequantization equals the numpy twin to the bit, any
    row range (random nibbles and scales, q4_0's offset, q8_0's signs)."""
    m = _random_blocks(fmt, 40, 512, seed=3)
    out = np.empty((27, 512), np.float32)
    QL._dequant_rows_into(m, 9, 36, out)
    assert np.array_equal(out, Q.dequantize(m).numpy()[9:36])
