"""GGUF block-quantized weight matrices, kept as shipped, and their numpy twin.

A `QuantMatrix` holds a weight `[rows, cols]` as ggml's blocks (each row is `cols / QK`
consecutive blocks, rows one after another). `dequantize` is the reference the Numba kernels
(`quant_numba`) are tested against: it repeats `gguf.quants.dequantize`'s fp32 operations in
the same order, so it equals that reference bit for bit. `quantize` is ggml's round-to-nearest
reference quantizer for q4_0/q4_1/q8_0 and a plain round-to-nearest one (no scale search) for
the K formats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

FORMATS = ("q4_0", "q4_1", "q8_0", "q4_k", "q6_k")
BLOCK_ELEMS: dict[str, int] = {"q4_0": 32, "q4_1": 32, "q8_0": 32, "q4_k": 256, "q6_k": 256}
# the kernels' small-int format ids (`quant_numba` branches on them; `quant_int16` takes 0-2)
FMT_ID: dict[str, int] = {"q4_0": 0, "q4_1": 1, "q8_0": 2, "q4_k": 3, "q6_k": 4}
BLOCK_BYTES: dict[str, int] = {"q4_0": 18, "q4_1": 20, "q8_0": 34, "q4_k": 144, "q6_k": 210}
GGML_TYPE: dict[str, int] = {"q4_0": 2, "q4_1": 3, "q8_0": 8, "q4_k": 12, "q6_k": 14}


@dataclass(frozen=True)
class QuantMatrix:
    """A `[rows, cols]` weight as GGUF blocks: `data` uint8 `[rows, row_bytes]`, C-contiguous."""

    fmt: str
    data: np.ndarray
    rows: int
    cols: int

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown quant format {self.fmt!r} (known: {FORMATS})")
        if self.cols % BLOCK_ELEMS[self.fmt]:
            raise ValueError(f"{self.fmt}: cols {self.cols} not a multiple of the block size")
        want = (self.rows, row_bytes(self.fmt, self.cols))
        if self.data.dtype != np.uint8 or self.data.shape != want:
            raise ValueError(
                f"{self.fmt} data {self.data.dtype}{self.data.shape}, want uint8{want}"
            )
        if not self.data.flags.c_contiguous:
            raise ValueError("QuantMatrix data must be C-contiguous")

    @property
    def nbytes(self) -> int:
        """Bytes of block data held."""
        return int(self.data.nbytes)

    def take_rows(self, index: np.ndarray) -> QuantMatrix:
        """The rows `index` (a permutation or selection), still quantized."""
        data = np.ascontiguousarray(self.data[np.asarray(index, dtype=np.int64)])
        return QuantMatrix(self.fmt, data, data.shape[0], self.cols)


def row_bytes(fmt: str, cols: int) -> int:
    """Bytes of one row of `cols` elements."""
    return (cols // BLOCK_ELEMS[fmt]) * BLOCK_BYTES[fmt]


def from_gguf_bytes(fmt: str, raw: np.ndarray, rows: int, cols: int) -> QuantMatrix:
    """Wrap a GGUF tensor's raw block bytes (any shape, `rows * row_bytes` bytes) without copying
    when they are already contiguous."""
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    return QuantMatrix(fmt, flat.reshape(rows, row_bytes(fmt, cols)), rows, cols)


def _f16(b: np.ndarray) -> np.ndarray:
    """fp16 fields `[n, 2]` uint8 -> fp32 `[n, 1]`."""
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, half: int) -> np.ndarray:
    """Bytes `[n, g, half]` -> their low nibbles then high nibbles `[n, g, 2 * half]` uint8."""
    lo, hi = qs & np.uint8(0x0F), qs >> np.uint8(4)
    return np.concatenate([lo, hi], axis=-1)


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes `[n, 12]` -> 6-bit scales and mins `[n, 8]` (get_scale_min_k4)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _dequant_blocks(fmt: str, b: np.ndarray) -> np.ndarray:
    """Blocks `[n, BLOCK_BYTES]` -> values `[n, BLOCK_ELEMS]` fp32, gguf's operation order."""
    n = b.shape[0]
    if fmt == "q4_0":
        q = _nibbles(b[:, 2:18].reshape(n, 1, 16), 16).reshape(n, 32).astype(np.int8) - np.int8(8)
        return _f16(b[:, 0:2]) * q.astype(np.float32)
    if fmt == "q4_1":
        q = _nibbles(b[:, 4:20].reshape(n, 1, 16), 16).reshape(n, 32).astype(np.float32)
        return (_f16(b[:, 0:2]) * q) + _f16(b[:, 2:4])
    if fmt == "q8_0":
        return np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.float32) * _f16(b[:, 0:2])
    if fmt == "q4_k":
        sc, mn = _scale_min_k4(b[:, 4:16])
        d = (_f16(b[:, 0:2]) * sc.astype(np.float32)).reshape(n, 8, 1)
        dm = (_f16(b[:, 2:4]) * mn.astype(np.float32)).reshape(n, 8, 1)
        q = _nibbles(b[:, 16:144].reshape(n, 4, 32), 32).reshape(n, 8, 32).astype(np.float32)
        return (d * q - dm).reshape(n, 256)
    if fmt == "q6_k":
        ql = _nibbles(b[:, 0:128].reshape(n, 2, 64), 64).reshape(n, 2, 4, 32)
        qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        q = (ql | ((qh & np.uint8(3)) << np.uint8(4))).astype(np.int8) - np.int8(32)
        scales = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
        d = (_f16(b[:, 208:210]) * scales).reshape(n, 16, 1)
        return (d * q.reshape(n, 16, 16).astype(np.float32)).reshape(n, 256)
    raise ValueError(f"unknown quant format {fmt!r}")


