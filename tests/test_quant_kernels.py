"""GGUF block-format weights: the numpy twin equals gguf's reference, the Numba kernels equal the
twin (exact mode) or stay within int8-activation error (fast mode)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from runtime.kernels.cpu import quant as Q
from runtime.kernels.cpu import quant_linear as QL
from runtime.kernels.cpu import quant_pack as QP

gguf = pytest.importorskip("gguf")
GGUF_PATH = Path("/tmp/work/gguf/SmolLM2-135M-Instruct.Q4_1.gguf")
# fp16 bit patterns that are finite and not subnormal-tiny: random scales for random blocks
_F16_OK = np.flatnonzero(
    np.isfinite(np.arange(1 << 16, dtype=np.uint16).view(np.float16))
    & (np.abs(np.arange(1 << 16, dtype=np.uint16).view(np.float16)) < 4)
).astype(np.uint16)
# byte offsets of each format's fp16 fields within a block
_F16_FIELDS = {"q4_0": [0], "q4_1": [0, 2], "q8_0": [0], "q4_k": [0, 2], "q6_k": [208]}
# max |dequantize(quantize(w)) - w| / max|w| per block for unit-normal blocks (4 bits: 1/15 of
# the block's range is the step; q8_0: 1/127 of its max; q6_k: 1/32)
_ROUNDTRIP_TOL = {"q4_0": 0.1, "q4_1": 0.1, "q8_0": 0.01, "q4_k": 0.12, "q6_k": 0.04}


def _random_blocks(fmt: str, rows: int, cols: int, seed: int) -> Q.QuantMatrix:
    """Random block bytes with random finite fp16 scales."""
    rng = np.random.default_rng(seed)
    nb, bb = cols // Q.BLOCK_ELEMS[fmt], Q.BLOCK_BYTES[fmt]
    blocks = rng.integers(0, 256, (rows * nb, bb), dtype=np.uint8)
    for off in _F16_FIELDS[fmt]:
        vals = rng.choice(_F16_OK, rows * nb)
        blocks[:, off : off + 2] = vals.view(np.uint8).reshape(-1, 2)
    return Q.from_gguf_bytes(fmt, blocks, rows, cols)


def _gguf_dequant(m: Q.QuantMatrix) -> np.ndarray:
    out = gguf.quants.dequantize(m.data, gguf.GGMLQuantizationType(Q.GGML_TYPE[m.fmt]))
    return np.asarray(out).reshape(m.rows, m.cols)


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_dequantize_matches_gguf_random(fmt: str) -> None:
    m = _random_blocks(fmt, 5, 2 * Q.BLOCK_ELEMS[fmt], seed=len(fmt))
    assert np.array_equal(Q.dequantize(m).numpy(), _gguf_dequant(m))
    ids = np.array([4, 0, 4])
    assert np.array_equal(Q.dequantize_rows(m, ids).numpy(), _gguf_dequant(m)[ids])


@functools.cache
def _gguf_tensors() -> dict[str, Any]:
    reader = gguf.GGUFReader(GGUF_PATH)
    return {t.name: t for t in reader.tensors}


@pytest.mark.skipif(not GGUF_PATH.exists(), reason="the SmolLM2 Q4_1 GGUF is not downloaded")
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.ffn_down.weight"])
def test_dequantize_matches_gguf_real(name: str) -> None:
    t = _gguf_tensors()[name]
    cols, rows = (int(s) for s in t.shape)
    m = Q.from_gguf_bytes("q4_1", t.data, rows, cols)
    assert np.array_equal(Q.dequantize(m).numpy(), _gguf_dequant(m))


@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_quantize_round_trips(fmt: str) -> None:
    w = torch.randn(6, 2 * Q.BLOCK_ELEMS[fmt], generator=torch.Generator().manual_seed(3))
    m = Q.quantize(w, fmt)
    assert m.data.shape == (6, Q.row_bytes(fmt, w.shape[1]))
    err = (Q.dequantize(m) - w).abs().amax(dim=1) / w.abs().amax(dim=1)  # [rows]
    assert err.max().item() < _ROUNDTRIP_TOL[fmt]
    if fmt in ("q4_0", "q4_1", "q8_0"):  # gguf has the reference quantizer
        ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(Q.GGML_TYPE[fmt]))
        assert np.array_equal(m.data, ref)


def test_quantize_rejects_ragged_cols() -> None:
    with pytest.raises(ValueError, match=r"\[3, 40\]"):
        Q.quantize(torch.zeros(3, 40), "q4_1")


def test_take_rows() -> None:
    m = _random_blocks("q4_k", 6, 256, seed=1)
    idx = np.array([5, 1, 1])
    assert torch.equal(Q.dequantize(m.take_rows(idx)), Q.dequantize(m)[idx])


@pytest.fixture(params=["serial", "parallel"])
def driver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel has a serial and a parallel driver, picked by size: run both."""
    limit = 0 if request.param == "parallel" else 1 << 60
    monkeypatch.setattr(QL, "PARALLEL_MIN_WORK", limit)
    return str(request.param)


def _parts(seed: int) -> list[Q.QuantMatrix]:
    """q, k, v-like parts of every format over 512 inputs (two superblocks)."""
    gen = torch.Generator().manual_seed(seed)
    rows = {"q4_0": 24, "q4_1": 40, "q8_0": 16, "q4_k": 8, "q6_k": 12}
    return [Q.quantize(torch.randn(r, 512, generator=gen), fmt) for fmt, r in rows.items()]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rel * scale, (got - want).abs().max().item() / scale


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("t", [1, 3, 8, 9, 16, 32, 64])  # every lane path beside every block one
def test_exact_linear_matches_dequantized(t: int) -> None:
    parts = _parts(t)
    w = torch.cat([Q.dequantize(p) for p in parts])  # [out, in]
    gen = torch.Generator().manual_seed(100 + t)
    x = torch.randn(t, 512, generator=gen)  # [T, in]
    bias = torch.randn(w.shape[0], generator=gen)
    residual = torch.randn(t, w.shape[0], generator=gen)  # [T, out]
    plain = QL.QuantLinear(parts)
    assert plain.out_features == w.shape[0] and plain.in_features == 512
    assert plain.weight_bytes == sum(QL.lane_layout(p).nbytes for p in parts)
    # q4_0, q4_1, q8_0 in lanes (distinct formats: not merged), the K formats as blocks
    assert [type(p).__name__ for p in plain.parts] == ["LaneMatrix"] * 3 + ["QuantMatrix"] * 2
    _close(plain(x), x @ w.T, 1e-5)
    biased = QL.QuantLinear(parts, bias=bias)
    _close(biased(x), x @ w.T + bias, 1e-5)
    _close(biased.add_to(x, residual), residual + x @ w.T + bias, 1e-5)
    _close(plain.add_to(x, residual), residual + x @ w.T, 1e-5)
    for p in parts:  # each format alone too (a bug in one must not hide in the others' scale)
        _close(QL.QuantLinear([p])(x), x @ Q.dequantize(p).T, 1e-5)


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("t", [1, 3, 8])
def test_fast_linear_within_int8_error(t: int) -> None:
    """int8 activations per 32-block: each element's error is at most half a step (max|x| / 254
    of its block), so the output's error is ~1e-3 of its scale for random data; 1e-2 bounds it
    with margin and still catches a wrong scale, min term or nibble order (errors of O(1))."""
    parts = _parts(7 * t)
    w = torch.cat([Q.dequantize(p) for p in parts])  # [out, in]
    x = torch.randn(t, 512, generator=torch.Generator().manual_seed(t))  # [T, in]
    residual = torch.randn(t, w.shape[0])  # [T, out]
    fast = QL.QuantLinear(parts, mode="fast")
    _close(fast(x), x @ w.T, 1e-2)
    _close(fast.add_to(x, residual), residual + x @ w.T, 1e-2)
    for p in parts:
        got, want = QL.QuantLinear([p], mode="fast")(x), x @ Q.dequantize(p).T
        _close(got, want, 1e-2 if p.fmt in ("q4_0", "q4_1", "q8_0") else 1e-5)


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("fmt", QP.LANE_FORMATS)
def test_lane_layout_holds_the_same_values(fmt: str) -> None:
    """Repacked weights dequantize bit-equal to the GGUF blocks, every row; a part whose rows
    are not whole groups of 8 stays in blocks and still computes the same product."""
    m = _random_blocks(fmt, 48, 512, seed=11)
    lanes = QP.pack(m)
    got = np.empty((m.rows, m.cols), np.float32)
    QL.dequantize_into(lanes, np.arange(m.rows)[::-1].copy(), got)
    assert np.array_equal(got[::-1], Q.dequantize(m).numpy())
    # the staged path's decode (groups 1-4 in lane order) is bit-equal too
    kernel, n_chunks = QL._driver("stage", 1 << 20, lanes=True)
    st = np.empty((4, 32, lanes.qs.shape[2]), np.float32)
    kernel(lanes.q8, lanes.qs, lanes.d, lanes.m, 1, 5, st, n_chunks)
    nb = m.cols // 32  # st[g, j, 8 b + r] = row 8 (g + 1) + r, column 32 b + j
    staged = st.reshape(4, 32, nb, 8).transpose(0, 3, 2, 1).reshape(32, m.cols)
    assert np.array_equal(staged, Q.dequantize(m).numpy()[8:40])
    odd = m.take_rows(np.arange(12))
    assert not QP.can_pack(odd) and QL.lane_layout(odd) is odd
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(3))  # [T, in]
    _close(QL.QuantLinear([odd, m])(x), x @ torch.cat([Q.dequantize(odd), Q.dequantize(m)]).T, 1e-5)
    two = m.take_rows(np.arange(16, 48))  # q, k-like parts of one format: one merged matrix
    merged = QL.QuantLinear([m, two])
    assert len(merged.parts) == 1 and merged.parts[0].rows == 80 and merged.offsets == [0, 80]
    _close(merged(x), x @ torch.cat([Q.dequantize(m), Q.dequantize(two)]).T, 1e-5)