def _dequant_data(fmt: str, data: np.ndarray, cols: int) -> torch.Tensor:
    rows = data.shape[0]
    blocks = data.reshape(-1, BLOCK_BYTES[fmt])  # [rows * nb, bytes]
    return torch.from_numpy(_dequant_blocks(fmt, blocks).reshape(rows, cols))  # [rows, cols]


def dequantize(m: QuantMatrix) -> torch.Tensor:
    """The whole matrix as fp32 `[rows, cols]` (the reference the kernels are tested against)."""
    return _dequant_data(m.fmt, m.data, m.cols)


def dequantize_rows(m: QuantMatrix, ids: np.ndarray) -> torch.Tensor:
    """Rows `ids` as fp32 `[len(ids), cols]` (embedding lookups)."""
    return _dequant_data(m.fmt, m.data[np.asarray(ids, dtype=np.int64)], m.cols)


def _round_away(v: np.ndarray) -> np.ndarray:
    """Round half away from zero (C's roundf), as ggml's reference quantizers do."""
    a = np.abs(v)
    f = np.floor(a)
    return np.sign(v) * (f + np.floor(2 * (a - f)))


def _inv(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _pack_nibbles(q: np.ndarray, half: int) -> np.ndarray:
    """uint8 `[n, g, 2 * half]` values < 16 -> bytes `[n, g * half]` (first half low nibbles)."""
    return (q[..., :half] | (q[..., half:] << np.uint8(4))).reshape(q.shape[0], -1)


def _h(v: np.ndarray) -> np.ndarray:
    """fp32 `[n, 1]` -> fp16 bytes `[n, 2]`."""
    return v.astype(np.float16).view(np.uint8).reshape(v.shape[0], 2)


def _quant_32(fmt: str, x: np.ndarray) -> np.ndarray:
    """ggml's reference quantizers for the 32-element formats: `[n, 32]` -> `[n, bytes]`."""
    n = x.shape[0]
    if fmt == "q4_0":
        imax = np.abs(x).argmax(axis=-1)[:, None]
        d = np.take_along_axis(x, imax, axis=-1) / np.float32(-8)
        q = np.trunc(x * _inv(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([_h(d), _pack_nibbles(q.reshape(n, 1, 32), 16)], axis=-1)
    if fmt == "q4_1":
        lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((x - lo) * _inv(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
        return np.concatenate([_h(d), _h(lo), _pack_nibbles(q.reshape(n, 1, 32), 16)], axis=-1)
    d = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)  # q8_0
    q = _round_away(x * _inv(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_h(d), q], axis=-1)


def _quant_q4_k(x: np.ndarray) -> np.ndarray:
    """`[n, 256]` -> Q4_K blocks: per 32-element sub-block scale (max - min) / 15 and min
    (<= 0), both rounded to 6 bits against the super-block's d and dmin."""
    n = x.shape[0]
    s = x.reshape(n, 8, 32)
    mn = np.minimum(s.min(axis=-1), 0)  # [n, 8]
    sc = (s.max(axis=-1) - mn) / np.float32(15)
    d = (sc.max(axis=-1, keepdims=True) / np.float32(63)).astype(np.float16).astype(np.float32)
    dmin = ((-mn).max(axis=-1, keepdims=True) / np.float32(63)).astype(np.float16)
    dmin = dmin.astype(np.float32)
    ls = _round_away(sc * _inv(d)).clip(0, 63).astype(np.uint8)  # [n, 8]
    lm = _round_away(-mn * _inv(dmin)).clip(0, 63).astype(np.uint8)
    dq = (d * ls.astype(np.float32))[..., None]  # [n, 8, 1]
    mq = (dmin * lm.astype(np.float32))[..., None]
    q = _round_away((s + mq) * _inv(dq)).clip(0, 15).astype(np.uint8)  # [n, 8, 32]
    packed = np.zeros((n, 12), np.uint8)
    packed[:, 0:4] = (ls[:, 0:4] & 63) | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (lm[:, 0:4] & 63) | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    qs = _pack_nibbles(q.reshape(n, 4, 64), 32)
    return np.concatenate([_h(d), _h(dmin), packed, qs], axis=-1)


def _quant_q6_k(x: np.ndarray) -> np.ndarray:
    """`[n, 256]` -> Q6_K blocks: per 16-element sub-block scale max|x| / 32 (signed like
    ggml's, so the extreme maps to -32), rounded to int8 against the super-block's d."""
    n = x.shape[0]
    s = x.reshape(n, 16, 16)
    imax = np.abs(s).argmax(axis=-1)[..., None]
    sc = np.take_along_axis(s, imax, axis=-1)[..., 0] / np.float32(-32)  # [n, 16]
    imax = np.abs(sc).argmax(axis=-1)[:, None]
    d = (np.take_along_axis(sc, imax, axis=-1) / np.float32(-128)).astype(np.float16)
    d = d.astype(np.float32)  # [n, 1]
    ls = _round_away(sc * _inv(d)).clip(-128, 127).astype(np.int8)  # [n, 16]
    dq = (d * ls.astype(np.float32))[..., None]  # [n, 16, 1]
    q = (_round_away(s * _inv(dq)).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 2, 4, 32)
    lo = q & np.uint8(0xF)
    ql = (lo[:, :, 0:2] | (lo[:, :, 2:4] << np.uint8(4))).reshape(n, 128)
    hi = q >> np.uint8(4)  # [n, 2, 4, 32]
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql, qh.reshape(n, 64), ls.view(np.uint8), _h(d)], axis=-1)


def quantize(w: torch.Tensor, fmt: str) -> QuantMatrix:
    """fp32 `[rows, cols]` -> `fmt` blocks (round-to-nearest; see the module docstring)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quant format {fmt!r} (known: {FORMATS})")
    rows, cols = w.shape
    qk = BLOCK_ELEMS[fmt]
    if cols % qk:
        raise ValueError(f"cannot quantize a [{rows}, {cols}] weight to {fmt}: cols % {qk} != 0")
    x = w.detach().to(torch.float32).contiguous().numpy().reshape(-1, qk)  # [rows * nb, qk]
    if fmt == "q4_k":
        blocks = _quant_q4_k(x)
    elif fmt == "q6_k":
        blocks = _quant_q6_k(x)
    else:
        blocks = _quant_32(fmt, x)
    return QuantMatrix(fmt, np.ascontiguousarray(blocks).reshape(rows, -1), rows, cols)