@pytest.mark.usefixtures("driver")
@pytest.mark.parametrize("fmt", Q.FORMATS)
def test_embedding_equals_dequantized_rows(fmt: str) -> None:
    m = _random_blocks(fmt, 30, 512, seed=9)
    ids = torch.tensor([0, 29, 7, 7])
    assert torch.equal(QL.QuantEmbedding(m)(ids), Q.dequantize(m)[ids])


@pytest.mark.skipif(not GGUF_PATH.exists(), reason="the SmolLM2 Q4_1 GGUF is not downloaded")
def test_real_embedding_and_head() -> None:
    t = _gguf_tensors()["token_embd.weight"]
    cols, rows = (int(s) for s in t.shape)
    table = Q.from_gguf_bytes("q8_0", t.data, rows, cols)
    ids = torch.tensor([1, 49151, 300])
    emb = QL.QuantEmbedding(table)(ids)  # [3, 576]
    assert np.array_equal(emb.numpy(), _gguf_dequant(table.take_rows(ids.numpy())))
    lanes = QL.lane_layout(table)  # what a tied exact-mode head and the lookups share
    assert torch.equal(QL.QuantEmbedding(lanes)(ids), emb)
    assert QL.QuantLinear([lanes]).parts[0] is lanes
    sub = table.take_rows(np.arange(0, rows - rows % 8, 97)[:64])
    x = emb[:1]  # [1, 576]
    _close(QL.QuantLinear([sub])(x), x @ Q.dequantize(sub).T, 1e-5)


def test_lane_paths_by_token_count() -> None:
    assert [QL._lane_path(t) for t in (1, QL.LANE_GEMV_MAX_TOKENS)] == ["gemv", "gemv"]
    assert QL._lane_path(QL.LANE_GEMV_MAX_TOKENS + 1) == "staged"
    assert QL._lane_path(QL.STAGED_MAX_TOKENS) == "staged"
    assert QL._lane_path(QL.STAGED_MAX_TOKENS + 1) == "prefill"
